"""Analyses per second of one `huey_consumer` process against VADER in a plain loop
on the same texts, in the same run (DESIGN §12: goal >= 0.8 of the loop), on
SQLite (SQLite queue) and on PostgreSQL + Redis (Redis queue).

The texts are ingested first (batches through the HTTP API, nothing analysed
yet), then one consumer with its documented settings (-w 4, pinned to one CPU
with taskset) drains them; its rate is taken from the analysed_at stamps, after
its first task.

    .venv/bin/python -m bench.analysis [--count 20000] [--workers 4] [--databases sqlite,postgres]
"""
import argparse
import json
import os
import shutil
import time

import requests

from bench import raw
from bench.common import Stack, database_arguments, servers, texts
from tests.servers import Consumer

# As the README's production command runs a consumer: -w 4, on one CPU (taskset,
# where there is one: Linux).
WORKERS = 4
CPU = max(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") and shutil.which("taskset") else None


def vader_rate(samples):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    analyzer = SentimentIntensityAnalyzer()
    started = time.perf_counter()
    for text in samples:
        analyzer.polarity_scores(text)
    return len(samples) / (time.perf_counter() - started)


def consumer_rate(server_url, samples, workers):
    stack = Stack(server_url)
    try:
        org = stack.organization("analysis")
        session = requests.Session()
        session.headers["Authorization"] = "Bearer " + org["ingestKey"]
        for start in range(0, len(samples), 1000):
            items = [{"customerId": org["customers"][0], "timestamp": "2026-01-01T00:00:00Z",
                      "channel": "chat", "eventType": "message", "content": text}
                     for text in samples[start:start + 1000]]
            assert session.post(stack.url + "/api/data/ingest/batch",
                                json={"interactions": items}).json()["successful"] == len(items)
        consumer = Consumer(os.path.join(stack.dir, "analysis.log"), env=stack.env, workers=workers,
                            cpu=CPU)
        try:
            return stack.kind, _drained_rate(stack.database_url, len(samples))
        finally:
            consumer.stop()
    finally:
        stack.stop()


def _drained_rate(database_url, count):
    """Wait until nothing is pending; analyses per second between the first
    task's stamp and the last (analyzed_at is stamped once per task)."""
    conn, _, _ = raw.connect(database_url)
    try:
        while conn.execute("SELECT COUNT(*) FROM interaction WHERE analysis_status = 'pending'").fetchone()[0]:
            time.sleep(0.2)
        first, last = conn.execute("SELECT MIN(analyzed_at), MAX(analyzed_at) FROM interaction").fetchone()
    finally:
        conn.close()
    if isinstance(first, str):  # SQLite keeps them as text
        from datetime import datetime
        first, last = datetime.fromisoformat(first), datetime.fromisoformat(last)
    return (count - 100) / (last - first).total_seconds()


def bench(server_url, count, workers):
    samples = texts(count)
    before = vader_rate(samples)
    kind, consumer = consumer_rate(server_url, samples, workers)
    after = vader_rate(samples)
    loop = (before + after) / 2
    return {"database": kind, "vader_loop": round(loop), "consumer": round(consumer),
            "workers": workers, "ratio": round(consumer / loop, 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=WORKERS)
    database_arguments(parser)
    args = parser.parse_args()
    results = [bench(server, args.count, args.workers)
               for server in servers(args)]
    for r in results:
        print("%(database)s: consumer (-w %(workers)d) %(consumer)d analyses/s, VADER loop "
              "%(vader_loop)d/s: ratio %(ratio).2f (goal >= 0.8)" % r)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
