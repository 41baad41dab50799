"""Ingest throughput side by side with its ceilings (DESIGN §12), on SQLite and on
PostgreSQL + Redis, in one run; then analysis and live delivery, in one table.

- E: a bare Flask app that parses and echoes the same JSON (bench/echo.py), under
  the same gunicorn configuration as the service.
- D: the raw driver writing the same rows into the project's schema, 100 a
  transaction (bench/raw.py), in this process.
- The service: gunicorn -c gunicorn.conf.py (2 workers), no consumer running.
  Single ingests at 16 connections, batches of 100 at 4, driven by wrk.
- Growth: batch events/s again once 1M interactions are stored (filled with raw SQL).

    .venv/bin/python -m bench.ingest [--seconds 10] [--databases sqlite,postgres] [--skip growth,analysis,feed]
    .venv/bin/python -m bench.ingest --quick      # a smoke run under a minute (CI)
"""
import argparse
import datetime
import json
import os
import random
import re
import subprocess
import sys
import tempfile

from bench import raw
from bench.common import ROOT, Stack, database_arguments, servers, texts

LUA = os.path.join(ROOT, "bench", "post.lua")
GROWTH_ROWS = 1_000_000
TARGETS = {"single": 0.5, "batch": 0.5, "growth": 0.8, "analysis": 0.8}


def log(message):
    print(message, file=sys.stderr, flush=True)


def wrk(url, key, bodies, connections, seconds):
    """wrk -c ``connections`` POSTing ``bodies`` in turn; requests/s, p50/p99 ms, failures."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as file:
        file.write("\n".join(json.dumps(body) for body in bodies) + "\n")
    output = subprocess.run(
        ["wrk", "-t", "2", "-c", str(connections), "-d", "%ds" % seconds, "--latency", "-s", LUA, url],
        env={**os.environ, "BODIES_FILE": file.name, "INGEST_KEY": key},
        check=True, capture_output=True, text=True).stdout
    os.unlink(file.name)
    failures = sum(int(n) for n in re.findall(r"(?:Non-2xx or 3xx responses|timeout):? (\d+)", output))
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),
            "p50_ms": _millis(re.search(r"50%\s+([\d.]+\w+)", output).group(1)),
            "p99_ms": _millis(re.search(r"99%\s+([\d.]+\w+)", output).group(1)),
            "failures": failures}


def _millis(text):
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]


def interaction(customer, rnd):
    when = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(
        seconds=rnd.randint(0, 86400 * 300))
    return {"customerId": customer, "timestamp": when.isoformat(), "channel": rnd.choice(
        ("web", "chat", "email")), "eventType": "message", "content": rnd.choice(TEXTS),
        "metadata": {"page": "/pricing", "plan": "pro"}}


TEXTS = texts(200)


def single_bodies(customers, count=2000, seed=1):
    rnd = random.Random(seed)
    return [interaction(rnd.choice(customers), rnd) for _ in range(count)]


def batch_bodies(customers, count=200, seed=2):
    rnd = random.Random(seed)
    return [{"interactions": [interaction(rnd.choice(customers), rnd) for _ in range(100)]}
            for _ in range(count)]


def ingest_figures(server_url, seconds, growth):
    """E, the service's single and batch ingest, D and growth, on one database."""
    from tests.servers import Gunicorn

    stack = Stack(server_url)
    echo = Gunicorn(os.path.join(stack.dir, "echo.log"), workers=2, app="bench.echo:app",
                    env=stack.env)
    try:
        org = stack.organization("bench", customers=100)
        filler = stack.organization("filler", customers=100)
        key, customers = org["ingestKey"], org["customers"]
        log("%s: E (echo), single ingest, D (raw driver), batch ingest" % stack.kind)
        figures = {"database": stack.kind}
        figures["echo"] = wrk(echo.url + "/api/data/ingest", key, single_bodies(customers), 16, seconds)
        figures["single"] = wrk(stack.url + "/api/data/ingest", key, single_bodies(customers), 16, seconds)
        figures["raw_rows"] = raw.rows_per_second(stack.database_url, filler["organizationId"],
                                                  filler["customers"], seconds)
        figures["batch"] = wrk(stack.url + "/api/data/ingest/batch", key, batch_bodies(customers),
                               4, seconds)
        if growth:
            log("%s: filling %d interactions, then batch ingest again" % (stack.kind, GROWTH_ROWS))
            raw.fill(stack.database_url, filler["organizationId"], filler["customers"], GROWTH_ROWS)
            figures["batch_full"] = wrk(stack.url + "/api/data/ingest/batch", key,
                                        batch_bodies(customers, seed=3), 4, seconds)
    finally:
        echo.stop()
        stack.stop()
    return figures


def ratios(figures):
    single, batch = figures["single"], figures["batch"]
    result = {"single": single["rps"] / figures["echo"]["rps"],
              "batch": batch["rps"] * 100 / figures["raw_rows"]}
    if "batch_full" in figures:
        result["growth"] = figures["batch_full"]["rps"] / batch["rps"]
    return result


def print_ingest(figures):
    r, s, b, e = ratios(figures), figures["single"], figures["batch"], figures["echo"]
    print("\n%s" % figures["database"])
    print("| what | service | anchor | ratio (goal) | p50 / p99 ms | failed |")
    print("|---|---|---|---|---|---|")
    print("| single ingest, 16 conns | %.0f req/s | E %.0f req/s | %.2f (>= 0.5) | %.1f / %.1f (p99 <= 50) | %d |"
          % (s["rps"], e["rps"], r["single"], s["p50_ms"], s["p99_ms"], s["failures"]))
    print("| batch of 100, 4 conns | %.0f events/s | D %.0f rows/s | %.2f (>= 0.5) | %.1f / %.1f (p99 <= 250) | %d |"
          % (b["rps"] * 100, figures["raw_rows"], r["batch"], b["p50_ms"], b["p99_ms"], b["failures"]))
    if "growth" in r:
        f = figures["batch_full"]
        print("| batch with 1M stored | %.0f events/s | empty store %.0f events/s | %.2f (>= 0.8) | %.1f / %.1f | %d |"
              % (f["rps"] * 100, b["rps"] * 100, r["growth"], f["p50_ms"], f["p99_ms"], f["failures"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    database_arguments(parser)
    parser.add_argument("--skip", default="", help="comma-separated: growth, analysis, feed")
    parser.add_argument("--quick", action="store_true", help="a smoke run under a minute, no thresholds")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    seconds = 2 if args.quick else args.seconds
    if args.quick:
        skip |= {"growth", "analysis", "feed"}
    results = [ingest_figures(server, seconds, "growth" not in skip) for server in servers(args)]
    for figures in results:
        print_ingest(figures)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
