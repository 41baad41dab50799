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

The parts, in this order, each read on its own:
- ``FanOut``: the loop thread and the only class callers use. Its public
  methods may be called from any thread: they queue a command (a handler of the
  loop and its arguments) and wake the loop, which runs the commands in order,
  then sends what they queued to every socket touched, in one pass.
- ``OrgFeed``: one organization's changes in position order.
- ``CatchUp``: the store reads, on the work threads, whose
  results come back to the loop as commands.
- ``FeedSocket`` and ``Sockets``: one socket's state, outbox and
  flow control; the sockets' reads, writes and timers.

One event's way through them: ``FanOut.dispatch`` (any thread) queues it; the
loop's ``_take_commands`` runs ``_on_events``, which hands it to its
organization's ``OrgFeed.arrived``; ``_deliver`` puts what is due, in position
order, into each socket's outbox (``FeedSocket.push``); ``_flush_pending`` then
has ``Sockets.flush`` write every touched socket.
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
from ingest.threads import Threads
from models import connection

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


# ============================================================================
# One organization's live changes as a process delivers them (DESIGN §8, §16): in
# position order, each once, whatever order the bus brings them in.
#
# Changes of an organization commit in position order (ingest/changes.py), but
# their publishes race: a worker's publish can reach the bus after a later one
# of another worker, and a publish can be lost (Redis away, a stream trimmed).
# So a change that arrives ahead of its predecessor is held; once the hole is
# older than HOLE_SECONDS the fan-out reads the missing positions from the store,
# where every position below one already committed is visible. A position the
# store no longer has (its interaction was erased since) is skipped. Recent
# frames are kept, so that a socket that resumes or fell behind catches up from
# memory when it can, from the store otherwise (CatchUp).
#
# Only the fan-out's loop thread touches an OrgFeed.

HOLE_SECONDS = 0.2  # how long a change may wait for its predecessor before the store is read
RECENT_BYTES = 1024 * 1024  # frames kept per organization for sockets catching up
RECENT_FRAMES = 5000
MAX_HELD = 10_000  # changes held ahead of a hole; beyond, they are read from the store with it


class OrgFeed:
    def __init__(self):
        self.position = None  # the last position delivered
        self.held = {}  # position -> message, arrived ahead of a hole
        self.hole_since = None
        self.filling = False  # a read of the store for this feed is under way
        self.ahead = None  # the store's position when the last check found it ahead of ours
        self.members = set()  # every socket of the organization in this process
        self.live = set()  # those in step with the feed
        self._recent = collections.deque()  # (position, frame)
        self._recent_bytes = 0

    def arrived(self, items, now):
        """Take ``items`` ((position, message)) from the bus and deliver what is due;
        returns the sockets to flush."""
        return self._deliver(self.take(items, now))

    def filled(self, items, last, now):
        """Take what the store had (``fill``) and deliver what is due; returns the
        sockets to flush."""
        return self._deliver(self.fill(items, last, now))

    def take(self, items, now):
        """Hold ``items`` ((position, message)); returns those now due, in order."""
        for position, message in items:
            if position > self.position and (len(self.held) < MAX_HELD or position == self.position + 1):
                self.held.setdefault(position, message)
        return self._due(now)

    def start(self, position):
        """Start after ``position``: the store's position when the first socket came."""
        self.position = position

    def fill(self, items, last, now):
        """What the store has after ``position`` up to ``last``: ``items`` ((position,
        message)); positions it lacks up to ``last`` are gone. Returns those now due."""
        for position, message in items:
            if position > self.position:
                self.held.setdefault(position, message)
        due = [(position, self.held.pop(position)) for position in sorted(self.held) if position <= last]
        self.position = max(self.position, last)
        return due + self._due(now)

    def _due(self, now):
        due = []
        while self.position + 1 in self.held:
            self.position += 1
            due.append((self.position, self.held.pop(self.position)))
        self.hole_since = (self.hole_since or now) if self.held else None
        return due

    def _deliver(self, due):
        """Frame the changes ``due`` ((position, message), in order) once and queue them
        for the sockets in step with the feed; one that has no room left falls behind
        and catches up. Returns the sockets to flush."""
        if not due:
            return ()
        frames = framed(due)
        chunk = frames[0][1] if len(frames) == 1 else b"".join(frame for _, frame in frames)
        for feed_socket in list(self.live):
            if feed_socket.position >= frames[0][0]:  # it caught up past some of them
                fresh = [pair for pair in frames if pair[0] > feed_socket.position]
                complete = feed_socket.push(None, fresh) if fresh else True
            else:
                complete = feed_socket.push(chunk, frames)
            if not complete:
                self.live.discard(feed_socket)
        self._remember(frames)
        return self.members

    def wants_fill(self, now):
        return not self.filling and self.hole_since is not None and now - self.hole_since >= HOLE_SECONDS

    def _remember(self, frames):
        self._recent.extend(frames)
        self._recent_bytes += sum(len(frame) for _, frame in frames)
        while len(self._recent) > RECENT_FRAMES or self._recent_bytes > RECENT_BYTES:
            self._recent_bytes -= len(self._recent.popleft()[1])

    def recent_after(self, position):
        """The frames delivered after ``position`` ((position, frame)), or None if some
        are no longer kept."""
        if self._recent and self._recent[0][0] > position + 1:
            return None
        if not self._recent and position < self.position:
            return None
        return [(p, frame) for p, frame in self._recent if p > position]


# ============================================================================
# What the fan-out reads from the store (DESIGN §8, §16): where a socket starts,
# the changes a socket or a feed missed, and whether a feed is behind.
#
# Every socket is sent its organization's changes in position order, each once
# (OrgFeed): the changes after the cursor it resumed from (``after`` in its
# auth message), then live ones. A socket that resumes, or whose outbox overflowed
# and has drained since, catches up from its feed's recent frames, else from the
# store a page at a time while its outbox has room, then joins the live feed. A
# feed's hole that lasts HOLE_SECONDS is filled from the store, and so is a feed
# whose organization's events the bus lost (``FanOut.resync``, or the store found
# ahead of it for a whole CHECK_SECONDS).
#
# ``CatchUp`` starts these reads on the fan-out loop's thread and runs them on its
# work threads, which alone read the store; each read's result comes back to the
# loop thread as a command posted to the loop (``post``), whose handler (``_on_...``)
# applies it there. ``start_position`` is called on a work thread, by a socket's
# authentication.

CHECK_SECONDS = 2  # how often the store is asked whether a feed missed its latest changes
START_SECONDS = 1  # how long a read of an organization's last position serves new sockets
MAX_STARTS = 10_000  # organizations whose last position is kept; beyond, all are forgotten
# Changes read from the store at a time, for a socket catching up or a feed's hole: a
# page of the largest events (26 KB) stays a few MB, and a socket takes a page only
# while its outbox has room.
STORE_PAGE = 200


class CatchUp:
    """The store reads of a fan-out whose feeds are ``feeds`` (organization -> OrgFeed),
    run on ``pool``; ``post(command)`` hands a result to the loop thread."""

    def __init__(self, feeds, pool, post):
        self._feeds = feeds
        self._pool = pool
        self._post = post
        self._starts = {}  # organization -> (its last position in the store, when read)
        self._starts_lock = threading.Lock()
        self._next_check = time.monotonic() + CHECK_SECONDS

    def start_position(self, organization_id):
        """The organization's last position in the store, read at most once every
        START_SECONDS per process (an older one only means a socket that asked for
        "from now on" starts a little earlier): where a socket without a cursor
        starts. Called on a work thread, so a reconnect storm costs one query."""
        now = time.monotonic()
        with self._starts_lock:
            known = self._starts.get(organization_id)
        if known is not None and now - known[1] < START_SECONDS:
            return known[0]
        with connection():
            position = changes.stream(organization_id)[0]
        with self._starts_lock:
            if len(self._starts) >= MAX_STARTS:
                self._starts.clear()
            self._starts[organization_id] = (position, now)
        return position

    # The loop thread ------------------------------------------------------------

    def socket(self, feed_socket):
        """Bring an open socket in step with its feed: from recent frames, or a page
        from the store at a time while its outbox has room."""
        feed = self._feeds[feed_socket.organization_id]
        if feed_socket.reading or feed_socket in feed.live:
            return
        if feed_socket.position is None:
            feed_socket.position = feed_socket.starts_after()
        recent = feed.recent_after(feed_socket.position)
        if recent is not None and (not recent or feed_socket.push(None, recent)):
            feed.live.add(feed_socket)
        elif feed_socket.has_room():
            feed_socket.reading = True
            self._work(self._read_page, feed_socket, feed_socket.position,
                       failed=lambda: setattr(feed_socket, "reading", False))

    def fill(self, organization_id, feed):
        """Read the changes the feed misses from the store."""
        feed.filling = True
        self._work(self._read_fill, organization_id, feed.position, failed=lambda: setattr(feed, "filling", False))

    def tend(self, now):
        """Fill the feeds' holes older than HOLE_SECONDS; every CHECK_SECONDS, ask the
        store, for every feed at once, whether changes were committed that never
        arrived (a publish lost at the tail)."""
        for organization_id, feed in self._feeds.items():
            if feed.wants_fill(now):
                self.fill(organization_id, feed)
        if now >= self._next_check:
            self._next_check = now + CHECK_SECONDS
            if self._feeds:
                self._work(self._read_positions, list(self._feeds))

    def _work(self, read, *args, failed=None):
        """Run ``read(*args)`` on a work thread and post the command it returns; if it
        raises, ``failed()`` runs on the loop thread instead."""
        def run():
            try:
                self._post(read(*args))
            except Exception:
                log.warning("feed store read failed; tried again later", exc_info=True)
                self._post((self._on_work_failed, failed))
        self._pool.submit(run)

    # Work threads: each read returns the command that applies its result ----------

    def _read_page(self, feed_socket, after):
        try:
            items, last = _read(feed_socket.organization_id, after)
        except changes.ExpiredCursor as expired:
            return self._on_expired, feed_socket, expired.oldest
        return self._on_page, feed_socket, items, last

    def _read_fill(self, organization_id, after):
        try:
            items, last = _read(organization_id, after)
        except changes.ExpiredCursor as expired:  # retention went past it: go on from what is kept
            items, last = [], changes.position_of(organization_id, expired.oldest)
        return self._on_filled, organization_id, items, last

    def _read_positions(self, organization_ids):
        with connection():
            return self._on_checked, changes.positions(organization_ids)

    # The loop thread: the results -----------------------------------------------

    def _on_page(self, touched, feed_socket, items, last):
        feed_socket.reading = False
        feed = self._feeds.get(feed_socket.organization_id)
        if feed_socket.discarded or feed is None:
            return
        if last == feed_socket.position:  # the store has nothing after it: what follows comes live
            feed.live.add(feed_socket)
        frames = framed(items)
        if frames and not feed_socket.push(None, frames):
            return  # it goes on once its outbox has drained (Sockets.flush)
        feed_socket.position = max(feed_socket.position, last)  # what the store lacks up to last is gone
        self.socket(feed_socket)
        touched.add(feed_socket)

    def _on_expired(self, touched, feed_socket, oldest):
        feed_socket.reading = False
        feed_socket.begin_close(Close.CURSOR_EXPIRED, "cursor expired; oldest: " + oldest, time.monotonic())
        touched.add(feed_socket)

    def _on_filled(self, touched, organization_id, items, last):
        feed = self._feeds.get(organization_id)
        if feed is not None:
            feed.filling = False
            before = feed.position
            touched.update(feed.filled(items, last, time.monotonic()))
            if feed.hole_since is not None and feed.position > before:
                self.fill(organization_id, feed)  # still short of what it holds: the next page now

    def _on_checked(self, touched, positions):
        for organization_id, position in positions.items():
            feed = self._feeds.get(organization_id)
            if feed is None:
                continue
            if feed.ahead is not None and feed.position < feed.ahead and not feed.filling:
                self.fill(organization_id, feed)  # still short of it a check later: lost, not late
            feed.ahead = position if position > feed.position else None

    def _on_work_failed(self, touched, failed):
        if failed is not None:
            failed()


def _read(organization_id, after):
    """A page of the organization's changes after position ``after``: ((position, JSON
    text)), and the last position read; ExpiredCursor if they are no longer kept.
    ``changes.read`` takes a connection of the database it reads (the replica's or
    the primary's) for the read."""
    events, last = changes.read(organization_id, after, STORE_PAGE)
    return [(changes.position_of(organization_id, event["cursor"]), text)
            for event, text in zip(events, encode(events), strict=True)], last


# ============================================================================
# A feed socket: its state and its I/O (DESIGN §8, §12), on the fan-out's loop
# thread only (an auth thread sets ``after``, ``start`` and ``authenticated`` on a
# FeedSocket before it is adopted).
#
# ``FeedSocket``: one socket's wsproto connection, auth message, outbox and flow
# control, without I/O; the frames for outboxes are made here too. An outbox is
# bounded in bytes: a browser that falls behind has events dropped for it alone, is
# told {"type": "dropped", "count": N} and catches up (CatchUp). What a
# client may send after its auth message is bounded too (INBOUND_BURST, INBOUND_RATE).
#
# ``Sockets``: the selector over every socket the loop took over (and its wake-up
# socket); it reads into each FeedSocket, sends its outbox without blocking, pings,
# and cuts off a socket that is gone: closed by its client, no progress for
# STALL_SECONDS, silent (not even a pong) for SILENT_SECONDS, no auth message within
# AUTH_TIMEOUT, or a close handshake longer than CLOSE_SECONDS. A socket's auth
# message, room in its outbox and its end go to the fan-out's callables.

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
