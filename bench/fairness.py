"""Write fairness: one organization's single ingests, alone and while another
organization's 8 clients post 1,000-item batches without pause (hardening round
2: the victim's p50 went from 3 ms to 3.0 s before the group commit took
organizations in turn). Side by side in one run, on SQLite and PostgreSQL + Redis.

    .venv/bin/python -m bench.fairness [--seconds 10] [--databases sqlite,postgres]
"""
import argparse
import json
import threading
import time

import requests

from bench.common import Stack, database_arguments, percentile, servers
from bench.ingest import batch_bodies, single_bodies


def victim_latencies(url, org, seconds):
    session = requests.Session()
    session.headers["Authorization"] = "Bearer " + org["ingestKey"]
    latencies, bodies = [], single_bodies(org["customers"], count=200)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        assert session.post(url + "/api/data/ingest", json=bodies[len(latencies) % 200]).status_code == 201
        latencies.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": round(percentile(latencies, 0.5), 1), "p99_ms": round(percentile(latencies, 0.99), 1),
            "requests": len(latencies)}


def flood(url, org, stop):
    session = requests.Session()
    session.headers["Authorization"] = "Bearer " + org["ingestKey"]
    body = {"interactions": [item for chunk in batch_bodies(org["customers"], count=10)
                             for item in chunk["interactions"]]}
    while not stop.is_set():
        session.post(url + "/api/data/ingest/batch", json=body)


def bench(server_url, seconds):
    stack = Stack(server_url)
    try:
        victim, heavy = stack.organization("victim", customers=10), stack.organization("heavy", customers=100)
        alone = victim_latencies(stack.url, victim, seconds)
        stop = threading.Event()
        flooders = [threading.Thread(target=flood, args=(stack.url, heavy, stop)) for _ in range(8)]
        for thread in flooders:
            thread.start()
        time.sleep(1)
        loaded = victim_latencies(stack.url, victim, seconds)
        stop.set()
        for thread in flooders:
            thread.join()
        return {"database": stack.kind, "alone": alone, "beside_8_batch_clients": loaded}
    finally:
        stack.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    database_arguments(parser)
    args = parser.parse_args()
    results = [bench(server, args.seconds) for server in servers(args)]
    for r in results:
        print("%s: victim's single ingest alone p50 %.1f / p99 %.1f ms; beside 8 clients posting "
              "1,000-item batches p50 %.1f / p99 %.1f ms" % (
                  r["database"], r["alone"]["p50_ms"], r["alone"]["p99_ms"],
                  r["beside_8_batch_clients"]["p50_ms"], r["beside_8_batch_clients"]["p99_ms"]))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
