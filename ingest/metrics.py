"""Prometheus metrics (DESIGN §14), correct across gunicorn workers and consumers.

With PROMETHEUS_MULTIPROC_DIR set (production: the same empty directory for
every web worker and consumer process of a machine, made before they start),
prometheus_client keeps each process's values in files there and `/metrics`
adds them up; without it (the dev server: one process) they live in memory.
prometheus_client reads the variable itself, at import.

Labels are bounded: an endpoint is its URL rule, never a raw path, and nothing
is labelled by organization.
"""
import logging
import os

from flask import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily

from ingest import partitions
from models import utcnow

log = logging.getLogger(__name__)

REQUESTS = Counter("ingest_http_requests_total", "HTTP requests by endpoint and status.",
                   ["endpoint", "status"])
LATENCY = Histogram("ingest_http_request_duration_seconds", "Time to answer a request, by endpoint.",
                    ["endpoint"], buckets=(.002, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
INTERACTIONS = Counter("ingest_interactions_total",
                       "Interactions received, by outcome: stored, duplicate or failed.", ["outcome"])
COMMIT_SIZE = Histogram("ingest_group_commit_items", "Interactions written by one group commit.",
                        buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000))
ANALYSES = Counter("ingest_analyses_total", "Analyses finished, by outcome: done, skipped or failed.",
                   ["outcome"])
SOCKETS = Gauge("ingest_feed_sockets", "Live-feed sockets open.", multiprocess_mode="livesum")
DROPPED = Counter("ingest_feed_dropped_events_total", "Events dropped for sockets that fell behind.")
REPLICA_FALLBACK = Gauge("ingest_replica_fallback", "1 while reads meant for the replica (DATABASE_READ_URL) "
                         "go to the primary because the replica is unreachable.", multiprocess_mode="livemax")
REFUSED = Counter("ingest_refused_total", "Requests answered 429, by reason: rate_limited, "
                  "analysis_backlog_full or auth_rate_limited.", ["reason"])


class BacklogCollector:
    """``ingest_analysis_backlog``: the sampled count of pending analyses, and how many
    organizations are over their share of its bound (not which: one series)."""

    def __init__(self, backlog):
        self.backlog = backlog

    def collect(self):
        self.backlog.refresh()
        yield GaugeMetricFamily("ingest_analysis_backlog",
                                "Interactions pending analysis (sampled; counted up to "
                                "ANALYSIS_BACKLOG_MAX + 1).", value=self.backlog.pending)
        yield GaugeMetricFamily("ingest_analysis_backlog_refused_organizations",
                                "Organizations whose ingest is refused: over their share of "
                                "ANALYSIS_BACKLOG_MAX (sampled).", value=len(self.backlog.refused))


class BusCollector:
    """``ingest_event_stream_bytes``: what the Redis bus's streams hold (DESIGN §8), read
    from Redis at each scrape; nothing for the in-memory bus or when Redis is away."""

    def __init__(self, bus):
        self.bus = bus

    def collect(self):
        try:
            held = self.bus.held_bytes()
        except Exception:  # Redis is away: the scrape still answers, without this gauge
            log.warning("reading the event streams' size failed", exc_info=True)
            return
        if held is not None:
            yield GaugeMetricFamily("ingest_event_stream_bytes", "Bytes the organizations' event "
                                    "streams hold in Redis (bounded by EVENTS_TOTAL_BYTES).", value=held)


class PartitionCollector:
    """``ingest_partition_default_rows`` and ``ingest_partitions_covered_seconds`` (how
    far ahead the newest partition reaches) on a partitioned PostgreSQL (DESIGN §17)."""

    def collect(self):
        try:
            found = partitions.report(utcnow())
        except Exception:  # the database is away: the scrape still answers
            log.warning("reading the partitions failed", exc_info=True)
            return
        if found is not None:
            yield GaugeMetricFamily("ingest_partition_default_rows", "Rows in interaction's default "
                                    "partition: each means a partition was missing.", value=found["default_rows"])
            yield GaugeMetricFamily("ingest_partitions_covered_seconds", "Seconds from now to the end of "
                                    "the newest partition of interaction.",
                                    value=(found["covered_until"] - utcnow()).total_seconds())


class ReplicaCollector:
    """``ingest_replica_lag_seconds``: how far the replica's replay is behind (DESIGN §18),
    measured on the replica at each scrape; nothing while it is down (then
    ``ingest_replica_fallback`` says reads go to the primary)."""

    def __init__(self, replica):
        self.replica = replica

    def collect(self):
        lag = self.replica.lag()
        if lag is not None:
            yield GaugeMetricFamily("ingest_replica_lag_seconds", "Seconds the read replica's replay is "
                                    "behind the primary (0 once it replayed all it received).", value=lag)


def exposition(backlog, bus, replica):
    """The text of `/metrics`: every process's metrics (or this one's), the backlog,
    the event streams' size and the replica's lag."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(REGISTRY)  # a registry collects like any collector
    registry.register(BacklogCollector(backlog))
    registry.register(BusCollector(bus))
    registry.register(PartitionCollector())
    if replica is not None:
        registry.register(ReplicaCollector(replica))
    return generate_latest(registry)


def init_app(app, backlog, bus, replica):
    """Serve `/metrics` (requests are counted and timed by ingest/web.py)."""

    @app.get("/metrics")
    def metrics():
        return Response(exposition(backlog, bus, replica), content_type=CONTENT_TYPE_LATEST)


def mark_process_dead(pid):
    """For gunicorn's child_exit: drop a dead worker's live gauges (its counters stay)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)
