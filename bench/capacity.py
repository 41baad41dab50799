"""The per-core capacity model (docs/CAPACITY.md, DESIGN §18): what one core of
each part does, measured here, and what a target rate of events/s needs.

    .venv/bin/python -m bench.capacity [--rates 1000,10000,100000]   # the model's table
    .venv/bin/python -m bench.capacity --plot docs/capacity.png      # and its picture
    .venv/bin/python -m bench.capacity --measure [--seconds 8] [--rounds 3]
    .venv/bin/python -m bench.capacity --measure-disk [--count 100000]
    .venv/bin/python -m bench.capacity --measure-lock [--seconds 5]

--measure (PostgreSQL + Redis): one gunicorn worker (pinned to a CPU, as
gunicorn.conf.py does) takes single ingests (wrk, 16 connections), then batches
of 100 (4 connections); then one consumer (-w 4, pinned) analyses what they
stored. Around each step the CPU time of the worker, of the database's own
backends, of the consumer and of Redis is read from /proc/<pid>/stat, the
events from the table, and the WAL written from pg_current_wal_lsn() (that one
is the whole server's). Each round waits for a quiet machine first (load <= 1.0).

--measure-disk: ``--count`` interactions of 1,000 customers, each with a
messageId, through the batch API, analysed by one consumer, then VACUUM; the
bytes of every table and index per interaction, and Redis's bytes per buffered
live event and per queued analysis.

--measure-lock: one connection running the service's own write statements for a
single organization, as fast as it can: the ingest statement (store.py) and the
analysis's store transaction (analysis.py), groups of 100 and 500. Each holds the
organization's change-stream row until it commits, so their time bounds what one
organization can write a second, on any hardware.
"""
import argparse
import datetime
import json
import math
import os
import signal
import sys
import threading
import time
import uuid

import psycopg

from bench.common import POSTGRES, REDIS, Stack, cpu_seconds, texts
from bench.ingest import batch_bodies, single_bodies, wrk
from tests.servers import Consumer

# --- The model: measured per-core figures (docs/CAPACITY.md has how, when and at what load) ---
# Medians of three rounds of --measure, rounded; per CPU-second of the part named.

WEB_SINGLE = 1_800  # single ingests/s per web core (one gunicorn worker)
WEB_BATCH = 17_000  # events/s per web core, in batches of 100
PG_SINGLE = 9_600  # single-ingested events/s per PostgreSQL core (the write)
PG_BATCH = 36_000  # batch-ingested events/s per PostgreSQL core
PG_ANALYSIS = 29_000  # analyses stored/s per PostgreSQL core
CONSUMER = 9_500  # analyses/s per consumer core (chat-like texts of 6-30 words)
REDIS_SINGLE = 34_000  # single-ingested events/s per Redis core (enqueue, publish); Redis is one core
REDIS_BATCH = 230_000  # the same, batch-ingested
REDIS_ANALYSIS = 210_000  # analyses/s per Redis core (dequeue, publish)
WAL_BYTES = 2_200  # WAL per event, ingested (90 % in batches) and analysed
DISK_BYTES = 1_400  # bytes on disk per interaction kept: table, indexes, its two changes, its key
REDIS_EVENT_BYTES = 940  # Redis memory per event buffered on the bus: its created and its analysed entry
ORG_CAP = 14_000  # events/s of ONE organization: its change-stream row serialises its commits
# Cited from docs/BENCHMARKS.md (issue 24), not measured again here:
FEED_DELIVERIES = 150_000  # socket deliveries/s per web core (events x sockets watching)

# --- Planning assumptions (not measurements; docs/CAPACITY.md says why) ---
UTILISATION = 0.6  # plan every core at this share of its measured rate
BATCH_SHARE = 0.9  # events arriving in batches (Segment's and PostHog's clients batch)
WATCHERS = 5  # feed sockets open on the organization of an event, on average
RETENTION_DAYS = 90
BUS_SECONDS = 10  # lag the Redis bus should cover before a listener reads from the store
PRIMARY_CORES = 32  # the cores one primary is counted on for a write-heavy load
WAL_LIMIT = 150 * 2 ** 20  # WAL bytes/s one primary, its archive and its replica's replay keep up with
PRIMARY_DISK = 20e12  # bytes one primary holds (restore and rebuild times grow with it)


def cores(rate, batch_share=BATCH_SHARE, watchers=WATCHERS):
    """Cores (Redis: instances) of each part that ``rate`` events/s keep at UTILISATION."""
    single, batch = rate * (1 - batch_share), rate * batch_share
    busy = {"web": single / WEB_SINGLE + batch / WEB_BATCH + rate * watchers / FEED_DELIVERIES,
            "consumer": rate / CONSUMER,
            "postgres": single / PG_SINGLE + batch / PG_BATCH + rate / PG_ANALYSIS,
            "redis": single / REDIS_SINGLE + batch / REDIS_BATCH + rate / REDIS_ANALYSIS}
    return {part: value / UTILISATION for part, value in busy.items()}


def needs(rate, batch_share=BATCH_SHARE, watchers=WATCHERS, retention_days=RETENTION_DAYS):
    """What ``rate`` events/s need, by the measured per-core figures."""
    day = rate * 86400 * DISK_BYTES
    return {
        "rate": rate,
        **{part: math.ceil(value) for part, value in cores(rate, batch_share, watchers).items()},
        "deliveries": rate * watchers,
        "disk_per_day_gb": day / 1e9,
        "disk_per_month_tb": day * 30 / 1e12,
        "disk_kept_tb": day * retention_days / 1e12,
        "wal_mb_per_s": rate * WAL_BYTES / 2 ** 20,
        "bus_mb": rate * BUS_SECONDS * REDIS_EVENT_BYTES / 2 ** 20,
        "one_primary": rate <= one_primary_limit(batch_share, retention_days),
    }


def primary_limits(batch_share=BATCH_SHARE, retention_days=RETENTION_DAYS):
    """The events/s one PostgreSQL primary takes, by what bounds it: {cpu, wal, disk}."""
    per_event = (1 - batch_share) / PG_SINGLE + batch_share / PG_BATCH + 1 / PG_ANALYSIS
    return {"cpu": PRIMARY_CORES * UTILISATION / per_event, "wal": WAL_LIMIT / WAL_BYTES,
            "disk": PRIMARY_DISK / (86400 * retention_days * DISK_BYTES)}


def one_primary_limit(batch_share=BATCH_SHARE, retention_days=RETENTION_DAYS):
    return min(primary_limits(batch_share, retention_days).values())


def table(rates):
    print("| events/s | web cores | consumer cores | PostgreSQL cores | Redis cores | Redis bus, %d s | WAL "
          "| disk a day | a month | kept %d days | one primary? |" % (BUS_SECONDS, RETENTION_DAYS))
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for rate in rates:
        n = needs(rate)
        print("| {rate:,} | {web} | {consumer} | {postgres} | {redis} | {bus_mb:,.0f} MiB | "
              "{wal_mb_per_s:,.1f} MiB/s | {disk_per_day_gb:,.0f} GB | {disk_per_month_tb:,.1f} TB | "
              "{disk_kept_tb:,.1f} TB | {0} |".format("yes" if n["one_primary"] else "**no**", **n))
    limits = primary_limits()
    print("\nOne primary takes up to {0:,.0f} events/s (by CPU {cpu:,.0f}, by WAL {wal:,.0f}, by disk {disk:,.0f}); "
          "one organization up to {1:,}.".format(min(limits.values()), ORG_CAP, **limits))


def plot(path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [10 ** (e / 20) for e in range(40, 111)]
    rows = [cores(rate) for rate in rates]
    figure, axis = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for key, label in (("web", "web cores (ingest + feed)"), ("consumer", "consumer cores"),
                       ("postgres", "PostgreSQL cores"), ("redis", "Redis cores (one per instance)")):
        axis.plot(rates, [row[key] for row in rows], label=label)
    limits = primary_limits()
    for (name, limit), height, colour in zip(
            (("one organization", ORG_CAP), ("one primary: disk, %d days kept" % RETENTION_DAYS, limits["disk"]),
             ("one primary: WAL", limits["wal"]), ("one primary: CPU", limits["cpu"])),
            (0.03, 0.3, 0.03, 0.3), ("firebrick", "grey", "grey", "grey"), strict=True):
        axis.axvline(limit, color=colour, linestyle=":" if colour == "firebrick" else "--", linewidth=1)
        axis.text(limit * 0.93, height, "%s\n%s events/s" % (name, f"{limit:,.0f}"), color=colour,
                  ha="right", fontsize=8)
    axis.set(xscale="log", yscale="log", xlim=(rates[0], rates[-1]), ylim=(0.001, 200),
             xlabel="events/s (%d %% in batches of 100, every one analysed)" % (BATCH_SHARE * 100),
             ylabel="cores, each at %d %% of its measured rate" % (UTILISATION * 100),
             title="What a rate of events needs (docs/CAPACITY.md)")
    axis.grid(True, which="major", alpha=0.3)
    axis.legend(loc="upper left", fontsize=8)  # the limits' labels sit low
    figure.tight_layout()
    figure.savefig(path)


# --- Measurements ----------------------------------------------------------------------------

PIN = sorted(os.sched_getaffinity(0))  # the web worker pins itself to the first, the consumer goes on the last
QUEUE_DB, EVENTS_DB = REDIS + "/12", REDIS + "/11"  # not the other benches' or the tests'


def log(message):
    print(message, file=sys.stderr, flush=True)


def quiet(limit=1.0, wait=600):
    """Wait (every 20 s, up to ``wait``) for a 1-minute load average <= ``limit``; returns it."""
    deadline = time.monotonic() + wait
    while (load := os.getloadavg()[0]) > limit and time.monotonic() < deadline:
        log("load %.2f, waiting" % load)
        time.sleep(20)
    return load


def redis_pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _comm(p) == "redis-server"]


def _comm(pid):
    try:
        with open("/proc/%s/comm" % pid) as comm:
            return comm.read().strip()
    except OSError:
        return None


class Probe:
    """CPU seconds of the parts, events and WAL bytes, between ``start`` and ``stop``."""

    def __init__(self, conn, database, parts):
        self.conn, self.database, self.parts = conn, database, parts  # parts: {name: () -> pids}

    def _read(self):
        pids = {name: find() for name, find in self.parts.items()}
        pids["postgres"] = [pid for (pid,) in self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            [self.database]).fetchall()]
        counts = self.conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE analysis_status <> 'pending'), "
            "pg_current_wal_lsn() - '0/0' FROM interaction").fetchone()
        return {name: cpu_seconds(p) for name, p in pids.items()}, counts

    def start(self):
        self.before = self._read()

    def stop(self):
        (cpu0, (n0, a0, w0)), (cpu1, (n1, a1, w1)) = self.before, self._read()
        spent = {name: sum(s - cpu0[name].get(pid, 0) for pid, s in cpu1[name].items()) for name in cpu1}
        return {"stored": n1 - n0, "analysed": a1 - a0, "wal_bytes": int(w1 - w0), "cpu": spent}


def vader_cpu_rate(samples):
    """VADER in a plain loop, texts per CPU-second of this process."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    started = time.process_time()
    for text in samples:
        analyzer.polarity_scores(text)
    return len(samples) / (time.process_time() - started)


def database(server_url, label):
    """A fresh database cap_<label>_<hex> on the server; its URL."""
    name = "cap_%s_%s" % (label, uuid.uuid4().hex[:8])
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute('CREATE DATABASE "%s"' % name)
    return server_url.rsplit("/", 1)[0] + "/" + name, name


def drain(stack, probe, conn, consumer_cpu):
    """Start a pinned consumer, let it analyse everything pending; the probe's figures
    from its first stored analysis on."""
    consumer = Consumer(os.path.join(stack.dir, "consumer.log"), env=stack.env, workers=4, cpu=consumer_cpu)
    probe.parts["consumer"] = lambda: [consumer.process.pid]
    try:
        pending = "SELECT count(*) FROM interaction WHERE analysis_status = 'pending'"
        total = conn.execute(pending).fetchone()[0]
        while conn.execute(pending).fetchone()[0] > total - 100:
            time.sleep(0.05)
        probe.start()
        while conn.execute(pending).fetchone()[0]:
            time.sleep(0.2)
        return probe.stop()
    finally:
        consumer.stop()
        del probe.parts["consumer"]


def measure(server_url, seconds, rounds):
    url, name = database(server_url, "cpu")
    stack = Stack(server_url, workers=1, env={"QUEUE_URL": QUEUE_DB, "EVENTS_URL": EVENTS_DB}, database_url=url)
    results = []
    try:
        org = stack.organization("capacity", customers=100)
        key, customers = org["ingestKey"], org["customers"]
        with psycopg.connect(url, autocommit=True) as conn:
            probe = Probe(conn, name, {"web": stack.web.worker_pids, "redis": redis_pids})
            for number in range(rounds):
                load = quiet()
                log("round %d (load %.2f)" % (number + 1, load))
                row = {"load": load, "vader_loop": round(vader_cpu_rate(texts(3000)))}  # the machine's speed today
                for step, path, bodies, connections in (
                        ("single", "/api/data/ingest", single_bodies(customers, seed=10 + number), 16),
                        ("batch", "/api/data/ingest/batch", batch_bodies(customers, seed=20 + number), 4)):
                    probe.start()
                    row[step] = {**wrk(stack.url + path, key, bodies, connections, seconds), **probe.stop()}
                row["analysis"] = drain(stack, probe, conn, PIN[-1])
                row["load_after"] = os.getloadavg()[0]
                results.append(row)
                log(json.dumps(row))
    finally:
        stack.stop()
    report(results)


def report(results):
    print("| round | load before, after | VADER loop per CPU-s | single: req/s, per web CPU-s, per PG CPU-s, "
          "WAL B/event | batch: the same | analysis: per s, per consumer CPU-s, per PG CPU-s, WAL B/event |")
    print("|---|---|---|---|---|---|")
    for n, row in enumerate(results, 1):
        cells = []
        for step, part in (("single", "web"), ("batch", "web"), ("analysis", "consumer")):
            r = row[step]
            count = r["analysed"] if step == "analysis" else r["stored"]
            rate = "%.0f" % r["rps"] if "rps" in r else ""
            cells.append("%s, %.0f, %.0f, %.0f" % (rate, count / r["cpu"][part], count / r["cpu"]["postgres"],
                                                   r["wal_bytes"] / count))
        print("| %d | %.2f, %.2f | %d | %s |" % (n, row["load"], row["load_after"], row["vader_loop"],
                                                 " | ".join(cells)))
    print(json.dumps(results))


SIZES = """
SELECT t.name, sum(pg_relation_size(c.oid) + COALESCE(pg_total_relation_size(c.reltoastrelid), 0)),
       sum(pg_indexes_size(c.oid))
FROM (VALUES ('interaction'), ('customer'), ('change'), ('change_stream'), ('message_key')) AS t(name)
JOIN pg_class AS c ON c.relname = t.name AND t.name <> 'interaction'
  OR c.oid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = 'interaction'::regclass) AND t.name = 'interaction'
GROUP BY t.name ORDER BY t.name"""


def table_sizes(conn):
    """{table: (bytes of its rows, of its indexes)}, interaction's partitions together."""
    return {name: (int(rows), int(indexes)) for name, rows, indexes in conn.execute(SIZES).fetchall()}


def measure_disk(server_url, count):
    import redis
    import requests

    load = quiet()
    url, name = database(server_url, "disk")
    stack = Stack(server_url, env={"QUEUE_URL": QUEUE_DB, "EVENTS_URL": EVENTS_DB}, database_url=url)
    try:
        org = stack.organization("capacity", customers=1000)
        samples = texts(count, seed=11)
        session = requests.Session()
        session.headers["Authorization"] = "Bearer " + org["ingestKey"]

        def post(starts):
            for start in starts:
                items = [{"customerId": org["customers"][n % 1000], "timestamp": "2026-12-01T00:00:00Z",
                          "channel": "chat", "eventType": "message", "content": samples[n],
                          "metadata": {"page": "/pricing", "plan": "pro"}, "messageId": "m%d" % n}
                         for n in range(start, min(count, start + 1000))]
                assert session.post(stack.url + "/api/data/ingest/batch", json={"interactions": items},
                                    timeout=60).json()["successful"] == len(items)

        started = time.perf_counter()
        posters = [threading.Thread(target=post, args=(range(s, count, 4000),)) for s in range(0, 4000, 1000)]
        for thread in posters:
            thread.start()
        for thread in posters:
            thread.join()
        log("stored %d in %.1f s" % (count, time.perf_counter() - started))
        bus, queue = redis.Redis.from_url(EVENTS_DB), redis.Redis.from_url(QUEUE_DB)
        streams = list(bus.scan_iter("ingest:events:*"))
        bus_bytes = sum(bus.memory_usage(k, samples=0) for k in streams)
        bus_counted = int(bus.hget("ingest:events-bytes", "*") or 0)  # what EVENTS_*_BYTES bound
        bus_events = sum(len(fields[b"p"].split(b",")) for k in streams for _, fields in bus.xrange(k)
                         if b"e" in fields)
        queue_bytes = sum(queue.memory_usage(k, samples=0) or 0 for k in queue.scan_iter())
        with psycopg.connect(url, autocommit=True) as conn:
            pending = conn.execute("SELECT count(*) FROM interaction WHERE analysis_status = 'pending'").fetchone()[0]
            sizes = {"ingested": table_sizes(conn)}
            probe = Probe(conn, name, {})
            sizes["analysis"] = drain(stack, probe, conn, PIN[-1])
            sizes["analysed"] = table_sizes(conn)
            backend = conn.info.backend_pid
            before, started = cpu_seconds([backend])[backend], time.perf_counter()
            conn.execute("VACUUM (ANALYZE)")
            sizes["vacuum"] = {"seconds": time.perf_counter() - started,
                               "cpu": cpu_seconds([backend])[backend] - before}
            sizes["vacuumed"] = table_sizes(conn)
            payload = float(conn.execute("SELECT avg(octet_length(content) + octet_length(metadata)) "
                                         "FROM interaction").fetchone()[0])
    finally:
        stack.stop()
    print("load %.2f; %d interactions of 1,000 customers, payload (content + metadata) %.0f bytes on average"
          % (load, count, payload))
    for stage in ("ingested", "analysed", "vacuumed"):
        print("%s: " % stage + ", ".join("%s %.0f + %.0f" % (n, h / count, i / count)
                                         for n, (h, i) in sizes[stage].items())
              + "; total %.0f bytes per interaction (table + indexes)"
              % (sum(h + i for h, i in sizes[stage].values()) / count))
    print("VACUUM after the analyses: %.1f s, %.1f CPU-s (%.1f µs per interaction)" % (
        sizes["vacuum"]["seconds"], sizes["vacuum"]["cpu"], sizes["vacuum"]["cpu"] / count * 1e6))
    print("Redis: bus %d bytes for %d buffered events (%.0f each; %d bytes counted against EVENTS_*_BYTES); "
          "queue %d bytes for %d pending analyses (%.0f each)" % (
              bus_bytes, bus_events, bus_bytes / max(bus_events, 1), bus_counted, queue_bytes, pending,
              queue_bytes / max(pending, 1)))
    print(json.dumps({"count": count, "load": load, "sizes": sizes, "payload": payload,
                      "bus": [bus_bytes, bus_events, bus_counted], "queue": [queue_bytes, pending]}))


def measure_lock(server_url, seconds):
    """Statements a second of one organization's writes on one connection (see the module)."""
    import models
    from ingest import analysis, changes, store

    load = quiet()
    url, _ = database(server_url, "lock")
    stack = Stack(server_url, env={"QUEUE_URL": QUEUE_DB, "EVENTS_URL": EVENTS_DB}, database_url=url)
    try:
        org = uuid.UUID(json.loads(stack.flask("create-org", "lock", "--json"))["organizationId"])
        with psycopg.connect(url, autocommit=True) as conn:
            customer = uuid.uuid4()
            conn.execute("INSERT INTO customer (id, organization_id, traits, created_at, interaction_count) "
                         "VALUES (%s, %s, '{}', now(), 0)", [customer, org])
            results = {}
            for group in (100, 500):
                ingest, analyse, events = 0.0, 0.0, 0
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    now = time.strftime("%Y-%m-%dT%H:%M:%S")
                    rows = [{"id": str(uuid.uuid4()), "organization_id": str(org), "customer_id": str(customer),
                             "message_id": None, "timestamp": now, "received_at": now, "channel": "chat",
                             "event_type": "message", "content": "Thanks, the support team was super helpful.",
                             "metadata": '{"page": "/pricing"}', "analysis_status": "pending", "ord": n}
                            for n in range(group)]
                    started = time.perf_counter()
                    conn.execute(store.INSERT_AND_COUNT, [json.dumps(rows)])
                    middle = time.perf_counter()
                    with conn.transaction():  # analysis.store_results: lock, update, take, record, commit
                        conn.execute("SELECT 1 FROM change_stream WHERE organization_id = %s FOR UPDATE", [org])
                        conn.execute(analysis.STORE_POSTGRES, [None, now, json.dumps(
                            [{"id": r["id"], "received_at": now, "status": "done", "label": "positive",
                              "score": 0.7} for r in rows]), now, now]).fetchall()
                        first = conn.execute(changes.TAKE, [org, group]).fetchone()[0] - group + 1
                        stamp = datetime.datetime.fromisoformat(now)
                        conn.execute(*changes.RECORD[models.POSTGRES](
                            [(org, first + n, changes.Kind.ANALYZED, row["id"], stamp) for n, row in enumerate(rows)],
                            stamp))
                    ingest += middle - started
                    analyse += time.perf_counter() - middle
                    events += group
                results[group] = {"events": events, "ingest_ms": ingest / events * group * 1000,
                                  "analysis_ms": analyse / events * group * 1000,
                                  "events_per_s": events / (ingest + analyse)}
    finally:
        stack.stop()
    print("load %.2f" % load)
    for group, r in results.items():
        print("group of %d: ingest statement %.1f ms, analysis transaction %.1f ms; one connection, one "
              "organization: %.0f events/s written and analysed" % (group, r["ingest_ms"], r["analysis_ms"],
                                                                   r["events_per_s"]))
    print(json.dumps({"load": load, "groups": results}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="1000,10000,100000", help="events/s to size for")
    parser.add_argument("--plot", metavar="PNG", help="draw the cores needed against events/s")
    parser.add_argument("--measure", action="store_true", help="web, PostgreSQL and consumer CPU per event")
    parser.add_argument("--measure-disk", action="store_true", help="bytes per interaction and per live event")
    parser.add_argument("--measure-lock", action="store_true", help="one organization's write statements")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--postgres", default=POSTGRES, help="the PostgreSQL server (fresh databases on it)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed measurement still stops its servers
    if args.measure:
        measure(args.postgres, args.seconds, args.rounds)
    elif args.measure_disk:
        measure_disk(args.postgres, args.count)
    elif args.measure_lock:
        measure_lock(args.postgres, args.seconds)
    else:
        table([int(rate) for rate in args.rates.split(",")])
        if args.plot:
            plot(args.plot)


if __name__ == "__main__":
    main()
