"""What one process holds for the service, built from its settings in one place:
the database and its read replica, the event bus and its fan-out, the group committer and its cache of
customers, the key cache and its revocation watch, the rate limits, the backlog
sampler and the analysis result writer.

Nothing runs until ``start()``; ``stop()`` ends and joins every thread it started.
Who starts and stops it:
- gunicorn: create_app builds it in each worker, gunicorn.conf.py's
  post_worker_init starts it, worker_exit stops it;
- `python app.py`: main() (the embedded consumer's threads use the same one);
- `huey_consumer tasks.huey`: the first worker's start-up hook builds and starts
  one that serves no requests (tasks.py), the last worker's shutdown stops it;
- the tests: the ``app`` fixture, for each test.

The models' database is a proxy (models.db) that every query goes through, so
it is the process's: binding a runtime (create_app does, start does again)
points it at that runtime's database. Tasks, which huey calls with no
arguments of ours, find the started runtime with ``current()``.
"""
import threading

from wsproto.frame_protocol import CloseReason

import models
from ingest import auth, events, replica
from ingest.analysis import ResultWriter
from ingest.service import IngestService

_current = None
_joined = 0  # consumer workers using the started runtime (join/leave)
_owned = False  # whether the consumer started it (then the last to leave stops it)
_lock = threading.RLock()


class Runtime:
    """``enqueue_analysis(ids_by_organization, high_priority)`` queues analyses;
    ``pending_count()`` says how many tasks wait (the health check)."""

    def __init__(self, settings, enqueue_analysis, pending_count):
        self.settings = settings
        self.pending_count = pending_count
        self.database = models.make_database(settings["DATABASE_URL"], settings["DB_POOL_SIZE"])
        self.replica = (replica.Replica(settings["DATABASE_READ_URL"], settings["DB_POOL_SIZE"])
                        if settings["DATABASE_READ_URL"] else None)
        self.bus = events.make_bus(settings["EVENTS_URL"], settings["EVENTS_STREAM_BYTES"],
                                   settings["EVENTS_TOTAL_BYTES"])
        self.keys = auth.KeyCache()
        self.rate_limit = _limit(settings["RATE_LIMIT"], settings)
        self.auth_failures = _limit(settings["AUTH_FAILURE_LIMIT"], settings)
        self.backlog = auth.Backlog(settings["ANALYSIS_BACKLOG_MAX"])
        self.service = IngestService(enqueue_analysis, self.bus.publish,
                                     max_batch_items=settings["MAX_BATCH_ITEMS"],
                                     commit_timeout=settings["COMMIT_TIMEOUT"])
        self.results = ResultWriter(self.bus.publish)
        self._watch = auth.RevocationWatch(self.keys, self.bus.fanout)
        self._started = []

    def bind(self):
        """Point the models at this runtime's database, and reads at its replica."""
        models.db.initialize(self.database)
        replica.bind(self.replica)

    def start(self, serving=True):
        """Start the threads; ``serving=False`` (a consumer process): only those that
        write analysis results, not those that serve requests and sockets."""
        global _current
        if self._started:
            raise RuntimeError("already started")
        self.bind()
        # Stopped in the reverse order: what is waiting is committed and its analyses'
        # results written while the bus still delivers; the sockets close last.
        self._started = ([self.bus, self._watch, self.backlog, self.results, self.service] if serving
                         else [self.results])
        for part in self._started:
            part.start()
        with _lock:
            _current = self

    def stop(self):
        """Close the sockets, commit and follow up what is waiting, write the last
        results, and end every thread; then close the database's connections."""
        global _current
        with _lock:
            if _current is self:
                _current = None
        for part in reversed(self._started):
            part.stop()
        self._started = []
        models.close_all(self.database)
        if self.replica is not None:
            self.replica.close()

    def close_sockets(self):
        """Close this process's feed sockets now (1001), so that browsers reconnect
        to another worker while this one finishes its requests."""
        self.bus.fanout.close_all(CloseReason.GOING_AWAY, "server restarting")


def of(app):
    """The runtime of a Flask app (create_app's)."""
    return app.extensions["runtime"]


def current():
    """The runtime started in this process."""
    if _current is None:
        raise RuntimeError("no runtime is started in this process")
    return _current


def join(build):
    """A consumer worker starts: the process's runtime, started with ``build()``
    by the first worker unless the process has one already (the dev server's)."""
    global _joined, _owned
    with _lock:
        _joined += 1
        if _current is None:
            build().start(serving=False)
            _owned = True
        return _current


def leave():
    """A consumer worker stops: the last one stops the runtime ``join`` started."""
    global _joined, _owned
    with _lock:
        _joined -= 1
        last = _joined == 0 and _owned
        if last:
            _owned = False
    if last and _current is not None:
        _current.stop()


def _limit(spec, settings):
    """The RateLimit of ``spec`` in RATE_LIMIT_URL's store, or None for no limit."""
    return auth.RateLimit(spec, settings["RATE_LIMIT_URL"]) if spec else None
