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
SILENT_SECONDS, is cut off. Events about a customer that arrive after its
``customer.deleted`` (a publish after a commit can overtake the erasure's) are not
sent (Erasures).
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
import weakref

from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.utilities import LocalProtocolError

from ingest import metrics
from ingest.threads import PerProcess

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
AUTH_THREADS = 4  # per process: the threads that check auth messages against the key cache
# Events arriving within this long of the last send pass wait for the next one,
# so that under load each socket gets a few events per write, not one each.
COALESCE_SECONDS = 0.005
SENDMSG_BUFFERS = 64
ERASURE_MEMORY_SECONDS = 600  # how long a process drops late events about an erased customer
ERASURES_KEPT = 10_000

_loops = weakref.WeakSet()


def text_frame(message):
    """A server-to-client WebSocket text frame (RFC 6455 §5.2: final, unmasked)."""
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
        """Queue events (``chunk`` = their ``frames`` joined) unless the outbox is full."""
        if self.closing_until is not None:
            return
        if self.queued + len(chunk) <= OUTBOX_BYTES:
            self._admit(chunk, len(frames))
            return
        for frame in frames:
            if self.queued + len(frame) <= OUTBOX_BYTES:
                self._admit(frame, 1)
            else:
                self.dropped += 1
                metrics.DROPPED.inc()

    def _admit(self, data, count):
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
            return 1008, "nothing more is expected from the client"
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
                        return 4401, "authentication failed"
                    if self.message_bytes > MAX_AUTH_MESSAGE:
                        return 1009, "the auth message is too big"
                    self.auth_parts.append(event.data)
                if self.message_bytes > MAX_MESSAGE:
                    return 1009, "message too big"
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


class Erasures:
    """The customers erased lately, by organization, to drop the events about them
    that arrive after their ``customer.deleted``. Events are screened as the JSON
    texts they travel as: only an organization with a recent erasure pays for
    parsing them."""

    DELETED = '{"type":"customer.deleted",'

    def __init__(self):
        self._erased = collections.OrderedDict()  # (organization, customer) -> when
        self._organizations = collections.Counter()

    def screen(self, organization_id, messages):
        """``messages`` less those about a customer erased earlier."""
        if not self._organizations[organization_id]:
            if not any(self._is_deletion(message) for message in messages):
                return messages
        self._expire()
        kept = []
        for message in messages:
            event = json.loads(message)
            customer_id = event["data"].get("customerId")
            if self._is_deletion(message):
                self._remember(organization_id, event["data"]["id"])
            elif customer_id is not None and (organization_id, customer_id) in self._erased:
                continue
            kept.append(message)
        return kept

    def _is_deletion(self, message):
        prefix = self.DELETED if isinstance(message, str) else self.DELETED.encode()
        return message.startswith(prefix)

    def _remember(self, organization_id, customer_id):
        key = (organization_id, customer_id)
        if key not in self._erased:
            self._organizations[organization_id] += 1
        self._erased[key] = time.monotonic()
        self._erased.move_to_end(key)
        if len(self._erased) > ERASURES_KEPT:
            self._forget_oldest()

    def _expire(self):
        horizon = time.monotonic() - ERASURE_MEMORY_SECONDS
        while self._erased and next(iter(self._erased.values())) < horizon:
            self._forget_oldest()

    def _forget_oldest(self):
        (organization_id, _), _ = self._erased.popitem(last=False)
        self._organizations[organization_id] -= 1
        if not self._organizations[organization_id]:
            del self._organizations[organization_id]


class FanOut:
    """This process's feed sockets and the thread that serves them.

    ``greet``, ``adopt``, ``dispatch``, ``notify``, ``close_keys`` and ``close_all``
    may be called from any thread; they queue a command for the loop and return.
    """

    def __init__(self, on_leave=None):
        self._on_leave = on_leave  # called with an organization id when its last socket goes
        self._inbox = collections.deque()
        self._lock = threading.Lock()  # guards what other threads read: counts and keys
        self._count = 0  # sockets adopted
        self._unauthenticated = 0  # sockets greeted and not yet adopted or gone
        self._keys = collections.Counter()
        self._loop = PerProcess(("feed-fanout", self._run), setup=self._set_up)
        self._woken = False
        _loops.add(self)

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

    def dispatch(self, organization_id, messages):
        """Send ``messages`` (serialised events, str or bytes) to the organization's sockets."""
        if self._count:
            self._post(("events", str(organization_id), messages))

    def notify(self, organization_id, kind, **fields):
        """Send a notice (e.g. a gap) to every socket of the organization."""
        if self._count:
            self._post(("notice", str(organization_id), notice_frame(kind, **fields)))

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

    def key_hashes(self):
        with self._lock:
            return {key for key, count in self._keys.items() if count}

    def socket_count(self):
        return self._count

    def _post(self, command):
        self._loop.start()
        self._inbox.append(command)
        if not self._woken:
            self._woken = True
            try:
                self._waker.send(b"\0")
            except BlockingIOError:
                pass  # already full of wake-ups

    def _set_up(self):
        """The loop's state, made in the process that runs the loop."""
        self._selector = selectors.DefaultSelector()
        self._wakeup, self._waker = socket.socketpair()
        self._wakeup.setblocking(False)
        self._waker.setblocking(False)
        self._selector.register(self._wakeup, selectors.EVENT_READ, None)
        self._sockets = set()
        self._erasures = Erasures()
        self._auth_pool = concurrent.futures.ThreadPoolExecutor(AUTH_THREADS, "feed-auth")
        self._by_org = collections.defaultdict(set)
        self._next_ping = time.monotonic() + PING_SECONDS
        self._next_tick = time.monotonic() + 1
        self._stopping = None
        self._closing = None  # (code, reason) for every socket, once the process stops
        self._pending = set()  # sockets with events queued since the last flush pass
        self._flushed_at = 0.0
        self._flush_at = None  # when the next pass is due, if one is

    # The loop thread ----------------------------------------------------------

    def _run(self):
        while True:
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
        self._by_org[feed_socket.organization_id].add(feed_socket)
        if not feed_socket.registered and not self._register(feed_socket):
            return
        if self._closing is None:
            feed_socket.control(greeting)
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
            self._post(("refuse", feed_socket, 1011, "unexpected error"))

    def _on_events(self, touched, organization_id, messages):
        subscribers = self._by_org.get(organization_id)
        if not subscribers:
            return
        messages = self._erasures.screen(organization_id, messages)
        if not messages:
            return
        frames = [text_frame(message) for message in messages]
        chunk = frames[0] if len(frames) == 1 else b"".join(frames)
        for feed_socket in subscribers:
            feed_socket.push(chunk, frames)
        touched.update(subscribers)

    def _on_notice(self, touched, organization_id, frame):
        for feed_socket in self._by_org.get(organization_id, ()):
            feed_socket.control(frame)
            touched.add(feed_socket)

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
            close = (1002, "protocol error")
        if close:
            feed_socket.begin_close(*close, time.monotonic())
        message = feed_socket.take_auth_message()
        if message is not None:
            self._auth_pool.submit(self._check, feed_socket, message)
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
                feed_socket.begin_close(4401, "authentication timed out", now)
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
        if self._stopping is not None and not self._sockets:
            self._stopping.set()
            self._stopping = None
        self._next_tick = now + (0.05 if self._stopping is not None else 1.0)

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
        subscribers = self._by_org[feed_socket.organization_id]
        subscribers.discard(feed_socket)
        if not subscribers:
            del self._by_org[feed_socket.organization_id]
        self._forget(feed_socket)

    def _forget(self, feed_socket):
        """Undo what ``adopt`` counted for a socket that is gone."""
        with self._lock:
            self._count -= 1
            self._keys[feed_socket.key_hash] -= 1
            if not self._keys[feed_socket.key_hash]:
                del self._keys[feed_socket.key_hash]
        if feed_socket.organization_id not in self._by_org and self._on_leave is not None:
            self._on_leave(feed_socket.organization_id)

    def _uncount_unauthenticated(self):
        with self._lock:
            self._unauthenticated -= 1


def close_all(code=1001, reason="server restarting"):
    """Close every feed socket of this process (a worker stopping), so that each
    browser reconnects at once, to another worker."""
    for loop in list(_loops):
        loop.close_all(code, reason)
