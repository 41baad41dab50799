"""What the rate limiter and the metrics cost single ingest (DESIGN §13, §14), side
by side in one run, on SQLite and on PostgreSQL + Redis:

- baseline: the project as it was before limits and metrics (``--baseline``, a git
  revision, checked out into a scratch worktree);
- metrics: this checkout, no RATE_LIMIT, metrics in multiprocess mode
  (PROMETHEUS_MULTIPROC_DIR), as in production;
- metrics + limit: the same with a RATE_LIMIT too high to refuse anything, so that
  every request pays for the check (in Redis on PostgreSQL + Redis, in memory on SQLite).

The three stacks run at once and are measured in turn, ``--rounds`` times, with wrk
at 16 connections; each round's ratios are to that round's baseline.

    .venv/bin/python -m bench.overhead [--baseline 23e0f6f] [--seconds 10] [--rounds 3]
"""
import argparse
import subprocess
import tempfile

from bench.common import REDIS, ROOT, Stack, database_arguments, servers
from bench.ingest import log, single_bodies, wrk

BASELINE = "23e0f6f"  # the last commit before limits and metrics


def worktree(revision):
    path = tempfile.mkdtemp(prefix="ingest-baseline-")
    subprocess.run(["git", "worktree", "add", "--detach", path, revision], cwd=ROOT, check=True,
                   capture_output=True)
    return path


VARIANTS = ("baseline", "metrics", "metrics + limit")


def start(name, server_url, baseline_root):
    # Each stack runs as in production: metrics in multiprocess mode (a baseline
    # from before metrics ignores the setting).
    env = {"PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="ingest-metrics-")}
    if name == "baseline":
        return Stack(server_url, env=env, root=baseline_root)
    if name == "metrics + limit":
        env.update(RATE_LIMIT="1000000/s", RATE_LIMIT_URL=REDIS + "/13" if server_url else "memory://")
    return Stack(server_url, env=env)


def measure(server_url, baseline_root, seconds, rounds):
    stacks = {}
    try:
        for name in VARIANTS:
            stacks[name] = start(name, server_url, baseline_root)
        orgs = {name: stack.organization("bench", customers=100) for name, stack in stacks.items()}
        results = []
        for round_number in range(rounds):
            log("%s: round %d" % (stacks["baseline"].kind, round_number + 1))
            results.append({name: wrk(stack.url + "/api/data/ingest", orgs[name]["ingestKey"],
                                      single_bodies(orgs[name]["customers"]), 16, seconds)
                            for name, stack in stacks.items()})
    finally:
        for stack in stacks.values():
            stack.stop()
    return stacks["baseline"].kind, results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    database_arguments(parser)
    args = parser.parse_args()
    baseline_root = worktree(args.baseline)
    try:
        print("\n| database | round | baseline req/s | metrics / baseline | metrics + limit / baseline |")
        print("|---|---|---|---|---|")
        for server_url in servers(args):
            kind, results = measure(server_url, baseline_root, args.seconds, args.rounds)
            for number, result in enumerate(results, 1):
                base = result["baseline"]
                print("| %s | %d | %.0f (p99 %.1f ms) | %.2f (p99 %.1f ms) | %.2f (p99 %.1f ms) |" % (
                    kind, number, base["rps"], base["p99_ms"],
                    result["metrics"]["rps"] / base["rps"], result["metrics"]["p99_ms"],
                    result["metrics + limit"]["rps"] / base["rps"], result["metrics + limit"]["p99_ms"]))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", baseline_root], cwd=ROOT, check=False)


if __name__ == "__main__":
    main()
