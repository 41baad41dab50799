"""Soak: minutes of steady mixed load on the production shape, with the resident
memory of every process sampled every 5 s, printed as a table and drawn as a PNG,
so that a leak shows at a glance (DESIGN §12: a web worker's RSS flat within 10 %).
Not part of the test run; it takes as long as it is told (10 minutes by default).

Load: single ingests (40/s), batches of 100 (2/s), reads (10/s) and 50 live-feed
sockets reading everything, against gunicorn (2 workers) and a huey_consumer.

    .venv/bin/python -m bench.soak [--minutes 10] [--databases sqlite] [--plot docs/soak.png]
"""
import argparse
import random
import threading
import time

import requests

from bench.common import Stack, database_arguments, servers
from bench.ingest import batch_bodies, interaction, log
from tests.feed_client import FeedClient
from tests.servers import rss_kb

SAMPLE_SECONDS = 5
WARM_UP_SECONDS = 60  # growth is measured from the first sample after this


def paced(rate, stop, action):
    """Call ``action(n)`` ``rate`` times a second until ``stop`` is set."""
    interval, n = 1.0 / rate, 0
    next_at = time.monotonic()
    while not stop.is_set():
        action(n)
        n += 1
        next_at += interval
        stop.wait(max(0.0, next_at - time.monotonic()))


def load(stack, org, stop):
    """The steady mixed load, on threads; returns them."""
    session_for = threading.local()

    def session():
        if not hasattr(session_for, "session"):
            session_for.session = requests.Session()
        return session_for.session
    ingest_key, read_key = org["ingestKey"], org["readKey"]
    rnd = random.Random(5)
    batches = batch_bodies(org["customers"], count=50)
    actions = [
        (40, lambda n: session().post(stack.url + "/api/data/ingest", json=interaction(
            rnd.choice(org["customers"]), rnd), headers={"Authorization": "Bearer " + ingest_key})),
        (2, lambda n: session().post(stack.url + "/api/data/ingest/batch", json=batches[n % 50],
                                     headers={"Authorization": "Bearer " + ingest_key})),
        (10, lambda n: session().get(stack.url + "/api/interactions?limit=50",
                                     headers={"Authorization": "Bearer " + read_key})),
    ]
    threads = [threading.Thread(target=paced, args=(rate, stop, action), daemon=True)
               for rate, action in actions]
    sockets = [FeedClient(stack.url, read_key) for _ in range(50)]
    threads += [threading.Thread(target=drain, args=(sock, stop), daemon=True) for sock in sockets]
    for thread in threads:
        thread.start()
    return threads, sockets


def drain(sock, stop):
    while not stop.is_set():
        sock.next(timeout=1)


def processes(stack):
    found = {"gunicorn master": stack.web.process.pid}
    for number, pid in enumerate(sorted(stack.web.worker_pids()), 1):
        found["web worker %d" % number] = pid
    found["consumer"] = stack.consumer.process.pid
    return found


def soak(server_url, minutes):
    stack = Stack(server_url, consumer=True)
    stop = threading.Event()
    samples = []  # (seconds, {process: MiB})
    try:
        org = stack.organization("soak", customers=200)
        watched = processes(stack)
        threads, sockets = load(stack, org, stop)
        started = time.monotonic()
        while time.monotonic() - started < minutes * 60:
            samples.append((time.monotonic() - started,
                            {name: rss_kb(pid) / 1024 for name, pid in watched.items()}))
            time.sleep(SAMPLE_SECONDS)
        stop.set()
        for sock in sockets:
            sock.close()
    finally:
        stop.set()
        stack.stop()
    return stack.kind, samples


def report(kind, samples):
    names = list(samples[0][1])
    base = next((values for seconds, values in samples if seconds >= WARM_UP_SECONDS), samples[0][1])
    print("\n%s, %d samples over %.0f s (MiB)\n" % (kind, len(samples), samples[-1][0]))
    print("| process | start | after warm-up | max | end | end / after warm-up |")
    print("|---|---|---|---|---|---|")
    for name in names:
        values = [sample[name] for _, sample in samples]
        print("| %s | %.1f | %.1f | %.1f | %.1f | %.2f |" % (
            name, values[0], base[name], max(values), values[-1], values[-1] / base[name]))


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(1, len(results), figsize=(7 * len(results), 4), squeeze=False)
    for axis, (kind, samples) in zip(axes[0], results, strict=True):
        for name in samples[0][1]:
            axis.plot([seconds / 60 for seconds, _ in samples], [values[name] for _, values in samples],
                      label=name)
        axis.set_title("RSS under steady load, %s" % kind)
        axis.set_xlabel("minutes")
        axis.set_ylabel("MiB")
        axis.set_ylim(bottom=0)
        axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    print("\nplot: %s" % path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--plot", default="soak.png")
    database_arguments(parser)
    parser.set_defaults(databases="sqlite")
    args = parser.parse_args()
    results = []
    for server_url in servers(args):
        log("soak on %s for %s minutes" % ("PostgreSQL + Redis" if server_url else "SQLite", args.minutes))
        results.append(soak(server_url, args.minutes))
        report(*results[-1])
    plot(results, args.plot)


if __name__ == "__main__":
    main()
