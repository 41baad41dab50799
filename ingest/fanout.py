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
ingestion. A browser that falls behind has events dropped for it alone; one that
makes no progress for STALL_SECONDS, or sends nothing (not even a pong) for
SILENT_SECONDS, is cut off.

Every event carries its position in its organization's change feed (DESIGN §16),
and each socket is sent its organization's changes in position order, each once,
live or caught up from the store. The store is read on the fan-out's work threads
(the auth threads), never on the loop thread.

The parts, each read on its own:
- ``FanOut`` (here): the loop thread and the only class callers use. Its public
  methods may be called from any thread: they queue a command (a handler of the
  loop and its arguments) and wake the loop, which runs the commands in order,
  then sends what they queued to every socket touched, in one pass.
- ``OrgFeed`` (ingest/feeds.py): one organization's changes in position order.
- ``FeedSocket`` and ``Sockets`` (ingest/sockets.py): one socket's state, outbox and
  flow control; the sockets' reads, writes and timers.
- ``CatchUp`` (ingest/catchup.py): the store reads, on the work threads, whose
  results come back to the loop as commands.
"""
import collections
import concurrent.futures
import logging
import socket
import threading
import time

from wsproto.frame_protocol import CloseReason

from ingest import metrics
from ingest.catchup import CatchUp
from ingest.feeds import HOLE_SECONDS, OrgFeed
from ingest.sockets import GREETING, NEW, OPEN, Refused, Sockets
from ingest.threads import Threads

log = logging.getLogger(__name__)

MAX_SOCKETS = 10_000  # per process; more are refused with 1013
MAX_UNAUTHENTICATED = 5_000  # per process: sockets waiting for their auth message
WORK_THREADS = 4  # per process: the threads that check auth messages and read the store
# Events arriving within this long of the last send pass wait for the next one,
# so that under load each socket gets a few events per write, not one each.
COALESCE_SECONDS = 0.005


class FanOut:
    """This process's feed sockets and the thread that serves them.

    ``greet``, ``adopt``, ``dispatch``, ``resync``, ``close_keys`` and ``close_all``
    may be called from any thread; they queue a command for the loop and return.
    """

    def __init__(self, on_leave=None):
        self._on_leave = on_leave  # called with an organization id when its last socket goes
        self._inbox = collections.deque()  # commands: (handler, *args), run on the loop thread
        self._lock = threading.Lock()  # guards what other threads read: counts and keys
        self._count = 0  # sockets adopted
        self._unauthenticated = 0  # sockets greeted and not yet adopted or gone
        self._keys = collections.Counter()
        self._loop = Threads(("feed-fanout", self._run), wake=self._wake)
        self._woken = False
        self._wakeup, self._waker = socket.socketpair()
        self._wakeup.setblocking(False)
        self._waker.setblocking(False)
        self._pool = concurrent.futures.ThreadPoolExecutor(WORK_THREADS, "feed-work")
        self._feeds = {}  # organization -> OrgFeed, while it has sockets here
        self._catch_up = CatchUp(self._feeds, self._pool, self._post)
        self._sockets = Sockets(self._wakeup, on_message=self._to_auth_thread, on_room=self._catch_up.socket,
                                on_gone=self._gone)
        self._next_tick = time.monotonic() + 1
        self._stopping = None
        self._closing = None  # (code, reason) for every socket, once the process stops
        self._pending = set()  # sockets with events queued since the last flush pass
        self._flushed_at = 0.0
        self._flush_at = None  # when the next pass is due, if one is

    def start(self):
        self._loop.start()

    def stop(self):
        """Close every socket (1001: browsers reconnect, to another worker) and end
        the loop and its work threads."""
        self.close_all(CloseReason.GOING_AWAY, "server restarting")
        self._loop.stop()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._sockets.close()  # with those close_all did not reach: not yet authenticated
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
        self._post((self._on_greet, feed_socket, authenticate))
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
        self._post((self._on_adopt, feed_socket, greeting))
        return True

    def dispatch(self, organization_id, items):
        """Send ``items`` ((position, serialised event as str or bytes)) to the
        organization's sockets, in position order."""
        if self._count:
            self._post((self._on_events, str(organization_id), items))

    def resync(self, organization_id):
        """The bus may have lost events of the organization: read the store now."""
        if self._count:
            self._post((self._on_resync, str(organization_id)))

    def close_keys(self, key_hashes, code, reason):
        """Close the sockets authenticated with any of ``key_hashes``."""
        self._post((self._on_close_keys, frozenset(key_hashes), code, reason))

    def close_all(self, code, reason, timeout=2.0):
        """Close every socket (a worker stopping) and wait until that is done."""
        if not self._count or not self._loop.running:
            return
        done = threading.Event()
        self._post((self._on_close_all, code, reason, done))
        done.wait(timeout)

    def start_position(self, organization_id):
        """Where a socket of the organization without a cursor starts: CatchUp's
        ``start_position``. Called on an auth thread."""
        return self._catch_up.start_position(organization_id)

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

    def _check(self, feed_socket, message):
        """On an auth thread: have ``message`` checked; refuse the socket if it fails."""
        try:
            feed_socket.authenticate(feed_socket, message)
        except Refused as refused:
            self._post((self._on_refuse, feed_socket, refused.code, refused.reason))
        except Exception:
            log.exception("feed socket authentication failed")
            self._post((self._on_refuse, feed_socket, CloseReason.INTERNAL_ERROR, "unexpected error"))

    # The loop thread ----------------------------------------------------------

    def _run(self):
        while not self._loop.stopping.is_set():
            try:
                self._step()
            except Exception:  # the loop must outlive any one socket's surprise
                log.exception("feed fan-out error")

    def _step(self):
        wake_at = self._next_tick if self._flush_at is None else min(self._next_tick, self._flush_at)
        for feed_socket, mask in self._sockets.ready(max(0.0, wake_at - time.monotonic())):
            if feed_socket is None:
                self._take_commands()
            else:
                self._sockets.serve(feed_socket, mask)
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
            handler, *args = self._inbox.popleft()
            try:
                handler(touched, *args)
            except Exception:
                log.exception("feed fan-out command failed", extra={"command": handler.__name__})
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
                self._sockets.flush(feed_socket)
        self._flushed_at, self._flush_at = now, None

    def _tick(self):
        now = time.monotonic()
        self._sockets.tick(now)
        self._catch_up.tend(now)
        if self._stopping is not None and not self._sockets:
            self._stopping.set()
            self._stopping = None
        self._next_tick = now + (0.05 if self._stopping is not None else 1.0)

    def _to_auth_thread(self, feed_socket, message):
        self._pool.submit(self._check, feed_socket, message)

    def _gone(self, feed_socket):
        """Undo what was counted for a socket that Sockets dropped."""
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

    # The loop thread: the commands, each given the set of sockets to flush after ----

    def _on_greet(self, touched, feed_socket, authenticate):
        feed_socket.authenticate = authenticate
        if self._sockets.register(feed_socket) and self._closing is not None:
            feed_socket.begin_close(*self._closing, time.monotonic())
            touched.add(feed_socket)

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
        if not feed_socket.registered and not self._sockets.register(feed_socket):
            return
        if self._closing is None:
            feed_socket.control(greeting)
            self._catch_up.socket(feed_socket)
        else:  # authenticated while this process stops: off to another one
            feed_socket.begin_close(*self._closing, time.monotonic())
        touched.add(feed_socket)

    def _new_feed(self, feed_socket):
        feed = self._feeds[feed_socket.organization_id] = OrgFeed()
        feed.start(feed_socket.start)
        return feed

    def _on_refuse(self, touched, feed_socket, code, reason):
        if not feed_socket.discarded:
            feed_socket.begin_close(code, reason, time.monotonic())
            touched.add(feed_socket)

    def _on_events(self, touched, organization_id, items):
        feed = self._feeds.get(organization_id)
        if feed is not None:
            touched.update(feed.arrived(items, time.monotonic()))
            if feed.hole_since is not None:  # wake up to fill it if it lasts
                self._next_tick = min(self._next_tick, feed.hole_since + HOLE_SECONDS)

    def _on_resync(self, touched, organization_id):
        feed = self._feeds.get(organization_id)
        if feed is not None and not feed.filling:
            self._catch_up.fill(organization_id, feed)

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
