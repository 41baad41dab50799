"""Live events (DESIGN §8): the bus that carries them from whoever publishes
(a web worker's writer, a consumer) to the fan-out of every web process.

``bus.publish({organization_id: events})`` is all the workflow and the tasks
know: one call for everything a commit (or an analysis task) produced.

- ``memory://`` (one process, the dev server): publishing hands the events to
  this process's fan-out.
- ``redis://``: one Redis stream per organization. A listener thread in each web
  process reads the streams of the organizations it has sockets for and hands
  what it reads to its fan-out. A stream is a short replay log, not a fire-and-
  forget channel, so a listener that loses its connection resumes where it was
  and one tenant's volume can only ever trim its own stream. Whatever cannot be
  delivered is said, never silently skipped: the organization's sockets get
  {"type": "gap"} when their listener finds its position trimmed away, when Redis
  restarted under it, or when a publisher failed to publish (it writes a gap
  marker into the stream with its next successful publish).
"""
import collections
import functools
import json
import logging
import threading
import time

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from ingest.fanout import FanOut
from ingest.threads import PerProcess

log = logging.getLogger(__name__)

STREAM_PREFIX = "ingest:events:"
STREAM_LENGTH = 1000  # publishes kept per organization (approximately), for listeners that lag
STREAM_TTL = 24 * 3600  # an organization's stream is dropped after a day with no publish
READ_COUNT = 100  # entries per stream and read: a busy organization never starves the others
READ_BLOCK_MS = 250  # also how soon a listener starts reading a newly watched organization
LISTENER_NAME = "ingest-events-listener"
GAP_FIELD = b"gap"
EVENTS_FIELD = b"e"


# One encoder for every event: json.dumps with options builds a new one per call,
# which cost a third of encoding an analysed event (a consumer encodes thousands a second).
_encoder = json.JSONEncoder(default=str, ensure_ascii=False, separators=(",", ":"))


def encode(events):
    """Events as JSON texts, serialised once for every socket they go to."""
    return [_encoder.encode(event) for event in events]


class MemoryBus:
    """One process: publishing is dispatching to this process's fan-out."""

    def __init__(self):
        self.fanout = FanOut(on_leave=self._left)

    def publish(self, events_by_organization):
        for organization_id, events in events_by_organization.items():
            self.fanout.dispatch(organization_id, encode(events))

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

    def __init__(self, url):
        super().__init__()
        self._url = url
        # A publish whose connection drops is tried again on a new one (at worst an
        # event is then delivered twice; the page keeps one row per id).
        self._redis = redis.Redis.from_url(
            url, socket_timeout=2, socket_connect_timeout=2,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.01), 3),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError])
        self._lock = threading.Lock()
        self._watchers = collections.Counter()  # organization -> its sockets here
        self._positions = {}  # organization -> last stream id read (None: unknown)
        self._failed = set()  # organizations whose events this process failed to publish
        self._listener = PerProcess(("events-listener", self._listen))

    def publish(self, events_by_organization):
        """One pipelined round trip: an XADD per organization (after a gap marker
        where an earlier publish of this process failed)."""
        lost = self._failed & set(events_by_organization)
        entries = [(STREAM_PREFIX + str(organization_id), organization_id in lost,
                    "\n".join(encode(events)))
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
        for key, after_gap, text in entries:
            if after_gap:
                pipe.xadd(key, {GAP_FIELD: b"1"}, maxlen=STREAM_LENGTH, approximate=True)
            pipe.xadd(key, {EVENTS_FIELD: text}, maxlen=STREAM_LENGTH, approximate=True)
            pipe.expire(key, STREAM_TTL)
        pipe.execute()

    def _joined(self, organization_id):
        self._listener.start()
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
        """The id of the organization's newest entry: reading resumes after it.
        None if Redis cannot say (the listener then starts afresh with a gap)."""
        try:
            newest = client.xrevrange(STREAM_PREFIX + organization_id, count=1)
        except redis.RedisError:
            return None
        return newest[0][0] if newest else b"0-0"

    def _listen(self):
        client, run_id, delay = None, None, 0.1
        while True:
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
                time.sleep(delay)
                delay = min(delay * 2, 5)

    def _read(self, client):
        with self._lock:
            unknown = [org for org, position in self._positions.items() if position is None]
        for organization_id in unknown:
            self._restart(client, organization_id)
        with self._lock:
            streams = {STREAM_PREFIX + org: position for org, position in self._positions.items()}
        if not streams:
            time.sleep(READ_BLOCK_MS / 1000)
            return
        for key, entries in client.xread(streams, count=READ_COUNT, block=READ_BLOCK_MS) or ():
            organization_id = key.decode()[len(STREAM_PREFIX):]
            with self._lock:
                if organization_id not in self._positions:
                    continue  # its last socket left meanwhile
                previous = self._positions[organization_id]
                self._positions[organization_id] = entries[-1][0]
            if len(entries) == READ_COUNT and self._trimmed_past(client, key, previous):
                self.fanout.notify(organization_id, "gap", reason="the feed fell behind")
            self._deliver(organization_id, entries)

    def _deliver(self, organization_id, entries):
        messages = []
        for _, fields in entries:
            if GAP_FIELD in fields:
                if messages:
                    self.fanout.dispatch(organization_id, messages)
                    messages = []
                self.fanout.notify(organization_id, "gap", reason="events could not be published")
            else:
                messages.extend(fields[EVENTS_FIELD].split(b"\n"))
        if messages:
            self.fanout.dispatch(organization_id, messages)

    @staticmethod
    def _trimmed_past(client, key, position):
        """Were entries after ``position`` trimmed before this listener read them?"""
        deleted = client.xinfo_stream(key).get("max-deleted-entry-id") or b"0-0"
        return _stream_id(deleted) > _stream_id(position)

    def _restart(self, client, organization_id):
        """Start reading ``organization_id`` afresh, telling its sockets of the gap."""
        position = self._latest(client, organization_id)
        with self._lock:
            if organization_id in self._positions and position is not None:
                self._positions[organization_id] = position
        self.fanout.notify(organization_id, "gap", reason="the event bus restarted")

    def _lost_everything(self, client):
        """Redis restarted (it keeps nothing on disk): every stream is new."""
        with self._lock:
            organizations = list(self._positions)
            for organization_id in organizations:
                self._positions[organization_id] = b"0-0"
        for organization_id in organizations:
            self.fanout.notify(organization_id, "gap", reason="the event bus restarted")


def _stream_id(value):
    milliseconds, _, sequence = (value.decode() if isinstance(value, bytes) else value).partition("-")
    return int(milliseconds), int(sequence or 0)


@functools.lru_cache(maxsize=None)
def bus_for(url):
    """This process's bus for EVENTS_URL: the web app and the tasks share it."""
    if url.startswith("memory://"):
        return MemoryBus()
    if url.startswith(("redis://", "rediss://")):
        return RedisBus(url)
    raise ValueError("EVENTS_URL must be memory:// or redis://, not %r" % url)
