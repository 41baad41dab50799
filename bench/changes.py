"""The change feed (DESIGN §16) against DESIGN §12, on SQLite and on PostgreSQL + Redis:

- read: a page of 1,000 changes read at >= 50k changes/s. An organization gets
  ``--count`` interactions through the batch API (100 customers), then one
  huey_consumer analyses them: 2 x count changes, written by the real write
  path. wrk GETs /api/changes?after=...&limit=1000 through gunicorn (2 workers),
  walking the cursors of the feed's full pages in turn, at 1 and 4 connections,
  with the CPU a page took in the workers and the PostgreSQL backends; then
  `flask changes export` writes the whole feed to a file.
- ingest: single ingest (16 connections) and batches of 100 (4 connections) side
  by side with ``--baseline``, the commit before the change feed (a git
  worktree): both stacks run at once and are measured in turn, ``--rounds``
  times, in alternating order; each round's ratios are to that round's baseline.
  Which side runs first may favour one (the machine's load changes within a round),
  so the last row weighs both orders alike: the geometric mean of the ratios of the rounds where
  the baseline ran first, and of those where it ran second (take an even number
  of rounds; with one round the order is not balanced at all).

    .venv/bin/python -m bench.changes [--count 20000] [--seconds 10] [--rounds 3] [--skip read,ingest]
"""
import argparse
import functools
import json
import math
import os
import random
import subprocess
import tempfile
import time

import psycopg
import requests

from bench.common import ROOT, Stack, cpu_seconds, database_arguments, servers
from bench.ingest import batch_bodies, interaction, log, single_bodies, wrk
from bench.overhead import worktree
from tests.dbs import is_postgres_url
from tests.servers import Consumer, wait_until

BASELINE = "2762d44"  # 38dccf2~1, the last commit before the change feed
PAGE = 1000
CONNECTIONS = (1, 4)

# wrk: GET the paths of PATHS_FILE (one a line) in turn with the key READ_KEY;
# prints its figures as one JSON line at the end.
LUA = """
local paths = {}
for line in io.lines(os.getenv("PATHS_FILE")) do paths[#paths + 1] = line end
local next_path = 0
wrk.headers["Authorization"] = "Bearer " .. os.getenv("READ_KEY")

request = function()
  next_path = next_path % #paths + 1
  return wrk.format("GET", paths[next_path])
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests": %d, "rps": %.3f, "p50_ms": %.3f, "p99_ms": %.3f, "failures": %d}\\n',
    summary.requests, summary.requests / summary.duration * 1e6, latency:percentile(50) / 1000,
    latency:percentile(99) / 1000, e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def fill(stack, org, count):
    """``count`` interactions through the batch API, then a consumer analyses them all;
    returns when the feed holds both changes of each."""
    session = requests.Session()
    session.headers["Authorization"] = "Bearer " + org["ingestKey"]
    rnd = random.Random(4)
    for start in range(0, count, PAGE):
        items = [interaction(rnd.choice(org["customers"]), rnd) for _ in range(min(PAGE, count - start))]
        assert session.post(stack.url + "/api/data/ingest/batch",
                            json={"interactions": items}).json()["successful"] == len(items)
    consumer = Consumer(os.path.join(stack.dir, "consumer.log"), env=stack.env, workers=4)
    try:
        session.headers["Authorization"] = "Bearer " + org["readKey"]
        wait_until(_reader(session, stack.url, 2 * count), timeout=1800, interval=0.2,
                   message="every interaction analysed")
    finally:
        consumer.stop()


def _reader(session, url, count):
    """A condition for wait_until: true once the feed held ``count`` changes, read a
    page per call."""
    seen, after = 0, None

    def more():
        nonlocal seen, after
        page = session.get(url + "/api/changes", params={"after": after, "limit": PAGE}).json()
        seen, after = seen + len(page["items"]), page["nextCursor"]
        return seen >= count

    return more


def full_pages(session, url):
    """The paths of the feed's pages of a full PAGE changes, from the oldest."""
    paths, after = [], None
    while True:
        path = "/api/changes?limit=%d" % PAGE + ("&after=" + after if after else "")
        page = session.get(url + path).json()
        if len(page["items"]) < PAGE:
            return paths
        paths.append(path)
        after = page["nextCursor"]


def wrk_get(url, key, paths, connections, seconds):
    """wrk -c ``connections`` GETting ``paths`` in turn: requests/s, p50/p99 ms, failures."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as listing, \
            tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        listing.write("\n".join(paths) + "\n")
        script.write(LUA)
    try:
        output = subprocess.run(
            ["wrk", "-t", str(min(2, connections)), "-c", str(connections), "-d", "%ds" % seconds,
             "-s", script.name, url],
            env={**os.environ, "PATHS_FILE": listing.name, "READ_KEY": key},
            check=True, capture_output=True, text=True).stdout
    finally:
        os.unlink(listing.name)
        os.unlink(script.name)
    return json.loads(output.strip().splitlines()[-1])


def export_rate(stack, org):
    """Changes/s of `flask changes export --out` over the whole feed, start-up included."""
    out = os.path.join(stack.dir, "export.ndjson")
    started = time.perf_counter()
    stack.flask("changes", "export", "--org", org["organizationId"], "--out", out)
    elapsed = time.perf_counter() - started
    with open(out) as lines:
        return sum(1 for _ in lines) / elapsed


def read_figures(server_url, count, seconds):
    stack = Stack(server_url)
    try:
        org = stack.organization("changes", customers=100)
        log("%s: %d interactions, analysed" % (stack.kind, count))
        fill(stack, org, count)
        session = requests.Session()
        session.headers["Authorization"] = "Bearer " + org["readKey"]
        paths = full_pages(session, stack.url)
        figures = {"database": stack.kind, "changes": 2 * count, "pages": len(paths)}
        for connections in CONNECTIONS:
            log("%s: reading pages, %d connection(s)" % (stack.kind, connections))
            figures[connections] = _timed(stack, functools.partial(wrk_get, stack.url, org["readKey"], paths,
                                                                   connections, seconds))
        log("%s: flask changes export" % stack.kind)
        figures["export"] = export_rate(stack, org)
    finally:
        stack.stop()
    return figures


def _timed(stack, run):
    """``run``'s wrk figures, with the CPU time its requests took in the gunicorn
    workers and in the PostgreSQL backends, in ms a request: what the rate would be
    on a machine doing nothing else follows from them, however busy this one is."""
    before = _cpu(stack)
    figures = run()
    for name, used in _cpu(stack).items():
        figures[name + "_cpu_ms"] = sum(seconds - before[name].get(pid, 0) for pid, seconds in used.items()
                                        ) * 1000 / figures["requests"]
    return figures


def _cpu(stack):
    """{pid: CPU seconds used} of the stack's gunicorn workers and of its PostgreSQL backends."""
    return {"worker": cpu_seconds(stack.web.worker_pids()), "database": cpu_seconds(_backends(stack.database_url))}


def _backends(database_url):
    """The pids of the PostgreSQL backends connected to the database (none on SQLite)."""
    if not is_postgres_url(database_url):
        return []
    with psycopg.connect(database_url) as conn:
        return [pid for (pid,) in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")]


VARIANTS = ("before", "change feed")


def ingest_figures(server_url, baseline_root, seconds, rounds):
    """[{variant: {"single": wrk figures, "batch": wrk figures}}] a round."""
    stacks = {}
    try:
        for name in VARIANTS:
            env = {"PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="ingest-metrics-")}
            stacks[name] = Stack(server_url, env=env, root=baseline_root if name == "before" else ROOT)
        orgs = {name: stack.organization("bench", customers=100) for name, stack in stacks.items()}
        results = []
        for number in range(rounds):
            log("%s: ingest, round %d" % (stacks["before"].kind, number + 1))
            order = VARIANTS if number % 2 == 0 else VARIANTS[::-1]
            results.append({name: _ingest(stacks[name], orgs[name], seconds) for name in order})
    finally:
        for stack in stacks.values():
            stack.stop()
    return stacks["before"].kind, results


def _ingest(stack, org, seconds):
    key, customers = org["ingestKey"], org["customers"]
    return {"single": wrk(stack.url + "/api/data/ingest", key, single_bodies(customers), 16, seconds),
            "batch": wrk(stack.url + "/api/data/ingest/batch", key, batch_bodies(customers), 4, seconds)}


def print_read(figures):
    print("\n| database | changes (full pages) | connections | changes/s | page p50 | page p99 | failures | "
          "CPU a page: workers + database | changes/s on 2 idle cores |")
    print("|---|---|---|---|---|---|---|---|---|")
    for f in figures:
        for connections in CONNECTIONS:
            run = f[connections]
            cpu = run["worker_cpu_ms"] + run["database_cpu_ms"]
            print("| %s | %d (%d) | %d | **%.0f** | %.1f ms | %.1f ms | %d | %.1f + %.1f ms | %.0f |" % (
                f["database"], f["changes"], f["pages"], connections, run["rps"] * PAGE, run["p50_ms"],
                run["p99_ms"], run["failures"], run["worker_cpu_ms"], run["database_cpu_ms"],
                2 * PAGE * 1000 / cpu))
    for f in figures:
        print("%s: flask changes export, %.0f changes/s (start-up included)" % (f["database"], f["export"]))


def print_ingest(kind, results):
    print("\n| database | round | single: before req/s | single: feed / before | "
          "batch: before events/s | batch: feed / before |")
    print("|---|---|---|---|---|---|")
    for number, result in enumerate(results, 1):
        before, after = result["before"], result["change feed"]
        print("| %s | %d | %.0f (p99 %.1f ms) | **%.2f** (p99 %.1f ms) | %.0f (p99 %.1f ms) | **%.2f** (p99 %.1f ms) |"
              % (kind, number, before["single"]["rps"], before["single"]["p99_ms"],
                 after["single"]["rps"] / before["single"]["rps"], after["single"]["p99_ms"],
                 before["batch"]["rps"] * 100, before["batch"]["p99_ms"],
                 after["batch"]["rps"] / before["batch"]["rps"], after["batch"]["p99_ms"]))
    if len(results) > 1:
        print("| %s | both orders | | **%.2f** | | **%.2f** |" % (
            kind, balanced_ratio(results, "single"), balanced_ratio(results, "batch")))


def balanced_ratio(results, kind):
    """after / before over the rounds, each order (baseline first, baseline second)
    weighing alike: the geometric mean of the two orders' geometric means."""
    def log_ratio(result):
        return math.log(result["change feed"][kind]["rps"] / result["before"][kind]["rps"])

    orders = [results[0::2], results[1::2]]
    return math.exp(sum(sum(map(log_ratio, rounds)) / len(rounds) for rounds in orders) / 2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20000, help="interactions (each makes two changes)")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--skip", default="", help="comma-separated: read, ingest")
    database_arguments(parser)
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if "read" not in skip:
        figures = [read_figures(server, args.count, args.seconds) for server in servers(args)]
        print_read(figures)
        print(json.dumps(figures))
    if "ingest" not in skip:
        baseline_root = worktree(args.baseline)
        try:
            for server in servers(args):
                kind, results = ingest_figures(server, baseline_root, args.seconds, args.rounds)
                print_ingest(kind, results)
                print(json.dumps(results))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", baseline_root], cwd=ROOT, check=False)


if __name__ == "__main__":
    main()
