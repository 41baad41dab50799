"""The service's configuration, read from the environment in this one place (DESIGN §3).

Two kinds of variable are read elsewhere, by what they configure: gunicorn's own
(BIND, WEB_CONCURRENCY, WEB_THREADS, WEB_PIN_CPUS) in gunicorn.conf.py, which
gunicorn reads before any app exists, and prometheus_client's
PROMETHEUS_MULTIPROC_DIR (ingest/metrics.py).

The web processes and the queue consumers call ``load()`` alike, so both see
the same database, queue and event bus. `huey_consumer tasks.huey` gets no
arguments but the module, so whatever tasks.py acts on at import (the queue,
the bus, the sweep) comes from the environment only: ENVIRONMENT_ONLY.
"""
import os

from flask import Flask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTANCE_PATH = os.environ.get("INSTANCE_PATH") or os.path.join(ROOT, "instance")

DEFAULTS = {
    "DATABASE_URL": "sqlite:///" + os.path.join(INSTANCE_PATH, "ingest.db"),
    # A streaming replica of DATABASE_URL that reads go to (DESIGN §18, ingest/replica.py);
    # PostgreSQL only. Empty: every read goes to DATABASE_URL.
    "DATABASE_READ_URL": "",
    "QUEUE_URL": "sqlite:///" + os.path.join(INSTANCE_PATH, "queue.db"),
    "EVENTS_URL": "memory://",
    # Bytes the Redis bus keeps for listeners that lag: per organization, and in all.
    "EVENTS_STREAM_BYTES": 8 * 1024 * 1024,
    "EVENTS_TOTAL_BYTES": 256 * 1024 * 1024,
    "MAX_CONTENT_LENGTH": 1024 * 1024,
    "MAX_BATCH_ITEMS": 1000,
    # PostgreSQL connections one process may hold (see the README for sizing).
    "DB_POOL_SIZE": 10,
    # Seconds a request waits for its commit (DESIGN §5: a 503 within 30 s).
    "COMMIT_TIMEOUT": 20,
    # Seconds an interaction may stay `pending` before the sweep re-queues it.
    "ANALYSIS_SWEEP_AFTER": 120,
    # Per-key budgets (DESIGN §13), one or several separated by ";": "200/s burst 1000"
    # counts requests, "5000 events/s burst 20000" events (a batch of n items costs n,
    # a single ingest or Segment call 1); per s, m, h or d. Empty: no limit.
    "RATE_LIMIT": "",
    # Failed authentications (401s) per client address, as requests in RATE_LIMIT's
    # syntax; once spent, a key not in the cache is answered 429 without a database
    # lookup. Empty: no limit.
    "AUTH_FAILURE_LIMIT": "10/s burst 100",
    # How many proxies in front of the service append to X-Forwarded-For (deploy/
    # nginx.conf: 1), so that the client address is the one the outermost saw; 0:
    # the connection's peer. More than there are lets clients choose their address.
    "TRUSTED_PROXIES": 0,
    # Where the budgets are kept: EVENTS_URL's Redis when there is one, else in memory.
    "RATE_LIMIT_URL": "",
    # Pending analyses beyond which ingest answers 429.
    "ANALYSIS_BACKLOG_MAX": 100_000,
    # PostgreSQL: the span of one partition of interaction (day, week or month, DESIGN §17).
    "PARTITION_INTERVAL": "month",
    "LOG_LEVEL": "INFO",
}
# Read by tasks.py at import (the queue and the bus it builds, the sweep's age, the
# partitions its periodic task creates):
# create_app refuses a value of these that differs from what the process uses.
ENVIRONMENT_ONLY = ("QUEUE_URL", "EVENTS_URL", "EVENTS_STREAM_BYTES", "EVENTS_TOTAL_BYTES",
                    "ANALYSIS_SWEEP_AFTER", "PARTITION_INTERVAL")
INTERVALS = ("day", "week", "month")
INTEGER_KEYS = ("EVENTS_STREAM_BYTES", "EVENTS_TOTAL_BYTES", "MAX_CONTENT_LENGTH", "MAX_BATCH_ITEMS",
                "DB_POOL_SIZE", "COMMIT_TIMEOUT",
                "ANALYSIS_SWEEP_AFTER", "ANALYSIS_BACKLOG_MAX", "TRUSTED_PROXIES")


def load(environ=None, overrides=None, fixed=None):
    """Return the settings: defaults, then the environment, then ``overrides`` (a key
    that is neither one of DEFAULTS nor one of Flask's own is a ValueError).

    ``fixed``: settings the process already acted on (tasks.settings). An
    ENVIRONMENT_ONLY key that ends up different from it, by an override or by an
    environment changed since, is a ValueError, never ignored.
    """
    environ = os.environ if environ is None else environ
    unknown = set(overrides or ()) - set(DEFAULTS) - set(Flask.default_config)
    if unknown:  # a misspelt key would otherwise be ignored
        raise ValueError("unknown setting(s): %s" % ", ".join(sorted(unknown)))
    settings = dict(DEFAULTS)
    for key in DEFAULTS:
        if environ.get(key):
            settings[key] = environ[key]
    settings.update(overrides or {})
    for key in INTEGER_KEYS:
        settings[key] = int(settings[key])
    for key in ENVIRONMENT_ONLY:
        if fixed is not None and settings[key] != fixed[key]:
            raise ValueError("%s=%r, but this process uses %r: it comes from the environment as it "
                             "was when tasks.py was imported (huey_consumer reads it there too), "
                             "and cannot be overridden in create_app()" % (key, settings[key], fixed[key]))
    if settings["PARTITION_INTERVAL"] not in INTERVALS:
        raise ValueError("PARTITION_INTERVAL must be one of %s, not %r" % (", ".join(INTERVALS),
                                                                          settings["PARTITION_INTERVAL"]))
    _check_read_url(settings["DATABASE_URL"], settings["DATABASE_READ_URL"])
    if not settings["RATE_LIMIT_URL"]:
        events = settings["EVENTS_URL"]
        settings["RATE_LIMIT_URL"] = events if events.startswith("redis") else "memory://"
    if settings["DATABASE_URL"].startswith("sqlite:///") or settings["QUEUE_URL"].startswith("sqlite:///"):
        os.makedirs(INSTANCE_PATH, exist_ok=True)
    return settings


def _check_read_url(primary, replica):
    """A replica is one of a PostgreSQL primary: with SQLite, DATABASE_READ_URL is refused."""
    postgres = ("postgres://", "postgresql://")
    if replica and not (primary.startswith(postgres) and replica.startswith(postgres)):
        raise ValueError("DATABASE_READ_URL is a streaming replica of a PostgreSQL DATABASE_URL: both must be "
                         "postgresql://, not %s:// and %s:// (leave DATABASE_READ_URL empty otherwise)"
                         % (primary.split(":")[0], replica.split(":")[0]))
