"""Every DESIGN §12 figure, side by side with its anchors, on SQLite and on
PostgreSQL + Redis, in one run and one table: ingest, growth, analysis
(bench/analysis.py) and live delivery (bench/feed.py).

- E: a bare Flask app that parses and echoes the same JSON (bench/echo.py), under
  the same gunicorn configuration as the service.
- W: the naive durable write (bench/naive.py): a bare Flask app that inserts each
  interaction and counts it with the raw driver, a transaction a request, under
  the same gunicorn configuration.
- B: the service's floor, bench.bound's stripped service (no hooks, no validation,
  no after-commit work, the same group-committed write), under gunicorn.
- D: the raw driver writing the same rows into the project's schema, 100 a
  transaction (bench/raw.py), in this process.
- The service: gunicorn -c gunicorn.conf.py (2 workers), no consumer running.
  Single ingests at 16 connections, batches of 100 at 4, driven by wrk. E, W and
  B serve the same database and keys; single ingest runs between W and B.
- Growth: batch events/s again once 1M interactions are stored (filled with raw SQL).

    .venv/bin/python -m bench.ingest [--seconds 10] [--databases sqlite,postgres] [--skip growth,analysis,feed]
    .venv/bin/python -m bench.ingest --quick      # a smoke run under a minute (CI)

The smoke run fails (exit status 1) when any side answered a request other than
2xx: its figure would measure errors (timeouts under load only warn).
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

from bench import analysis, feed, raw
from bench.common import ROOT, Stack, database_arguments, servers, texts

LUA = os.path.join(ROOT, "bench", "post.lua")
GROWTH_ROWS = 1_000_000


def log(message):
    print(message, file=sys.stderr, flush=True)


def wrk(url, key, bodies, connections, seconds):
    """wrk -c ``connections`` POSTing ``bodies`` in turn; requests/s, p50/p99 ms,
    failures (answers other than 2xx, and timeouts) and errors (those answers alone)."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as file:
        file.write("\n".join(json.dumps(body) for body in bodies) + "\n")
    output = subprocess.run(
        ["wrk", "-t", "2", "-c", str(connections), "-d", "%ds" % seconds, "--latency", "-s", LUA, url],
        env={**os.environ, "BODIES_FILE": file.name, "INGEST_KEY": key},
        check=True, capture_output=True, text=True).stdout
    os.unlink(file.name)
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", output))
    failures = errors + sum(int(n) for n in re.findall(r"timeout (\d+)", output))
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),
            "p50_ms": _millis(re.search(r"50%\s+([\d.]+\w+)", output).group(1)),
            "p99_ms": _millis(re.search(r"99%\s+([\d.]+\w+)", output).group(1)),
            "failures": failures, "errors": errors}


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


def anchor_apps():
    """The gunicorn apps of E, W and B, by their names in the figures."""
    from bench.bound import VARIANTS  # here: bench.bound imports this module

    return {"echo": "bench.echo:app", "naive": "bench.naive:app", "stripped": VARIANTS["stripped"]}


def ingest_figures(server_url, seconds, growth):
    """E, W, the service's single ingest, B, batch ingest, D and growth, on one database."""
    from tests.servers import Gunicorn

    stack = Stack(server_url)
    anchors = {}
    try:
        for name, app in anchor_apps().items():
            anchors[name] = Gunicorn(os.path.join(stack.dir, name + ".log"), workers=2, app=app,
                                     env=stack.env)
        org = stack.organization("bench", customers=100)
        filler = stack.organization("filler", customers=100)
        key, customers = org["ingestKey"], org["customers"]
        log("%s: E (echo), W (naive write), single ingest, B (stripped), D (raw driver), batch ingest"
            % stack.kind)
        figures = {"database": stack.kind}
        for name, url in (("echo", anchors["echo"].url), ("naive", anchors["naive"].url),
                          ("single", stack.url), ("stripped", anchors["stripped"].url)):
            figures[name] = wrk(url + "/api/data/ingest", key, single_bodies(customers), 16, seconds)
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
        for server in anchors.values():
            server.stop()
        stack.stop()
    return figures


def ratios(figures):
    single, batch = figures["single"], figures["batch"]
    result = {"single": single["rps"] / figures["echo"]["rps"],
              "single_b": single["rps"] / figures["stripped"]["rps"],
              "single_w": single["rps"] / figures["naive"]["rps"],
              "batch": batch["rps"] * 100 / figures["raw_rows"]}
    if "batch_full" in figures:
        result["growth"] = figures["batch_full"]["rps"] / batch["rps"]
    return result


def failed(run, whose=""):
    """A warning for a wrk run with failed requests: its rate means nothing."""
    return "; **%d %srequests failed**" % (run["failures"], whose) if run["failures"] else ""


def single_to_anchors(r, single, b, w):
    return "**%.2f** x B, **%.2f** x W (%.0f / %.0f / %.0f req/s), p99 %.1f ms (B %.1f, W %.1f)%s" % (
        r["single_b"], r["single_w"], single["rps"], b["rps"], w["rps"], single["p99_ms"],
        b["p99_ms"], w["p99_ms"], failed(single) + failed(b, "of B's ") + failed(w, "of W's "))


def rows(figures):
    """The table's rows for one database: {what: (figures, goal)}."""
    r, s, b, e = ratios(figures), figures["single"], figures["batch"], figures["echo"]
    table = {
        "single ingest / B and W, 16 conns": (single_to_anchors(r, s, figures["stripped"], figures["naive"]),
                                              ">= 0.9 x B, >= 1.2 x W, p99 <= 50 ms"),
        "single ingest / E, 16 conns": (
            "**%.2f** (%.0f / %.0f req/s), p50 %.1f, p99 %.1f ms%s" % (
                r["single"], s["rps"], e["rps"], s["p50_ms"], s["p99_ms"], failed(s)),
            "for scale (was >= 0.5)"),
        "batch of 100 / D, 4 conns": (
            "**%.2f** (%.0f / %.0f events/s), p50 %.1f, p99 %.1f ms%s" % (
                r["batch"], b["rps"] * 100, figures["raw_rows"], b["p50_ms"], b["p99_ms"], failed(b)),
            ">= 0.5 (PostgreSQL >= 0.9), p99 <= 250 ms"),
    }
    if "growth" in r:
        full = figures["batch_full"]
        table["batch with 1M stored / empty"] = (
            "**%.2f** (%.0f / %.0f events/s)%s" % (r["growth"], full["rps"] * 100, b["rps"] * 100,
                                                   failed(full)), ">= 0.8")
    if "analysis" in figures:
        a = figures["analysis"]
        table["analysis: consumer (-w %d) / VADER loop" % a["workers"]] = (
            "**%.2f** (%d / %d per s)" % (a["ratio"], a["consumer"], a["vader_loop"]), ">= 0.8")
    for row in figures.get("feed", {}).get("delivery", ()):
        table["live, %d sockets x %d events/s" % (row["sockets"], row["rate"])] = (
            "p50 %.1f, **p99 %.1f** ms, %d of %d delivered, %d dropped; machine idle %.2f" % (
                row["p50_ms"], row["p99_ms"], row["arrived"], row["expected"], row["dropped"],
                row["cores"]["idle_share"]),
            "p99 <= 50 ms, none lost")
    if "feed" in figures:
        h = figures["feed"]["hold"]
        table["%d idle sockets held" % h["held"]] = (
            "%.1f KiB each; single ingest latency x%.2f with them open" % (
                h["kib_per_socket"], h["ratio"]), "flat")
    return table


def print_table(results):
    tables = [rows(figures) for figures in results]
    print("\n| DESIGN §12 | %s | goal |" % " | ".join(f["database"] for f in results))
    print("|---|%s---|" % ("---|" * len(results)))
    for what in tables[0]:
        print("| %s | %s | %s |" % (what, " | ".join(t.get(what, ("",))[0] for t in tables),
                                    tables[0][what][1]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    database_arguments(parser)
    parser.add_argument("--skip", default="", help="comma-separated: growth, analysis, feed")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of the ingest rows, under a minute; fails on error answers, not on speed")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    seconds = 2 if args.quick else args.seconds
    if args.quick:
        skip |= {"growth", "analysis", "feed"}
    results = []
    for server in servers(args):
        figures = ingest_figures(server, seconds, "growth" not in skip)
        if "analysis" not in skip:
            log("%s: analysis" % figures["database"])
            figures["analysis"] = analysis.bench(server, 20000, analysis.WORKERS)
        if "feed" not in skip:
            log("%s: live delivery" % figures["database"])
            figures["feed"] = feed.bench(server, feed.ROWS, seconds, feed.HOLD)
        results.append(figures)
    print_table(results)
    print(json.dumps(results))
    broken = ["%s %s: %d" % (figures["database"], name, run["errors"]) for figures in results
              for name, run in figures.items() if isinstance(run, dict) and run.get("errors")]
    if args.quick and broken:
        sys.exit("answers other than 2xx (%s): a side of the smoke run is broken" % ", ".join(broken))


if __name__ == "__main__":
    main()
