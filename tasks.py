"""The Huey instance, built from QUEUE_URL, and the analysis task (DESIGN §7).

`huey_consumer tasks.huey -w N` imports this one module and finds every task;
the web processes import it to enqueue. Both read the same environment, at
import: the queue, the bus and the sweep's age come from the environment only
(config.ENVIRONMENT_ONLY), and create_app refuses an override of them.
"""
import logging
import signal
import threading
import time
from urllib.parse import urlparse

from huey import PostgresHuey, PriorityRedisHuey, SqliteHuey, crontab
from huey.storage import PostgresStorage

import models
from ingest import analysis, config, lifecycle, logs, partitions, runtime

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
# A penalised task still runs before the lane below its own.
MAX_PENALTY = min(SINGLE_LANE - BATCH_LANE, BATCH_LANE - REQUEUE_LANE) - 1
TASK_IDS = 500  # ids a task: per-task work (dequeue, one SELECT, one UPDATE, one publish) shared by more texts
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


def create_queue_tables(queue=None):
    """Create the queue's tables where it keeps them in a SQL database (idempotent)."""
    storage = (queue or huey).storage
    if isinstance(storage, PostgresStorage):
        storage.initialize_schema()


@huey.on_startup()
def join_runtime():
    """Each consumer worker, as it starts: JSON log lines, and the process's runtime
    (ingest/runtime.py): the first worker starts one that serves no requests; in
    the dev server, the app's is used."""
    logs.configure(settings["LOG_LEVEL"])
    runtime.join(lambda: make_runtime(settings))


@huey.on_shutdown()
def leave_runtime():
    """Each consumer worker, as it stops; the last one stops the runtime (its
    results written first)."""
    runtime.current().results.drain()
    runtime.leave()


@huey.task(retries=3, retry_delay=2, retry_backoff=2, context=True)
def analyze(ids, task=None):
    """Score the interactions ``ids`` still pending and hand the results to the
    process's ResultWriter, which stores and publishes them from its own thread.
    When some items raise, the others' results are written on this thread, and
    the task is retried for those items; after the last attempt they are marked
    failed."""
    # A consumer thread keeps its connection from task to task (on SQLite that
    # spares a connect and its pragmas each time); any failure drops it.
    last_attempt = task is None or task.retries == 0
    results = runtime.current().results
    try:
        scored, failed, unread = analysis.score(ids, TASK_BUDGET)
    except Exception as error:  # the reading failed: every id is retried
        models.release_connection()
        if last_attempt:
            results.failed(ids, error)
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
            results.failed([interaction_id], error)
    raise AnalysisFailed("analysis of %d interaction(s) failed: %s" % (
        len(failed), next(iter(failed.values()))))


class AnalysisFailed(Exception):
    """Some items of a task raised; the task is retried for them."""


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
        return min(MAX_PENALTY, queued // SHARE_STEP)


class Enqueuer:
    """``enqueue(ids_by_organization, high_priority)``: queue analyses of
    ``{organization_id: ids}``, each organization's in tasks of its own, at its
    lane's priority less its penalty (a process's runtime holds one)."""

    def __init__(self):
        self._shares = Shares()

    def __call__(self, ids_by_organization, high_priority):
        lane = SINGLE_LANE if high_priority else BATCH_LANE
        for organization_id, ids in ids_by_organization.items():
            _enqueue(ids, lane - self._shares.penalty(organization_id, len(ids)))


def make_runtime(process_settings):
    """A process's runtime (ingest/runtime.py) whose analyses go to this queue."""
    return runtime.Runtime(process_settings, Enqueuer(), huey.pending_count)


def requeue(ids):
    """Queue analyses of ``ids`` behind all first-time work."""
    _enqueue(ids, REQUEUE_LANE)


def _enqueue(ids, priority):
    ids = [str(i) for i in ids]
    for start in range(0, len(ids), TASK_IDS):
        _enqueue_task(analyze.s(ids[start:start + TASK_IDS], priority=priority))


def _enqueue_task(task):
    """Enqueue ``task``, once more if that fails: a pooled connection that its server
    dropped meanwhile (Redis after a network cut: "Broken pipe") fails once, and
    the retry takes a new one. A queue that is down fails both; the caller logs,
    and the sweep queues the analyses again (DESIGN §7)."""
    try:
        huey.enqueue(task)
    except Exception:
        huey.enqueue(task)


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
