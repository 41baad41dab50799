"""Profile one gunicorn worker of the service under wrk load with py-spy, and print
where its CPU time goes (samples of the thread holding the GIL: inclusive and own
time per function, per thread).

    .venv/bin/python -m bench.profile [single|batch] [--postgres URL] [--seconds 10] [--rate 100]

py-spy comes from the package index (pip install py-spy); the raw profile is kept
for flame graphs (see the path printed).
"""
import argparse
import collections
import os
import subprocess
import sys
import threading

from bench.common import BIN, Stack
from bench.ingest import batch_bodies, single_bodies, wrk


def summarize(path, top=25):
    total, own, inclusive, threads = 0, collections.Counter(), collections.Counter(), collections.Counter()
    for line in open(path):
        stack, _, count = line.rstrip().rpartition(" ")
        if not count.isdigit():  # a frame whose name has a line break in it (py-spy prints it as is)
            continue
        count = int(count)
        frames = stack.split(";")
        total += count
        threads[frames[0]] += count
        own[frames[-1]] += count
        for frame in set(frames[1:]):
            inclusive[frame] += count
    print("%d samples" % total)
    for title, counter in (("threads", threads), ("inclusive", inclusive), ("own", own)):
        print("\n%s:" % title)
        for frame, count in counter.most_common(top):
            print("%5.1f%%  %s" % (100 * count / total, frame))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=("single", "batch"), nargs="?", default="single")
    parser.add_argument("--postgres", help="PostgreSQL server (default: SQLite)")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    args = parser.parse_args()
    stack = Stack(args.postgres)
    try:
        org = stack.organization("profile", customers=100)
        bodies, connections, path = ((single_bodies(org["customers"]), 16, "/api/data/ingest")
                                     if args.scenario == "single" else
                                     (batch_bodies(org["customers"]), 4, "/api/data/ingest/batch"))
        load = threading.Thread(target=lambda: print(wrk(stack.url + path, org["ingestKey"], bodies,
                                                         connections, args.seconds + 4)))
        load.start()
        worker = stack.web.worker_pids()[0]
        output = os.path.join(stack.dir, "profile-%s.txt" % args.scenario)
        subprocess.run([os.path.join(BIN, "py-spy"), "record", "-p", str(worker), "-d",
                        str(args.seconds), "-f", "raw", "-o", output, "--nonblocking", "--gil",
                        "--rate", str(args.rate)],
                       check=True, capture_output=True)
        load.join()
        summarize(output)
        print("\nraw profile: %s" % output, file=sys.stderr)
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
