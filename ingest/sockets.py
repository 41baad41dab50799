"""The fan-out loop's sockets (DESIGN §8, §12): their I/O and their timers, on the
fan-out's loop thread only.

``Sockets`` holds every feed socket of the process from the moment the loop takes it
over, and the selector that watches them (and the loop's wake-up socket). It reads
what clients send into their FeedSocket (ingest/feedsocket.py), sends what their
outboxes hold with non-blocking sends, pings, and cuts off a socket that is gone:
its client closed it, it made no progress for STALL_SECONDS, it sent nothing (not
even a pong) for SILENT_SECONDS, it sent no auth message within AUTH_TIMEOUT, or its
close handshake took longer than CLOSE_SECONDS. What a socket's events mean to the
fan-out (its auth message, room in its outbox, its end) goes to the callables it
was made with.
"""
import itertools
import logging
import selectors
import socket
import time

from wsproto.events import Ping
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError

from ingest.feedsocket import GREETING, OPEN, Close

log = logging.getLogger(__name__)

# The kernel's share (Linux doubles it): bounded too, rather than autotuned up to
# megabytes per stalled socket, and ample for a feed's few hundred KB a second.
SEND_BUFFER = 128 * 1024
PING_SECONDS = 25
SILENT_SECONDS = 60  # a client that sends nothing, not even a pong, for this long is gone
STALL_SECONDS = 20  # an outbox that makes no progress for this long: the client is gone
SENDMSG_BUFFERS = 64


class Sockets:
    """The loop's feed sockets. ``on_message(feed_socket, text)``: its auth message
    arrived whole; ``on_room(feed_socket)``: an open socket's outbox has room again;
    ``on_gone(feed_socket)``: it was closed and dropped from here."""

    def __init__(self, wakeup, on_message, on_room, on_gone):
        self._selector = selectors.DefaultSelector()
        self._selector.register(wakeup, selectors.EVENT_READ, None)
        self._sockets = set()
        self._on_message = on_message
        self._on_room = on_room
        self._on_gone = on_gone
        self._next_ping = time.monotonic() + PING_SECONDS

    def __iter__(self):
        return iter(self._sockets)

    def __contains__(self, feed_socket):
        return feed_socket in self._sockets

    def __bool__(self):
        return bool(self._sockets)

    def ready(self, timeout):
        """Wait up to ``timeout`` seconds: (feed socket, selector event mask) of each
        socket ready; the loop's wake-up socket shows as None."""
        return [(key.data, mask) for key, mask in self._selector.select(timeout)]

    def serve(self, feed_socket, mask):
        if mask & selectors.EVENT_READ:
            self._read(feed_socket)
        if mask & selectors.EVENT_WRITE and feed_socket in self._sockets:
            self.flush(feed_socket)

    def register(self, feed_socket):
        """Serve ``feed_socket`` from here; False if it is gone already."""
        self._sockets.add(feed_socket)
        feed_socket.registered = True
        try:
            feed_socket.sock.setblocking(False)
            feed_socket.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            self._selector.register(feed_socket.sock, selectors.EVENT_READ, feed_socket)
        except (OSError, ValueError):  # the client left before we got to it
            self._discard(feed_socket)
            return False
        return True

    def flush(self, feed_socket):
        """Send what the kernel takes of the outbox; once a closing socket's outbox is
        sent, shut our side."""
        sock = feed_socket.sock
        while feed_socket.outbox:
            try:
                size = sock.sendmsg(list(itertools.islice(feed_socket.outbox, SENDMSG_BUFFERS)))
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._discard(feed_socket)
                return
            feed_socket.sent(size, time.monotonic())
        if feed_socket.state is OPEN and feed_socket.has_room():
            self._on_room(feed_socket)
        self._want_write(feed_socket, bool(feed_socket.outbox))
        if not feed_socket.outbox and feed_socket.closing_until is not None and not feed_socket.shut:
            feed_socket.shut = True
            try:
                sock.shutdown(socket.SHUT_WR)  # FIN after the close frame; the client closes
            except OSError:
                self._discard(feed_socket)

    def tick(self, now):
        """Ping every PING_SECONDS; close the sockets that timed out, cut those gone."""
        if now >= self._next_ping:
            self._next_ping = now + PING_SECONDS
            self._ping()
        for feed_socket in list(self._sockets):
            if feed_socket.closing_until is not None:
                gone = now > feed_socket.closing_until
            elif feed_socket.state is GREETING and now > feed_socket.auth_deadline:
                feed_socket.begin_close(Close.UNAUTHORIZED, "authentication timed out", now)
                self.flush(feed_socket)
                continue
            else:
                gone = _quiet(feed_socket, now)
            if gone:
                self._discard(feed_socket)

    def close(self):
        """Close the sockets still here and the selector (the loop has ended)."""
        for feed_socket in self._sockets:
            feed_socket.sock.close()
        self._selector.close()

    def _ping(self):
        for feed_socket in self._sockets:
            if feed_socket.closing_until is None and feed_socket.state is OPEN:
                feed_socket.control(feed_socket.ws.send(Ping()))
        for feed_socket in list(self._sockets):
            self.flush(feed_socket)

    def _read(self, feed_socket):
        try:
            data = feed_socket.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._discard(feed_socket)
            return
        if feed_socket.closing_until is not None:
            return  # waiting for the client to close; whatever it sends is moot
        try:
            close = feed_socket.receive(data, time.monotonic())
        except LocalProtocolError:
            close = (CloseReason.PROTOCOL_ERROR, "protocol error")
        if close:
            feed_socket.begin_close(*close, time.monotonic())
        message = feed_socket.take_auth_message()
        if message is not None:
            self._on_message(feed_socket, message)
        if feed_socket.outbox:
            self.flush(feed_socket)

    def _want_write(self, feed_socket, writing):
        if feed_socket.writing != writing:
            feed_socket.writing = writing
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
            self._selector.modify(feed_socket.sock, events, feed_socket)

    def _discard(self, feed_socket):
        if feed_socket not in self._sockets:
            return
        self._sockets.discard(feed_socket)
        feed_socket.discarded = True
        try:
            self._selector.unregister(feed_socket.sock)
        except (KeyError, ValueError):
            pass  # never registered
        feed_socket.sock.close()
        self._on_gone(feed_socket)


def _quiet(feed_socket, now):
    """Whether an open socket's client is gone: its outbox made no progress for
    STALL_SECONDS, or it sent nothing for SILENT_SECONDS."""
    quiet = ((feed_socket.outbox and now - feed_socket.progress_at > STALL_SECONDS)
             or now - feed_socket.heard_at > SILENT_SECONDS)
    if quiet:
        log.info("feed socket gone quiet; closed", extra={"organization_id": feed_socket.organization_id})
    return quiet
