"""Fan-out of live events to this process's feed sockets (DESIGN §8, §12).

From its upgrade on, a feed socket belongs to one thread of its process, the
fan-out loop, for the rest of its life; the request thread that upgraded it is free
at once, so sockets that never authenticate hold no thread either:

- it waits for the socket's auth message (AUTH_TIMEOUT, MAX_AUTH_MESSAGE) and hands
  it to a small pool of auth threads, the only place that may wait on the database;
  at most MAX_UNAUTHENTICATED sockets of a process wait for theirs at once;

- it is the only thread that writes to the socket (events, pings, pongs, close
  frames), so frames never interleave;
- it frames each event once and hands the same bytes to every socket of the
  organization with non-blocking sends, so an event costs one wake-up per
  process, not one per socket;
- it reads what clients send (pongs, close) and discards anything else within a
  small budget: nothing is expected from a client after its auth message.

Publishing only queues events for the loop, so a slow or dead browser never slows
ingestion. Each socket's outbox is bounded in bytes: a browser that falls behind
has events dropped for it alone and is told {"type": "dropped", "count": N}; one
that makes no progress for STALL_SECONDS, or sends nothing (not even a pong) for
SILENT_SECONDS, is cut off.

Every event carries its position in its organization's change feed (DESIGN §16),
and each socket is sent its organization's changes in position order, each once
(ingest/feeds.py): the changes after the cursor it resumed from (``after`` in its
auth message), then live ones. A socket whose outbox overflowed is told
{"type": "dropped", "count": N} and, once it has drained, sent what it missed in
the same way, from recent frames or from the store; so is every socket of an
organization whose events the bus lost. The store is read on the fan-out's work
threads, never on the loop thread.
"""
import collections
import concurrent.futures
import itertools
import json
import logging
import selectors
import socket
import struct
import threading
import time
from enum import IntEnum

from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError

from ingest import changes, metrics
from ingest.feeds import HOLE_SECONDS, OrgFeed
from ingest.threads import Threads
from models import connection

log = logging.getLogger(__name__)

OUTBOX_BYTES = 512 * 1024  # events waiting for one socket; beyond it they are dropped
# The kernel's share (Linux doubles it): bounded too, rather than autotuned up to
# megabytes per stalled socket, and ample for a feed's few hundred KB a second.
SEND_BUFFER = 128 * 1024
PING_SECONDS = 25
SILENT_SECONDS = 60  # a client that sends nothing, not even a pong, for this long is gone
STALL_SECONDS = 20  # an outbox that makes no progress for this long: the client is gone
CLOSE_SECONDS = 2  # how long a closing socket waits for the client's close reply
MAX_MESSAGE = 64 * 1024  # a client message larger than this: 1009
INBOUND_BURST = 64 * 1024  # bytes a client may send at once after auth...
INBOUND_RATE = 1024  # ...and per second on average, beyond which it is cut off (1008)
MAX_SOCKETS = 10_000  # per process; more are refused with 1013
AUTH_TIMEOUT = 10  # seconds from the upgrade to the auth message
MAX_AUTH_MESSAGE = 4096
MAX_UNAUTHENTICATED = 5_000  # per process: sockets waiting for their auth message
WORK_THREADS = 4  # per process: the threads that check auth messages and read the store
CHECK_SECONDS = 2  # how often the store is asked whether a feed missed its latest changes
START_SECONDS = 1  # how long a read of an organization's last position serves new sockets
# Changes read from the store at a time, for a socket catching up or a feed's hole: a
# page of the largest events (26 KB) stays a few MB, and a socket takes a page only
# while its outbox has room.
STORE_PAGE = 200
# Events arriving within this long of the last send pass wait for the next one,
# so that under load each socket gets a few events per write, not one each.
COALESCE_SECONDS = 0.005
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

    def _admit(self, data):
        if self.dropped:
            self.control(notice_frame("dropped", count=self.dropped))
            self.dropped = 0
        self.control(data)

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
        if not self.outbox and self.dropped and self.closing_until is None:
            self.control(notice_frame("dropped", count=self.dropped))
            self.dropped = 0

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


class FanOut:
    """This process's feed sockets and the thread that serves them.

    ``greet``, ``adopt``, ``dispatch``, ``resync``, ``close_keys`` and ``close_all``
    may be called from any thread; they queue a command for the loop and return.
    """

    def __init__(self, on_leave=None):
        self._on_leave = on_leave  # called with an organization id when its last socket goes
        self._inbox = collections.deque()
        self._lock = threading.Lock()  # guards what other threads read: counts and keys
        self._count = 0  # sockets adopted
        self._unauthenticated = 0  # sockets greeted and not yet adopted or gone
        self._keys = collections.Counter()
        self._starts = {}  # organization -> (its last position in the store, when read)
        self._loop = Threads(("feed-fanout", self._run), wake=self._wake)
        self._woken = False
        self._set_up()

    def start(self):
        self._loop.start()

    def stop(self):
        """Close every socket (1001: browsers reconnect, to another worker) and end
        the loop and its work threads."""
        self.close_all(CloseReason.GOING_AWAY, "server restarting")
        self._loop.stop()
        self._pool.shutdown(wait=True, cancel_futures=True)
        for feed_socket in self._sockets:  # what close_all did not reach: not yet authenticated
            feed_socket.sock.close()
        self._selector.close()
        self._wakeup.close()
        self._waker.close()

    # Any thread -------------------------------------------------------------

    def greet(self, feed_socket, authenticate):
        """Take over a socket just upgraded and wait for its auth message;
        ``authenticate(feed_socket, message)`` is then called on an auth thread, and
        adopts it (``adopt``) or raises Refused. Returns False (and takes nothing)
        when MAX_UNAUTHENTICATED sockets of the process wait already."""
        with self._lock:
            if self._unauthenticated >= MAX_UNAUTHENTICATED:
                return False
            self._unauthenticated += 1
        feed_socket.state = GREETING
        self._post(("greet", feed_socket, authenticate))
        return True

    def adopt(self, feed_socket, greeting):
        """Serve ``feed_socket`` (authenticated) its events; ``greeting`` is the first
        frame it is sent. Returns False (and takes nothing) when the process holds
        MAX_SOCKETS."""
        with self._lock:
            if self._count >= MAX_SOCKETS:
                return False
            self._count += 1
            self._keys[feed_socket.key_hash] += 1
        self._post(("adopt", feed_socket, greeting))
        return True

    def dispatch(self, organization_id, items):
        """Send ``items`` ((position, serialised event as str or bytes)) to the
        organization's sockets, in position order."""
        if self._count:
            self._post(("events", str(organization_id), items))

    def resync(self, organization_id):
        """The bus may have lost events of the organization: read the store now."""
        if self._count:
            self._post(("resync", str(organization_id)))

    def close_keys(self, key_hashes, code, reason):
        """Close the sockets authenticated with any of ``key_hashes``."""
        self._post(("close_keys", frozenset(key_hashes), code, reason))

    def close_all(self, code, reason, timeout=2.0):
        """Close every socket (a worker stopping) and wait until that is done."""
        if not self._count or not self._loop.running:
            return
        done = threading.Event()
        self._post(("close_all", code, reason, done))
        done.wait(timeout)

    def start_position(self, organization_id):
        """The organization's last position in the store, read at most once every
        START_SECONDS per process (an older one only means a socket that asked for
        "from now on" starts a little earlier): where a socket without a cursor
        starts. Called on a work thread, so a reconnect storm costs one query."""
        now = time.monotonic()
        with self._lock:
            known = self._starts.get(organization_id)
        if known is not None and now - known[1] < START_SECONDS:
            return known[0]
        with connection():
            position = changes.stream(organization_id)[0]
        with self._lock:
            if len(self._starts) >= MAX_SOCKETS:
                self._starts.clear()
            self._starts[organization_id] = (position, now)
        return position

    def key_hashes(self):
        with self._lock:
            return {key for key, count in self._keys.items() if count}

    def socket_count(self):
        return self._count

    def _post(self, command):
        self._inbox.append(command)
        if not self._woken:
            self._wake()

    def _wake(self):
        self._woken = True
        try:
            self._waker.send(b"\0")
        except BlockingIOError:
            pass  # already full of wake-ups

    def _set_up(self):
        """The loop's state."""
        self._selector = selectors.DefaultSelector()
        self._wakeup, self._waker = socket.socketpair()
        self._wakeup.setblocking(False)
        self._waker.setblocking(False)
        self._selector.register(self._wakeup, selectors.EVENT_READ, None)
        self._sockets = set()
        self._pool = concurrent.futures.ThreadPoolExecutor(WORK_THREADS, "feed-work")
        self._feeds = {}  # organization -> OrgFeed, while it has sockets here
        self._next_check = time.monotonic() + CHECK_SECONDS
        self._next_ping = time.monotonic() + PING_SECONDS
        self._next_tick = time.monotonic() + 1
        self._stopping = None
        self._closing = None  # (code, reason) for every socket, once the process stops
        self._pending = set()  # sockets with events queued since the last flush pass
        self._flushed_at = 0.0
        self._flush_at = None  # when the next pass is due, if one is

    # The loop thread ----------------------------------------------------------

    def _run(self):
        while not self._loop.stopping.is_set():
            try:
                self._step()
            except Exception:  # the loop must outlive any one socket's surprise
                log.exception("feed fan-out error")

    def _step(self):
        wake_at = self._next_tick if self._flush_at is None else min(self._next_tick, self._flush_at)
        for key, mask in self._selector.select(max(0.0, wake_at - time.monotonic())):
            feed_socket = key.data
            if feed_socket is None:
                self._take_commands()
                continue
            if mask & selectors.EVENT_READ:
                self._read(feed_socket)
            if mask & selectors.EVENT_WRITE and feed_socket in self._sockets:
                self._flush(feed_socket)
        now = time.monotonic()
        if self._flush_at is not None and now >= self._flush_at:
            self._flush_pending(now)
        if now >= self._next_tick:
            self._tick()

    def _take_commands(self):
        try:
            while self._wakeup.recv(4096):
                pass
        except BlockingIOError:
            pass
        self._woken = False
        touched = set()
        while self._inbox:
            kind, *args = self._inbox.popleft()
            try:
                getattr(self, "_on_" + kind)(touched, *args)
            except Exception:
                log.exception("feed fan-out command failed", extra={"command": kind})
        self._pending |= touched
        now = time.monotonic()
        if now - self._flushed_at >= COALESCE_SECONDS:
            self._flush_pending(now)
        elif self._flush_at is None:
            self._flush_at = self._flushed_at + COALESCE_SECONDS

    def _flush_pending(self, now):
        """Send what the commands since the last pass queued, to every socket at once."""
        pending, self._pending = self._pending, set()
        for feed_socket in pending:
            if feed_socket in self._sockets and not feed_socket.writing:
                self._flush(feed_socket)
        self._flushed_at, self._flush_at = now, None

    def _on_greet(self, touched, feed_socket, authenticate):
        feed_socket.authenticate = authenticate
        if self._register(feed_socket) and self._closing is not None:
            feed_socket.begin_close(*self._closing, time.monotonic())
            touched.add(feed_socket)

    def _register(self, feed_socket):
        """Serve ``feed_socket`` from this loop; False if it is gone already."""
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

    def _on_adopt(self, touched, feed_socket, greeting):
        if feed_socket.discarded:  # the client left while its key was checked
            self._forget(feed_socket)
            return
        if feed_socket.state is not NEW:
            self._uncount_unauthenticated()
        feed_socket.state = OPEN
        metrics.SOCKETS.inc()
        feed = self._feeds.get(feed_socket.organization_id) or self._new_feed(feed_socket)
        feed.members.add(feed_socket)
        if not feed_socket.registered and not self._register(feed_socket):
            return
        if self._closing is None:
            feed_socket.control(greeting)
            self._catch_up(feed_socket, feed)
        else:  # authenticated while this process stops: off to another one
            feed_socket.begin_close(*self._closing, time.monotonic())
        touched.add(feed_socket)

    def _on_refuse(self, touched, feed_socket, code, reason):
        if not feed_socket.discarded:
            feed_socket.begin_close(code, reason, time.monotonic())
            touched.add(feed_socket)

    def _check(self, feed_socket, message):
        """On an auth thread: have ``message`` checked; refuse the socket if it fails."""
        try:
            feed_socket.authenticate(feed_socket, message)
        except Refused as refused:
            self._post(("refuse", feed_socket, refused.code, refused.reason))
        except Exception:
            log.exception("feed socket authentication failed")
            self._post(("refuse", feed_socket, CloseReason.INTERNAL_ERROR, "unexpected error"))

    def _on_events(self, touched, organization_id, items):
        feed = self._feeds.get(organization_id)
        if feed is not None:
            self._deliver(feed, feed.take(items, time.monotonic()), touched)
            if feed.hole_since is not None:  # wake up to fill it if it lasts
                self._next_tick = min(self._next_tick, feed.hole_since + HOLE_SECONDS)

    def _on_resync(self, touched, organization_id):
        feed = self._feeds.get(organization_id)
        if feed is not None and not feed.filling:
            self._fill(organization_id, feed)

    def _deliver(self, feed, due, touched):
        """Send the changes ``due`` ((position, message), in order) to the sockets in
        step with the feed; one that has no room left falls behind and catches up."""
        if not due:
            return
        frames = [(position, text_frame(message)) for position, message in due]
        for position, frame in frames:
            feed.remember(position, frame)
        chunk = frames[0][1] if len(frames) == 1 else b"".join(frame for _, frame in frames)
        for feed_socket in list(feed.live):
            if feed_socket.position >= frames[0][0]:  # it caught up past some of them
                fresh = [pair for pair in frames if pair[0] > feed_socket.position]
                complete = feed_socket.push(None, fresh) if fresh else True
            else:
                complete = feed_socket.push(chunk, frames)
            if not complete:
                feed.live.discard(feed_socket)
        touched.update(feed.members)

    # Where a socket starts, catching up, and the store --------------------------

    def _new_feed(self, feed_socket):
        feed = self._feeds[feed_socket.organization_id] = OrgFeed()
        feed.start(feed_socket.start)
        return feed

    def _catch_up(self, feed_socket, feed):
        """Bring ``feed_socket`` in step with its feed: from recent frames, or a page
        from the store at a time while its outbox has room."""
        if feed_socket.reading or feed_socket in feed.live:
            return
        if feed_socket.position is None:
            feed_socket.position = feed_socket.start if feed_socket.after is None else feed_socket.after
        recent = feed.recent_after(feed_socket.position)
        if recent is not None and (not recent or feed_socket.push(None, recent)):
            feed.live.add(feed_socket)
        elif feed_socket.has_room():
            feed_socket.reading = True
            self._work(self._read_page, feed_socket, feed_socket.position,
                       failed=lambda: setattr(feed_socket, "reading", False))

    @staticmethod
    def _read_page(feed_socket, after):
        organization_id = feed_socket.organization_id
        try:
            with connection():
                events, last = changes.read(organization_id, after, STORE_PAGE)
        except changes.ExpiredCursor as expired:
            return "expired", feed_socket, expired.oldest
        return "page", feed_socket, _positioned(organization_id, events), last

    def _on_page(self, touched, feed_socket, items, last):
        feed_socket.reading = False
        feed = self._feeds.get(feed_socket.organization_id)
        if feed_socket.discarded or feed is None:
            return
        if last == feed_socket.position:  # the store has nothing after it: what follows comes live
            feed.live.add(feed_socket)
        frames = [(position, text_frame(message)) for position, message in items]
        if frames and not feed_socket.push(None, frames):
            return  # it goes on once its outbox has drained (_flush)
        feed_socket.position = max(feed_socket.position, last)  # what the store lacks up to last is gone
        self._catch_up(feed_socket, feed)
        touched.add(feed_socket)

    def _on_expired(self, touched, feed_socket, oldest):
        feed_socket.reading = False
        feed_socket.begin_close(Close.CURSOR_EXPIRED, "cursor expired; oldest: " + oldest, time.monotonic())
        touched.add(feed_socket)

    def _fill(self, organization_id, feed):
        """Read the changes the feed misses from the store."""
        feed.filling = True
        self._work(self._read_fill, organization_id, feed.position, failed=lambda: setattr(feed, "filling", False))

    @staticmethod
    def _read_fill(organization_id, after):
        try:
            with connection():
                events, last = changes.read(organization_id, after, STORE_PAGE)
        except changes.ExpiredCursor as expired:  # retention went past it: go on from what is kept
            return "filled", organization_id, [], changes.position_of(organization_id, expired.oldest)
        return "filled", organization_id, _positioned(organization_id, events), last

    def _on_filled(self, touched, organization_id, items, last):
        feed = self._feeds.get(organization_id)
        if feed is not None:
            feed.filling = False
            self._deliver(feed, feed.fill(items, last, time.monotonic()), touched)

    def _check_feeds(self):
        """Ask the store, for every feed at once, whether changes were committed that
        never arrived (a publish lost at the tail)."""
        if self._feeds:
            self._work(self._read_positions, list(self._feeds))

    @staticmethod
    def _read_positions(organization_ids):
        with connection():
            return "checked", changes.positions(organization_ids)

    def _on_checked(self, touched, positions):
        for organization_id, position in positions.items():
            feed = self._feeds.get(organization_id)
            if feed is None:
                continue
            if feed.ahead is not None and feed.position < feed.ahead and not feed.filling:
                self._fill(organization_id, feed)  # still short of it a check later: lost, not late
            feed.ahead = position if position > feed.position else None

    def _work(self, task, *args, failed=None):
        """Run ``task(*args)`` on a work thread; what it returns is posted back as a
        command; if it raises, ``failed()`` runs on the loop thread instead."""
        def run():
            try:
                self._post(task(*args))
            except Exception:
                log.warning("feed store read failed; tried again later", exc_info=True)
                self._post(("work_failed", failed))
        self._pool.submit(run)

    def _on_work_failed(self, touched, failed):
        if failed is not None:
            failed()

    def _on_close_keys(self, touched, key_hashes, code, reason):
        now = time.monotonic()
        for feed_socket in self._sockets:
            if feed_socket.key_hash in key_hashes:
                feed_socket.begin_close(code, reason, now)
                touched.add(feed_socket)

    def _on_close_all(self, touched, code, reason, done):
        now = time.monotonic()
        self._closing = (code, reason)
        for feed_socket in self._sockets:
            feed_socket.begin_close(code, reason, now)
        touched.update(self._sockets)
        self._stopping = done
        self._next_tick = now

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
            self._pool.submit(self._check, feed_socket, message)
        if feed_socket.outbox:
            self._flush(feed_socket)

    def _flush(self, feed_socket):
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
            self._catch_up(feed_socket, self._feeds[feed_socket.organization_id])
        self._want_write(feed_socket, bool(feed_socket.outbox))
        if not feed_socket.outbox and feed_socket.closing_until is not None and not feed_socket.shut:
            feed_socket.shut = True
            try:
                sock.shutdown(socket.SHUT_WR)  # FIN after the close frame; the client closes
            except OSError:
                self._discard(feed_socket)

    def _want_write(self, feed_socket, writing):
        if feed_socket.writing != writing:
            feed_socket.writing = writing
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
            self._selector.modify(feed_socket.sock, events, feed_socket)

    def _tick(self):
        now = time.monotonic()
        if now >= self._next_ping:
            self._next_ping = now + PING_SECONDS
            for feed_socket in self._sockets:
                if feed_socket.closing_until is None and feed_socket.state is OPEN:
                    feed_socket.control(feed_socket.ws.send(Ping()))
            for feed_socket in list(self._sockets):
                self._flush(feed_socket)
        for feed_socket in list(self._sockets):
            if feed_socket.closing_until is not None:
                expired = now > feed_socket.closing_until
            elif feed_socket.state is GREETING and now > feed_socket.auth_deadline:
                feed_socket.begin_close(Close.UNAUTHORIZED, "authentication timed out", now)
                self._flush(feed_socket)
                continue
            else:
                expired = ((feed_socket.outbox and now - feed_socket.progress_at > STALL_SECONDS)
                           or now - feed_socket.heard_at > SILENT_SECONDS)
                if expired:
                    log.info("feed socket gone quiet; closed",
                             extra={"organization_id": feed_socket.organization_id})
            if expired:
                self._discard(feed_socket)
        self._tend_feeds(now)
        if self._stopping is not None and not self._sockets:
            self._stopping.set()
            self._stopping = None
        self._next_tick = now + (0.05 if self._stopping is not None else 1.0)

    def _tend_feeds(self, now):
        """Fill the feeds' holes older than HOLE_SECONDS; every CHECK_SECONDS, ask the
        store whether a feed misses its latest changes."""
        for organization_id, feed in self._feeds.items():
            if feed.wants_fill(now):
                self._fill(organization_id, feed)
        if now >= self._next_check:
            self._next_check = now + CHECK_SECONDS
            self._check_feeds()

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
        if feed_socket.state is not OPEN:
            self._uncount_unauthenticated()
            return  # an adoption under way is undone when it arrives (_on_adopt)
        metrics.SOCKETS.dec()
        feed = self._feeds[feed_socket.organization_id]
        feed.members.discard(feed_socket)
        feed.live.discard(feed_socket)
        if not feed.members:
            del self._feeds[feed_socket.organization_id]
        self._forget(feed_socket)

    def _forget(self, feed_socket):
        """Undo what ``adopt`` counted for a socket that is gone."""
        with self._lock:
            self._count -= 1
            self._keys[feed_socket.key_hash] -= 1
            if not self._keys[feed_socket.key_hash]:
                del self._keys[feed_socket.key_hash]
        if feed_socket.organization_id not in self._feeds and self._on_leave is not None:
            self._on_leave(feed_socket.organization_id)

    def _uncount_unauthenticated(self):
        with self._lock:
            self._unauthenticated -= 1


def _positioned(organization_id, events):
    """(position, JSON text) of change events read from the store."""
    return [(changes.position_of(organization_id, event["cursor"]), text)
            for event, text in zip(events, encode(events), strict=True)]
