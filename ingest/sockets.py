"""A feed socket: its state and its I/O (DESIGN §8, §12), on the fan-out's loop
thread only (an auth thread sets ``after``, ``start`` and ``authenticated`` on a
FeedSocket before it is adopted).

``FeedSocket``: one socket's wsproto connection, auth message, outbox and flow
control, without I/O; the frames for outboxes are made here too. An outbox is
bounded in bytes: a browser that falls behind has events dropped for it alone, is
told {"type": "dropped", "count": N} and catches up (ingest/catchup.py). What a
client may send after its auth message is bounded too (INBOUND_BURST, INBOUND_RATE).

``Sockets``: the selector over every socket the loop took over (and its wake-up
socket); it reads into each FeedSocket, sends its outbox without blocking, pings,
and cuts off a socket that is gone: closed by its client, no progress for
STALL_SECONDS, silent (not even a pong) for SILENT_SECONDS, no auth message within
AUTH_TIMEOUT, or a close handshake longer than CLOSE_SECONDS. A socket's auth
message, room in its outbox and its end go to the fan-out's callables.
"""
import collections
import itertools
import json
import logging
import selectors
import socket
import struct
import time
from enum import IntEnum

from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError

from ingest import metrics

log = logging.getLogger(__name__)

OUTBOX_BYTES = 512 * 1024  # events waiting for one socket; beyond it they are dropped
CLOSE_SECONDS = 2  # how long a closing socket waits for the client's close reply
MAX_MESSAGE = 64 * 1024  # a client message larger than this: 1009
INBOUND_BURST = 64 * 1024  # bytes a client may send at once after auth...
INBOUND_RATE = 1024  # ...and per second on average, beyond which it is cut off (1008)
AUTH_TIMEOUT = 10  # seconds from the upgrade to the auth message
MAX_AUTH_MESSAGE = 4096

# The kernel's share (Linux doubles it): bounded too, rather than autotuned up to
# megabytes per stalled socket, and ample for a feed's few hundred KB a second.
SEND_BUFFER = 128 * 1024
PING_SECONDS = 25
SILENT_SECONDS = 60  # a client that sends nothing, not even a pong, for this long is gone
STALL_SECONDS = 20  # an outbox that makes no progress for this long: the client is gone
SENDMSG_BUFFERS = 64


# One encoder for every event: json.dumps with options builds a new one per call.
_encoder = json.JSONEncoder(default=str, ensure_ascii=False, separators=(",", ":"))


def encode(events):
    """Events as JSON texts, serialised once for every socket they go to."""
    return [_encoder.encode(event) for event in events]


def text_frame(message):
    """A server-to-client WebSocket text frame (RFC 6455 §5.2: final, unmasked).

    Written here rather than by wsproto's ``send``, which frames for one connection
    at a time: an event is framed once and the same bytes go to every socket of its
    organization. Browsers and the tests' wsproto clients parse what it makes
    (test_feed, test_feed_safety, test_page)."""
    payload = message.encode("utf-8") if isinstance(message, str) else message
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x81, size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, size)
    else:
        header = struct.pack("!BBQ", 0x81, 127, size)
    return header + payload


def framed(items):
    """``items`` ((position, JSON text)) as (position, frame)."""
    return [(position, text_frame(message)) for position, message in items]


def notice_frame(kind, **fields):
    return text_frame(json.dumps({"type": kind, **fields}))


class Close(IntEnum):
    """The feed's own close codes (RFC 6455 leaves 4000-4999 to applications); the
    standard ones are wsproto's CloseReason."""
    BAD_CURSOR = 4400  # the auth message's ``after`` is not a cursor of the organization
    UNAUTHORIZED = 4401  # no valid key, no auth message in time, or the key was revoked
    FORBIDDEN = 4403  # the key lacks the read scope
    CURSOR_EXPIRED = 4410  # the changes after ``after`` are no longer kept


class Refused(Exception):
    """Close the socket with ``code`` and ``reason``."""

    def __init__(self, code, reason):
        super().__init__(reason)
        self.code = code
        self.reason = reason


# A socket's states: made, waiting for its auth message, having it checked, serving events.
NEW, GREETING, CHECKING, OPEN = "new", "greeting", "checking", "open"


class FeedSocket:
    """One socket: its connection, its wsproto state, its outbox.

    Touched only by the loop thread, but for ``authenticated`` (an auth thread).
    """

    def __init__(self, sock, ws, organization_id=None, key_hash=None):
        self.sock = sock
        self.ws = ws
        self.state = NEW
        self.auth_deadline = time.monotonic() + AUTH_TIMEOUT
        self.auth_parts = []
        self.auth_text = None
        self.authenticate = None  # checks the auth message on an auth thread (FanOut.greet's)
        self.registered = self.discarded = False
        self.organization_id = self.key_hash = None
        if organization_id is not None:
            self.authenticated(organization_id, key_hash)
        self.outbox = collections.deque()
        self.queued = 0
        self.dropped = 0
        self.heard_at = self.progress_at = self.refilled_at = time.monotonic()
        self.allowance = INBOUND_BURST
        self.message_bytes = 0
        self.closing_until = None  # set when the close handshake starts
        self.shut = False  # our side sent FIN
        self.writing = False  # registered for EVENT_WRITE
        self.after = None  # the position it resumes after (its auth message's cursor), if any
        self.start = None  # the store's position when it was authenticated (or earlier)
        self.position = None  # the position of the last change queued for it
        self.reading = False  # a read of the store for it is under way

    def authenticated(self, organization_id, key_hash):
        self.organization_id = str(organization_id)
        self.key_hash = key_hash

    def take_auth_message(self):
        """The auth message, once, when it has arrived whole; else None."""
        text, self.auth_text = self.auth_text, None
        return text

    def control(self, data):
        """Queue a control frame or notice; these are small and never dropped."""
        self.outbox.append(data)
        self.queued += len(data)

    def push(self, chunk, frames):
        """Queue events in order (``frames``: (position, frame); ``chunk``: the frames
        joined, or None) while the outbox has room; the rest are dropped for this
        socket. Returns whether all were queued."""
        if self.closing_until is not None:
            return True
        if chunk is not None and self.queued + len(chunk) <= OUTBOX_BYTES:
            self._admit(chunk)
            self.position = frames[-1][0]
            return True
        for n, (position, frame) in enumerate(frames):
            if self.queued + len(frame) > OUTBOX_BYTES:
                self.dropped += len(frames) - n
                metrics.DROPPED.inc(len(frames) - n)
                return False
            self._admit(frame)
            self.position = position
        return True

    def has_room(self):
        return self.queued <= OUTBOX_BYTES // 2 and self.closing_until is None

    def starts_after(self):
        """The position it is sent the changes after: its cursor's if it resumed, else
        the store's when it was authenticated."""
        return self.start if self.after is None else self.after

    def _admit(self, data):
        self._tell_dropped()
        self.control(data)

    def _tell_dropped(self):
        """Queue the notice of the events dropped since the last one, if any."""
        if self.dropped:
            self.control(notice_frame("dropped", count=self.dropped))
            self.dropped = 0

    def sent(self, size, now):
        """Take ``size`` bytes that the kernel accepted off the front of the outbox."""
        self.queued -= size
        self.progress_at = now
        while size:
            head = self.outbox[0]
            if len(head) <= size:
                size -= len(head)
                self.outbox.popleft()
            else:
                self.outbox[0] = memoryview(head)[size:]
                size = 0
        if not self.outbox and self.closing_until is None:
            self._tell_dropped()

    def receive(self, data, now):
        """Take bytes from the client; returns (code, reason) if it must be closed."""
        self.heard_at = now
        self.allowance = min(INBOUND_BURST,
                             self.allowance + (now - self.refilled_at) * INBOUND_RATE) - len(data)
        self.refilled_at = now
        if self.allowance < 0:
            return CloseReason.POLICY_VIOLATION, "nothing more is expected from the client"
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, Ping):
                self.control(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                return event.code, event.reason or ""
            elif isinstance(event, (TextMessage, BytesMessage)):
                self.message_bytes += len(event.data)
                if self.state is GREETING:
                    if isinstance(event, BytesMessage):
                        return Close.UNAUTHORIZED, "authentication failed"
                    if self.message_bytes > MAX_AUTH_MESSAGE:
                        return CloseReason.MESSAGE_TOO_BIG, "the auth message is too big"
                    self.auth_parts.append(event.data)
                if self.message_bytes > MAX_MESSAGE:
                    return CloseReason.MESSAGE_TOO_BIG, "message too big"
                if event.message_finished:
                    self.message_bytes = 0
                    if self.state is GREETING:
                        self.state, self.auth_text = CHECKING, "".join(self.auth_parts)
                        self.auth_parts = []
        return None

    def begin_close(self, code, reason, now):
        """Queue the close frame (or the reply to the client's); the socket is cut
        once it is sent and the client has closed, or after CLOSE_SECONDS."""
        if self.closing_until is not None:
            return
        self.closing_until = now + CLOSE_SECONDS
        try:
            if self.ws.state is ConnectionState.REMOTE_CLOSING:
                self.control(self.ws.send(CloseConnection(code=code)))
            elif self.ws.state is ConnectionState.OPEN:
                self.control(self.ws.send(CloseConnection(code=code, reason=reason)))
        except LocalProtocolError:
            pass


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
