"""WebSocket clients for the feed tests and benchmark."""
import functools
import json
import socket
import threading
import time

import simple_websocket
import wsproto
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Request, TextMessage
from wsproto.extensions import PerMessageDeflate

from tests.openapi_check import check_live_message

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
        return None if raw is None else check_live_message(json.loads(raw))

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
    """A WebSocket client with no reader thread, on wsproto: it reads only when told to
    (a stalled browser, one of many idle sockets in a benchmark) and can send what a
    browser would not (pings at will, floods, compressed frames)."""

    def __init__(self, base_url, key=None, deflate=False, rcvbuf=4096):
        host, port = base_url.split("//")[1].split(":")
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect((host, int(port)))
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        extensions = [PerMessageDeflate()] if deflate else []
        self.sock.sendall(self.ws.send(Request(host=host, target="/api/feed/ws",
                                               extensions=extensions)))
        accepted = self._read_until(lambda e: isinstance(e, AcceptConnection))
        self.deflate_accepted = bool(accepted.extensions)
        if key is not None:
            self.send_text('{"type": "auth", "token": "%s"}' % key)
            self._read_until(lambda e: isinstance(e, TextMessage) and '"ready"' in e.data)

    def send_text(self, text):
        self.sock.sendall(self.ws.send(TextMessage(data=text)))

    def ping(self, payload):
        self.sock.sendall(self.ws.send(Ping(payload=payload)))

    def read_events(self, size=65536, timeout=30):
        """The events of one read from the socket (empty list on timeout)."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(size)
        except socket.timeout:
            return []
        self.ws.receive_data(data or None)
        return list(self.ws.events())

    def _read_until(self, predicate, timeout=30):
        self.sock.settimeout(timeout)
        while True:
            for event in self.ws.events():
                if predicate(event):
                    return event
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the server hung up")
            self.ws.receive_data(data)

    def close_code(self, timeout=30):
        """Read (discarding) until the server closes; its close code."""
        return self._read_until(lambda e: isinstance(e, CloseConnection), timeout).code

    def resume_until_dropped(self):
        event = self._read_until(lambda e: isinstance(e, TextMessage) and '"dropped"' in e.data)
        return event.data


def connected_pair():
    """A server's and a client's wsproto connection, past the handshake, in memory."""
    server, client = WSConnection(ConnectionType.SERVER), WSConnection(ConnectionType.CLIENT)
    server.receive_data(client.send(Request(host="local", target="/api/feed/ws")))
    next(server.events())
    client.receive_data(server.send(AcceptConnection()))
    next(client.events())
    return server, client


class LocalSocket:
    """A feed socket attached straight to this process's bus over a socketpair: what a
    browser of the organization receives, without a server in between, as if
    authenticated with ``read_key`` (a live key: the revocation watch closes the
    sockets of any other within KEY_CACHE_SECONDS); ``after``: the position it
    resumes after, as the auth message's cursor gives it; ``start``: the store's
    position it was authenticated at, if not the one read now (a stale one, as a
    start position read up to START_SECONDS before gives)."""

    def __init__(self, bus, organization_id, read_key, after=None, start=None):
        server_end, self.sock = socket.socketpair()
        server, self.ws = connected_pair()
        from ingest.auth import hash_key
        from ingest.changes import cursor
        from ingest.fanout import FeedSocket, text_frame
        feed_socket = FeedSocket(server_end, server, organization_id, hash_key(read_key))
        feed_socket.after = after
        feed_socket.start = bus.fanout.start_position(organization_id) if start is None else start  # as auth does
        bus.attach(feed_socket, text_frame(json.dumps({"type": "ready", "organizationId": organization_id,
                                                       "cursor": cursor(organization_id,
                                                                        feed_socket.starts_after())})))
        assert self.next()["type"] == "ready"

    def next(self, timeout=5.0):
        self.sock.settimeout(timeout)
        parts = []
        while True:
            for event in self.ws.events():
                if isinstance(event, TextMessage):
                    parts.append(event.data)  # a frame split over two reads comes in parts
                    if event.message_finished:
                        return check_live_message(json.loads("".join(parts)))
            data = self.sock.recv(65536)
            if not data:  # (wsproto would take it as a close, and this loop spin on)
                raise ConnectionError("the server closed the socket")
            self.ws.receive_data(data)

    def close(self):
        self.sock.close()
