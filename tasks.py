"""The Huey instance, built from QUEUE_URL, and the analysis task (DESIGN §7).

`huey_consumer tasks.huey -w N` imports this one module and finds every task;
the web processes import it to enqueue. Both read the same environment.
"""
import logging
import signal
from collections import defaultdict
from urllib.parse import urlparse

from huey import PostgresHuey, PriorityRedisHuey, SqliteHuey, crontab
from huey.storage import PostgresStorage

import models
from ingest import analysis, config, logs
from ingest.events import bus_for

settings = config.load()
log = logging.getLogger(__name__)

HIGH_PRIORITY = 10  # a single ingest: analysed before batch backlogs
LOW_PRIORITY = 0
CHUNK = 100


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
def start_consumer():
    """A consumer process logs JSON lines and opens the database the web processes
    write to (in the dev server, the app has bound it already)."""
    logs.configure(settings["LOG_LEVEL"])
    if models.db.obj is None:
        models.bind(settings["DATABASE_URL"], settings["DB_POOL_SIZE"])


@huey.task(retries=3, retry_delay=2, retry_backoff=2, context=True)
def analyze(ids, task=None):
    with models.db.connection_context():
        try:
            results = analysis.analyze(ids)
        except Exception as error:
            if task is None or task.retries == 0:
                analysis.mark_failed(ids, error)
            raise
    log.info("analysed", extra={"analysed": len(results), "interaction_ids": ids})
    by_organization = defaultdict(list)
    for result in results:
        by_organization[result["organization_id"]].append({
            "type": "interaction.analyzed", "data": {
                "id": str(result["id"]), "analysisStatus": result["analysis_status"],
                "sentiment": result["sentiment"]}})
    bus_for(settings["EVENTS_URL"]).publish(by_organization)


@huey.periodic_task(crontab(minute="*"))
def sweep():
    """Re-queue interactions pending for too long: a lost job, a queue outage or a
    killed consumer loses nothing. The scheduler also runs it when a consumer
    starts. Start consumers after the first with -n so only one sweeps."""
    with models.db.connection_context():
        ids = analysis.stale_pending(settings["ANALYSIS_SWEEP_AFTER"])
    if ids:
        enqueue_analysis(ids, high_priority=False)
        log.info("sweep re-queued pending interactions", extra={"count": len(ids)})


def enqueue_analysis(ids, high_priority):
    """Queue analyses of ``ids``, in tasks of at most CHUNK ids."""
    priority = HIGH_PRIORITY if high_priority else LOW_PRIORITY
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
