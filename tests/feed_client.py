"""WebSocket clients for the feed tests and benchmark."""
import functools
import json
import socket
import threading
import time

import simple_websocket
import wsproto
from wsproto.events import AcceptConnection, Request, TextMessage

# The client's reader thread must never keep a finished test run alive.
DaemonThread = functools.partial(threading.Thread, daemon=True)


class FeedClient:
    """simple-websocket, as flask-sock uses, with a reader thread."""

    def __init__(self, base_url, key=None):
        self.ws = simple_websocket.Client.connect(base_url.replace("http", "ws", 1) + "/api/feed/ws",
                                                  thread_class=DaemonThread)
        if key is not None:
            self.send({"type": "auth", "token": key})

    def send(self, message):
        self.ws.send(json.dumps(message))

    def next(self, timeout=5.0):
        """The next message, or None after ``timeout`` seconds."""
        raw = self.ws.receive(timeout=timeout)
        return None if raw is None else json.loads(raw)

    def until(self, predicate, timeout=10.0):
        """Messages received until one satisfies ``predicate`` (returned last)."""
        deadline, seen = time.monotonic() + timeout, []
        while time.monotonic() < deadline:
            message = self.next(timeout=max(deadline - time.monotonic(), 0.01))
            if message is not None:
                seen.append(message)
                if predicate(message):
                    return seen
        raise AssertionError("no matching message in %.1f s; got %s" % (timeout, seen[-5:]))

    def close_code(self, timeout=15.0):
        """Wait for the server to close; returns (code, reason)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.ws.receive(timeout=0.2)
            except simple_websocket.ConnectionClosed as closed:
                return closed.reason, closed.message
        raise AssertionError("the server did not close the socket")

    def close(self):
        try:
            self.ws.close()
        except simple_websocket.ConnectionClosed:
            pass


class RawSocket:
    """A WebSocket client with no reader thread: it authenticates, then reads only
    when told to (a stalled browser, or one of many idle sockets in a benchmark)."""

    def __init__(self, base_url, key):
        host, port = base_url.split("//")[1].split(":")
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect((host, int(port)))
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self.sock.sendall(self.ws.send(Request(host=host, target="/api/feed/ws")))
        self._read_until(lambda e: isinstance(e, AcceptConnection))
        self.sock.sendall(self.ws.send(TextMessage(data='{"type": "auth", "token": "%s"}' % key)))
        self._read_until(lambda e: isinstance(e, TextMessage) and '"ready"' in e.data)

    def _read_until(self, predicate, timeout=30):
        self.sock.settimeout(timeout)
        while True:
            for event in self.ws.events():
                if predicate(event):
                    return event
            self.ws.receive_data(self.sock.recv(65536))

    def resume_until_dropped(self):
        event = self._read_until(lambda e: isinstance(e, TextMessage) and '"dropped"' in e.data)
        return event.data
