"""Reads from a streaming replica (DESIGN §18): DATABASE_READ_URL, PostgreSQL only.

What reads the replica: the read API (ingest/reads.py), the change feed's pages
for /api/changes and for sockets catching up (ingest/changes.py ``read``) and the
key checks (ingest/auth.py). Everything else stays on the primary: writes and
what they read, the answers of ingest, customer creation and erasure, and any
read inside a transaction (``read`` sees one open and stays on the primary).

A read is a function of the database it runs on, ``work(database)``, run here on
the replica, or on the primary when there is none. peewee's public API carries
it: a query is executed with ``query.execute(database)`` (or ``first``) and raw
SQL with ``database.execute_sql``; nothing is rebound for a thread (``bind_ctx``
is not thread-safe) and the models stay bound to the primary.

A replica's answer is a prefix of the primary's history (it replays the primary's
WAL in order). Where that is not enough, the caller says so with ``enough``: a
key not found there may have been created a moment ago, and a change page that
is empty may mean the replica is behind, not that nothing follows; the primary
answers those.

The replica unreachable (a connection or operational error): the read is done on
the primary, and so is every read for RETRY_SECONDS; then one read tries the
replica again (a small circuit breaker). Going over and coming back are each one
log line (a warning, an info) and the ``ingest_replica_fallback`` gauge, never a
line per request. A lagging replica is no failure: its lag is reported by
/readyz and /metrics, and neither makes the service unready.

Connections: a read uses this thread's open connection to the database it runs
on, or takes one from that database's pool for the read and gives it back at once
(``models.connection``), as the key checks always did: some reads run outside
requests (the feed's work threads, the key watch), and a request holds a
connection of either pool no longer than it reads. ingest/web.py's teardown
still gives back a primary connection that a request's other queries opened.
"""
import logging
import threading
import time

from peewee import InterfaceError, OperationalError
from playhouse.pool import MaxConnectionsExceeded

import models
from ingest import metrics

log = logging.getLogger(__name__)

RETRY_SECONDS = 5  # reads stay on the primary this long after the replica failed
# A replica whose host is lost answers nothing and resets nothing: connecting gives
# up after connect_timeout, a request unacknowledged (tcp_user_timeout) or a silent
# connection (keepalives) after a few seconds, so that the read fails over to the
# primary instead of hanging; so does a read with no pooled connection left.
CONNECTION = {"connect_timeout": 3, "tcp_user_timeout": 3000, "keepalives": 1, "keepalives_idle": 2,
              "keepalives_interval": 1, "keepalives_count": 2}
FAILURES = (OperationalError, InterfaceError, MaxConnectionsExceeded)
# Seconds the replica's replay is behind: none while it streams and has replayed all
# it received, else since the last transaction it replayed committed on the primary
# (a replica that stopped receiving has "replayed all it received" and is not current).
LAG = ("SELECT CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() "
       "AND EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming') THEN 0 "
       "ELSE EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()) END")

_bound = None  # the started (or last bound) runtime's Replica, or None: no replica


class Replica:
    """The replica's database and whether reads may go to it."""

    def __init__(self, url, pool_size):
        self.database = models.make_database(url, pool_size, **CONNECTION)
        self._lock = threading.Lock()
        self._down = False
        self._retry_at = 0.0
        self._down_since = 0.0  # a read that began before this cannot bring the replica back
        metrics.REPLICA_FALLBACK.set(0)

    @property
    def falling_back(self):
        """Whether reads go to the primary because the replica failed."""
        return self._down

    def run(self, work, enough=None):
        """``work(database)`` on the replica, or on the primary: while the replica is
        down, when it fails now, or when ``enough(result)`` is false."""
        if not self._usable():
            return _on_primary(work)
        began = time.monotonic()
        try:
            with models.connection(self.database):
                result = work(self.database)
        except FAILURES as error:
            self._failed(error)
            return _on_primary(work)
        self._succeeded(began)
        return result if enough is None or enough(result) else _on_primary(work)

    def lag(self):
        """Seconds the replica's replay is behind the primary (0: it replayed all
        it received), or None while it is down or cannot tell yet."""
        if not self._usable():
            return None
        began = time.monotonic()
        try:
            with models.connection(self.database):
                seconds = self.database.execute_sql(LAG).fetchone()[0]
        except FAILURES as error:
            self._failed(error)
            return None
        self._succeeded(began)
        return None if seconds is None else max(float(seconds), 0.0)

    def close(self):
        models.close_all(self.database)

    def _usable(self):
        """Up, or down for RETRY_SECONDS and this caller the one to try it again."""
        if not self._down:
            return True
        with self._lock:
            if not self._down or time.monotonic() < self._retry_at:
                return not self._down
            self._retry_at = time.monotonic() + RETRY_SECONDS  # the others stay on the primary
            return True

    def _failed(self, error):
        with self._lock:
            went_down = not self._down
            self._down, self._retry_at = True, time.monotonic() + RETRY_SECONDS
            self._down_since = time.monotonic()
        self.database.close_idle()  # dead connections must not be handed to the next try
        if went_down:
            metrics.REPLICA_FALLBACK.set(1)
            log.warning("replica unreachable; reads go to the primary", extra={
                "error": "%s: %s" % (type(error).__name__, str(error).strip()), "retry_seconds": RETRY_SECONDS})

    def _succeeded(self, began):
        """A read that began at ``began`` succeeded: the replica is back, unless the
        read began before it was found down (an answer from before the failure)."""
        if not self._down:
            return
        with self._lock:
            came_back = self._down and began > self._down_since
            self._down = self._down and not came_back
        if came_back:
            metrics.REPLICA_FALLBACK.set(0)
            log.info("replica reachable again; reads go to it")


def _on_primary(work):
    with models.connection():
        return work(models.db)


def bind(replica):
    """Send this process's reads to ``replica`` (None: to the primary)."""
    global _bound
    _bound = replica


def read(work, enough=None):
    """``work(database)`` on the replica (``Replica.run``), or on the primary when
    there is none or a transaction is open on the primary in this thread."""
    replica = _bound
    if replica is None or models.db.in_transaction():
        return _on_primary(work)
    return replica.run(work, enough)


def rows(query, enough=None):
    """The rows of a peewee SELECT, read as ``read`` says (a copy of it runs)."""
    return read(lambda database: list(query.clone().execute(database)), enough)


def first(query):
    """The first row of a peewee SELECT, or None, read as ``read`` says. None is
    the primary's answer: a row the replica lacks may have been written a moment
    ago (a customer just created is found at once, not a 404 for the lag)."""
    return read(lambda database: query.clone().first(database), enough=lambda row: row is not None)
