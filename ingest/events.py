"""Live events (DESIGN §8): the bus that carries them from whoever publishes
(a web worker's writer, a consumer) to the fan-out of every web process.

``bus.publish({organization_id: [(position, event)]})`` is all the workflow and
the tasks know: one call for everything a commit (or an analysis task) produced,
each event with its position in the organization's change feed (DESIGN §16).
The fan-out delivers them in that order, and reads from the store whatever the
bus lost, so a lost event is a delay, never a hole.

- ``memory://`` (one process, the dev server): publishing hands the events to
  this process's fan-out.
- ``redis://``: one Redis stream per organization. A listener thread in each web
  process reads the streams of the organizations it has sockets for and hands
  what it reads to its fan-out. A stream is a short replay log, not a fire-and-
  forget channel, so a listener that loses its connection resumes where it was.
  Whatever the bus loses, the fan-out reads from the store at once: when a
  listener finds entries trimmed away before it read them (each entry carries
  its organization's sequence number), when Redis restarted under it, or when a
  publisher failed to publish (it writes a gap marker into the stream with its
  next successful publish).

Redis memory is bounded in bytes (this Redis also holds the rate limits and may
hold the queue): one script per publish (APPEND) appends the entry and trims the
organization's stream, oldest first, to EVENTS_STREAM_BYTES (its newest entry
always stays), then, while all streams together hold more than
EVENTS_TOTAL_BYTES, empties the streams published to least recently. So one tenant's volume trims only its own
stream until Redis as a whole is at its bound.
"""
import collections
import logging
import threading

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from ingest.config import DEFAULTS
from ingest.fanout import FanOut, encode
from ingest.threads import Threads

log = logging.getLogger(__name__)

STREAM_PREFIX = "ingest:events:"
SIZES_KEY = "ingest:events-bytes"  # organization -> bytes its stream holds; "*" -> all of them
SEQUENCES_KEY = "ingest:events-sequence"  # organization -> its newest entry's sequence number
RECENT_KEY = "ingest:events-recent"  # organizations by their last publish (ms)
STREAM_BYTES = DEFAULTS["EVENTS_STREAM_BYTES"]  # per organization, for listeners that lag
TOTAL_BYTES = DEFAULTS["EVENTS_TOTAL_BYTES"]  # every organization's stream together
STREAM_TTL = 24 * 3600  # an organization's stream is dropped after a day with no publish
READ_COUNT = 100  # entries per stream and read: a busy organization never starves the others
READ_BLOCK_MS = 250  # also how soon a listener starts reading a newly watched organization
LISTENER_NAME = "ingest-events-listener"
GAP_FIELD = b"gap"
EVENTS_FIELD = b"e"
POSITIONS_FIELD = b"p"
SEQUENCE_FIELD = b"s"
NO_POSITION = (b"0-0", None)  # before the first entry of a stream

# KEYS: SIZES_KEY, SEQUENCES_KEY, RECENT_KEY. ARGV: STREAM_PREFIX, organization,
# field, value, the events' positions, STREAM_BYTES, TOTAL_BYTES, STREAM_TTL. Streams are named from the
# prefix inside the script (a standalone Redis, as EVENTS_URL is).
APPEND = """
local sizes, sequences, recent = KEYS[1], KEYS[2], KEYS[3]
local prefix, org, field, value, positions = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local stream_limit, total_limit, ttl = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

local function held(o) return tonumber(redis.call('HGET', sizes, o) or '0') end
local function release(o, n)
  redis.call('HINCRBY', sizes, o, -n)
  redis.call('HINCRBY', sizes, '*', -n)
end
local function empty(o)
  redis.call('DEL', prefix .. o)
  release(o, held(o))
  redis.call('HDEL', sizes, o)
  redis.call('HDEL', sequences, o)
  redis.call('ZREM', recent, o)
end
local function trim(o, limit)
  local left = held(o)
  while left > limit do
    local oldest = redis.call('XRANGE', prefix .. o, '-', '+', 'COUNT', 2)
    if #oldest < 2 then break end
    local fields, size = oldest[1][2], 0
    for i = 1, #fields, 2 do if fields[i] == 'n' then size = tonumber(fields[i + 1]) end end
    redis.call('XDEL', prefix .. o, oldest[1][1])
    release(o, size)
    left = left - size
  end
end

-- Streams about to expire unpublished leave the accounts before their keys go.
for _, o in ipairs(redis.call('ZRANGEBYSCORE', recent, '-inf', now - (ttl - 3600) * 1000)) do
  empty(o)
end
local size = string.len(value)
local sequence = redis.call('HINCRBY', sequences, org, 1)
local id = redis.call('XADD', prefix .. org, '*', field, value, 'p', positions, 'n', size, 's', sequence)
redis.call('HINCRBY', sizes, org, size)
redis.call('HINCRBY', sizes, '*', size)
redis.call('ZADD', recent, now, org)
trim(org, stream_limit)
local over = held('*') - total_limit
while over > 0 do
  local o = redis.call('ZRANGE', recent, 0, 0)[1]
  if o == org then
    trim(org, held(org) - over)
    break
  end
  empty(o)
  over = held('*') - total_limit
end
for _, key in ipairs({prefix .. org, sizes, sequences, recent}) do redis.call('EXPIRE', key, ttl) end
return id
"""



class MemoryBus:
    """One process: publishing is dispatching to this process's fan-out."""

    def __init__(self):
        self.fanout = FanOut(on_leave=self._left)

    def start(self):
        self.fanout.start()

    def stop(self):
        """Close this process's sockets (1001: they reconnect elsewhere) and end its threads."""
        self.fanout.stop()

    def publish(self, events_by_organization):
        for organization_id, events in events_by_organization.items():
            positions = [position for position, _ in events]
            self.fanout.dispatch(organization_id, list(zip(positions, encode([e for _, e in events]), strict=True)))

    def held_bytes(self):
        """Bytes held for listeners that lag: none here (for /metrics)."""
        return None

    def attach(self, feed_socket, greeting):
        """Serve ``feed_socket`` its organization's events, after ``greeting``.
        Returns False if this process cannot take another socket."""
        self._joined(feed_socket.organization_id)
        if self.fanout.adopt(feed_socket, greeting):
            return True
        self._left(feed_socket.organization_id)
        return False

    def _joined(self, organization_id):
        """A socket of ``organization_id`` is about to be adopted."""

    def _left(self, organization_id):
        """The last socket of ``organization_id`` in this process is gone."""


class RedisBus(MemoryBus):
    """Redis streams between processes (see the module docstring)."""

    def __init__(self, url, stream_bytes=STREAM_BYTES, total_bytes=TOTAL_BYTES):
        super().__init__()
        self._url = url
        self._limits = (stream_bytes, total_bytes)
        # A publish whose connection drops is tried again on a new one (at worst an
        # event is then delivered twice; the page keeps one row per id).
        self._redis = redis.Redis.from_url(
            url, socket_timeout=2, socket_connect_timeout=2,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.01), 3),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError])
        self._append_script = self._redis.register_script(APPEND)
        self._lock = threading.Lock()
        self._watchers = collections.Counter()  # organization -> its sockets here
        # organization -> (last stream id read, its sequence number or None), None: unknown
        self._positions = {}
        self._failed = set()  # organizations whose events this process failed to publish
        self._listener = Threads(("events-listener", self._listen))

    def start(self):
        super().start()
        self._listener.start()

    def stop(self):
        self._listener.stop()
        super().stop()
        self._redis.close()

    def publish(self, events_by_organization):
        """One pipelined round trip: an APPEND per organization (after a gap marker
        where an earlier publish of this process failed)."""
        lost = self._failed & set(events_by_organization)
        entries = [(str(organization_id), organization_id in lost, _entry(events))
                   for organization_id, events in events_by_organization.items()]
        try:
            try:
                self._append(entries)
            except redis.ConnectionError:
                # redis-py retries a command on a new connection, but not taking
                # from its pool a connection that Redis closed meanwhile (as it
                # does to clients it kills): that is tried once more here.
                self._append(entries)
        except redis.RedisError:
            self._failed |= set(events_by_organization)
            raise
        self._failed -= lost

    def _append(self, entries):
        pipe = self._redis.pipeline(transaction=False)
        for organization_id, after_gap, (positions, text) in entries:
            if after_gap:
                self._append_to(pipe, organization_id, GAP_FIELD, b"1", b"")
            self._append_to(pipe, organization_id, EVENTS_FIELD, text, positions)
        pipe.execute()

    def _append_to(self, pipe, organization_id, field, value, positions):
        self._append_script(keys=[SIZES_KEY, SEQUENCES_KEY, RECENT_KEY],
                            args=[STREAM_PREFIX, organization_id, field, value, positions, *self._limits,
                                  STREAM_TTL], client=pipe)

    def held_bytes(self):
        """Bytes the streams of every organization hold (for /metrics)."""
        return int(self._redis.hget(SIZES_KEY, "*") or 0)

    def _joined(self, organization_id):
        with self._lock:
            self._watchers[organization_id] += 1
            if organization_id in self._positions:
                return
        position = self._latest(self._redis, organization_id)
        with self._lock:
            if self._watchers[organization_id]:
                self._positions.setdefault(organization_id, position)

    def _left(self, organization_id):
        with self._lock:
            self._watchers[organization_id] -= 1
            if self._watchers[organization_id] <= 0:
                del self._watchers[organization_id]
                self._positions.pop(organization_id, None)

    @staticmethod
    def _latest(client, organization_id):
        """The position of the organization's newest entry: reading resumes after it.
        None if Redis cannot say (the listener then starts afresh with a gap)."""
        try:
            newest = client.xrevrange(STREAM_PREFIX + organization_id, count=1)
        except redis.RedisError:
            return None
        return (newest[0][0], _sequence(newest[0][1])) if newest else NO_POSITION

    def _listen(self):
        client, run_id, delay = None, None, 0.1
        while not self._listener.stopping.is_set():
            try:
                if client is None:
                    client = redis.Redis.from_url(self._url, socket_connect_timeout=2,
                                                  socket_timeout=READ_BLOCK_MS / 1000 + 5)
                    client.client_setname(LISTENER_NAME)
                    restarted = client.info("server")["run_id"]
                    if run_id is not None and restarted != run_id:
                        self._lost_everything(client)
                    run_id = restarted
                self._read(client)
                delay = 0.1
            except (redis.RedisError, OSError):
                log.warning("event listener lost Redis; reconnecting", exc_info=True)
                client = None
                self._listener.stopping.wait(delay)
                delay = min(delay * 2, 5)
        if client is not None:
            client.close()

    def _read(self, client):
        with self._lock:
            unknown = [org for org, position in self._positions.items() if position is None]
        for organization_id in unknown:
            self._restart(client, organization_id)
        with self._lock:
            streams = {STREAM_PREFIX + org: position[0] for org, position in self._positions.items()}
        if not streams:
            self._listener.stopping.wait(READ_BLOCK_MS / 1000)
            return
        for key, entries in client.xread(streams, count=READ_COUNT, block=READ_BLOCK_MS) or ():
            organization_id = key.decode()[len(STREAM_PREFIX):]
            with self._lock:
                if organization_id not in self._positions:
                    continue  # its last socket left meanwhile
                sequence = self._positions[organization_id][1]
                self._positions[organization_id] = (entries[-1][0], _sequence(entries[-1][1]))
            self._deliver(organization_id, entries, sequence)

    def _deliver(self, organization_id, entries, sequence):
        """Dispatch what ``entries`` carry; ``sequence``: that of the entry read before
        them, to tell whether some were trimmed away unread (then the fan-out reads
        the store)."""
        items = []
        for _, fields in entries:
            if _lost(fields, sequence):
                self.fanout.resync(organization_id)
            sequence = _sequence(fields)
            if EVENTS_FIELD in fields:
                positions = map(int, fields[POSITIONS_FIELD].split(b","))
                items.extend(zip(positions, fields[EVENTS_FIELD].split(b"\n"), strict=True))
        if items:
            self.fanout.dispatch(organization_id, items)

    def _restart(self, client, organization_id):
        """Start reading ``organization_id`` afresh, telling its sockets of the gap."""
        position = self._latest(client, organization_id)
        with self._lock:
            if organization_id in self._positions and position is not None:
                self._positions[organization_id] = position
        self.fanout.resync(organization_id)

    def _lost_everything(self, client):
        """Redis restarted (it keeps nothing on disk): every stream is new."""
        with self._lock:
            organizations = list(self._positions)
            for organization_id in organizations:
                self._positions[organization_id] = NO_POSITION
        for organization_id in organizations:
            self.fanout.resync(organization_id)


def _sequence(fields):
    """An entry's sequence number in its organization's stream (None for an entry
    written before streams had them)."""
    sequence = fields.get(SEQUENCE_FIELD)
    return None if sequence is None else int(sequence)


def _entry(events):
    """A stream entry's positions (comma-separated) and events (newline-separated)."""
    return (",".join(str(position) for position, _ in events),
            "\n".join(encode([event for _, event in events])))


def _lost(fields, previous):
    """Were events lost before this entry: it is a publisher's gap marker, or entries
    between the one read before and this one were trimmed away unread?"""
    sequence = _sequence(fields)
    return GAP_FIELD in fields or (previous is not None and sequence is not None and sequence != previous + 1)


def publish_safely(publish, events_by_organization, **extra):
    """Publish with a bus's ``publish``; a failure is logged (with ``extra``), never
    raised: what was published is stored, and the fan-out reads from the store what
    the bus lost (DESIGN §8)."""
    try:
        publish(events_by_organization)
    except Exception:
        log.warning("publish failed; sockets read these events from the store", exc_info=True, extra=extra)


def make_bus(url, stream_bytes=STREAM_BYTES, total_bytes=TOTAL_BYTES):
    """The bus for EVENTS_URL (and EVENTS_STREAM_BYTES, EVENTS_TOTAL_BYTES); the
    process's runtime holds it."""
    if url.startswith("memory://"):
        return MemoryBus()
    if url.startswith(("redis://", "rediss://")):
        return RedisBus(url, stream_bytes, total_bytes)
    raise ValueError("EVENTS_URL must be memory:// or redis://, not %r" % url)
