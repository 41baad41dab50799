"""The Huey instance, built from QUEUE_URL, and the analysis task (DESIGN §7).

`huey_consumer tasks.huey -w N` imports this one module and finds every task;
the web processes import it to enqueue. Both read the same environment, at
import: the queue, the bus and the sweep's age come from the environment only
(config.ENVIRONMENT_ONLY), and create_app refuses an override of them.
"""
import logging
import queue
import signal
import threading
import time
from collections import defaultdict
from urllib.parse import urlparse

from huey import PostgresHuey, PriorityRedisHuey, SqliteHuey, crontab
from huey.storage import PostgresStorage

import models
from ingest import analysis, changes, config, lifecycle, logs, partitions
from ingest.events import bus_for
from ingest.threads import PerProcess

settings = config.load()
log = logging.getLogger(__name__)

# Priorities (higher first): single ingests before batch backlogs, and both
# before work queued again (by the sweep, `analysis retry`, or a task that ran
# out of its budget). Within a lane an organization's tasks lose a step for
# every SHARE_STEP ids it queued in the last SHARE_WINDOW seconds (in this
# process), so that one busy or costly tenant never starves the others.
SINGLE_LANE = 20
BATCH_LANE = 10
REQUEUE_LANE = 0
SHARE_WINDOW = 10
SHARE_STEP = 500
CHUNK = 500  # ids a task: per-task work (dequeue, one SELECT, one UPDATE, one publish) shared by more texts
TASK_BUDGET = 1.0  # seconds a task scores before it queues the rest of its ids again


def make_huey(url):
    scheme = urlparse(url).scheme
    if scheme == "sqlite":
        # No fsync per enqueue: the interactions table, not the queue, is the record;
        # a task lost to a power cut is re-queued by the sweep.
        return SqliteHuey("ingest", filename=urlparse(url).path, fsync=False)
    if scheme in ("redis", "rediss"):
        return PriorityRedisHuey("ingest", url=url)
    if scheme in ("postgres", "postgresql"):
        # Its tables come from `init-db` (create_queue_tables): processes starting
        # together would race on CREATE TABLE IF NOT EXISTS.
        return PostgresHuey("ingest", dsn=url, create_tables=False)
    raise ValueError("QUEUE_URL must be sqlite:///, redis:// or postgresql://, not %r" % url)


huey = make_huey(settings["QUEUE_URL"])


def event_bus():
    """This process's event bus (ingest/events.py), which the web app shares."""
    return bus_for(settings["EVENTS_URL"], settings["EVENTS_STREAM_BYTES"], settings["EVENTS_TOTAL_BYTES"])


def create_queue_tables(queue=None):
    """Create the queue's tables where it keeps them in a SQL database (idempotent)."""
    storage = (queue or huey).storage
    if isinstance(storage, PostgresStorage):
        storage.initialize_schema()


@huey.on_startup()
def start_consumer():
    """A consumer process logs JSON lines and opens the database the web processes
    write to (in the dev server, the app has bound it already)."""
    logs.configure(settings["LOG_LEVEL"])
    if models.db.obj is None:
        models.bind(settings["DATABASE_URL"], settings["DB_POOL_SIZE"])


@huey.task(retries=3, retry_delay=2, retry_backoff=2, context=True)
def analyze(ids, task=None):
    # A consumer thread keeps its connection from task to task (on SQLite that
    # spares a connect and its pragmas each time); any failure drops it.
    last_attempt = task is None or task.retries == 0
    try:
        scored, failed, unread = analysis.score(ids, TASK_BUDGET)
    except Exception as error:  # the reading failed: every id is retried
        models.release_connection()
        if last_attempt:
            with models.db.connection_context():
                publish_analyzed(analysis.mark_failed(ids, error))
        raise
    if unread:  # costly texts: the rest waits behind everyone else's work
        requeue(unread)
    if not failed:
        results.submit(scored)
        return
    # Some items raised: the others' results are written now, before the retry
    # (which then finds only the failed ones pending) or the failure mark.
    results.write(scored)
    if last_attempt:
        for interaction_id, error in failed.items():
            publish_analyzed(analysis.mark_failed([interaction_id], error))
    raise AnalysisFailed("analysis of %d interaction(s) failed: %s" % (
        len(failed), next(iter(failed.values()))))


class AnalysisFailed(Exception):
    """Some items of a task raised; the task is retried for them."""


class ResultWriter:
    """Stores and publishes analysis results from a thread of its own, so that a
    consumer thread goes on to its next task (its SELECT and VADER) while the
    database writes the last one's: their time overlaps instead of adding up.

    At most BACKLOG tasks' results wait; a consumer thread that finds it full
    waits too. Results whose write fails leave their interactions pending, and
    the sweep queues them again.
    """

    BACKLOG = 4

    def __init__(self):
        self._queue = queue.Queue(self.BACKLOG)
        self._thread = PerProcess(("analysis-results", self._run))

    def submit(self, scored):
        """Write ``scored`` soon, from the writer thread."""
        if scored:
            self._thread.start()
            self._queue.put(scored)

    def write(self, scored):
        """Write ``scored`` now, from this thread."""
        if scored:
            self._write(scored)

    def drain(self, timeout=10):
        """Wait (up to ``timeout``) until every submitted result is written."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def _run(self):
        while True:
            scored = self._queue.get()
            try:
                self._write(scored)
            except Exception:
                models.release_connection()
                log.warning("storing analysis results failed; the sweep will queue them again",
                            exc_info=True, extra={"analysed": len(scored)})
            finally:
                self._queue.task_done()

    @staticmethod
    def _write(scored):
        publish_analyzed(analysis.store(scored))


def publish_analyzed(written):
    """Log and publish the ``interaction.analyzed`` events of analysis.store's results.
    A failed publish is logged, never raised: the results are stored, and sockets
    read what the bus lost from the store (DESIGN §8)."""
    log.info("analysed", extra={"analysed": len(written), "interaction_ids": [r["id"] for r in written]})
    by_organization = defaultdict(list)
    for result in written:
        sentiment = result["sentiment"] or {}
        by_organization[result["organization_id"]].append((result["position"], changes.event(
            changes.ANALYZED, result["organization_id"], result["position"], changes.analyzed_data(
                result["id"], result["customer_id"], result["analysis_status"],
                sentiment.get("label"), sentiment.get("score")))))
    try:
        event_bus().publish(by_organization)
    except Exception:
        log.warning("publishing analyses failed; sockets read them from the store", exc_info=True,
                    extra={"analysed": len(written)})


results = ResultWriter()


@huey.on_shutdown()
def write_remaining_results():
    results.drain()


@huey.periodic_task(crontab(minute="*"))
def sweep():
    """Re-queue interactions pending for too long: a lost job, a queue outage or a
    killed consumer loses nothing. The scheduler also runs it when a consumer
    starts. Start consumers after the first with -n so only one sweeps."""
    with models.db.connection_context():
        ids = analysis.stale_pending(settings["ANALYSIS_SWEEP_AFTER"])
    if ids:
        requeue(ids)
        log.info("sweep re-queued pending interactions", extra={"count": len(ids)})


RECLAIM_LIMIT = 200_000  # rows of each kind an hourly run deletes at most


@huey.periodic_task(crontab(minute="7"))
def maintain_storage():
    """Hourly (DESIGN §17): create interaction's partitions ahead (months ahead, so a
    consumer down for a while misses nothing), and delete what retention put out of
    reach: the rows of pruned changes and the message keys of dropped partitions."""
    with models.db.connection_context():
        created = partitions.ensure_ahead(settings["PARTITION_INTERVAL"])
        reclaimed = lifecycle.reclaim(RECLAIM_LIMIT)
    for partition, moved in created:
        log.info("partition created", extra={"partition": partition.name, "moved_from_default": moved})
    if any(reclaimed.values()):
        log.info("reclaimed", extra=reclaimed)


class Shares:
    """How many ids each organization queued lately, in this process."""

    def __init__(self):
        self._recent = {}  # organization -> (window start, ids)
        self._lock = threading.Lock()

    def penalty(self, organization_id, count):
        """Steps an organization's next tasks lose, having queued ``count`` more ids."""
        now = time.monotonic()
        with self._lock:
            started, queued = self._recent.get(organization_id, (now, 0))
            if now - started > SHARE_WINDOW:
                started, queued = now, 0
            if len(self._recent) > 10_000:
                self._recent.clear()
            self._recent[organization_id] = (started, queued + count)
        return min(9, queued // SHARE_STEP)


shares = Shares()


def enqueue_analysis(ids_by_organization, high_priority):
    """Queue analyses of ``{organization_id: ids}``, each organization's in tasks
    of its own, at its lane's priority less its penalty."""
    lane = SINGLE_LANE if high_priority else BATCH_LANE
    for organization_id, ids in ids_by_organization.items():
        _enqueue(ids, lane - shares.penalty(organization_id, len(ids)))


def requeue(ids):
    """Queue analyses of ``ids`` behind all first-time work."""
    _enqueue(ids, REQUEUE_LANE)


def _enqueue(ids, priority):
    ids = [str(i) for i in ids]
    for start in range(0, len(ids), CHUNK):
        huey.enqueue(analyze.s(ids[start:start + CHUNK], priority=priority))


def start_embedded_consumer(workers=2):
    """Run consumer threads inside this process (the dev server, DESIGN §11).

    Huey's consumer installs its own signal handlers; the host process keeps
    its own, so Ctrl-C still stops the web server.
    """
    consumer = huey.create_consumer(workers=workers, worker_type="thread")
    saved = {signum: signal.getsignal(signum)
             for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    consumer.start()
    for signum, handler in saved.items():
        signal.signal(signum, handler)
    return consumer
