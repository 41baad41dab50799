"""Live delivery: latency from ingest response to socket receipt with 100 sockets
at 500 events/s (DESIGN §12 goal: p99 <= 50 ms), then how many sockets one
server holds and the memory each costs, with ingest still served.

Production shape: gunicorn (gunicorn.conf.py, 2 workers) with EVENTS_URL=redis://.
The sockets are opened by a Node.js client (bench/feed_client.mjs) on the same
2 cores, so the figures include its share of the CPU.

    .venv/bin/python -m bench.feed [--sockets 100] [--rate 500] [--seconds 10] [--hold 1000]
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time

from bench.common import database_argument, scratch_environment

CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "feed_client.mjs")


def start_clients(url, key, count):
    """Node's WebSocket client (V8 parses 50,000 events a second on a fraction of a
    core, leaving the CPU to the server under test)."""
    process = subprocess.Popen(["node", "--experimental-websocket", CLIENT, url, key, str(count)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


def stop_clients(process):
    """Close the client's stdin; it answers with [[interaction id, receipt time], ...]."""
    output, _ = process.communicate(timeout=120)
    return json.loads(output)


def send(url, key, customer, rate, seconds, sent):
    """Single ingests at ``rate`` a second from 8 threads; records response times."""
    import requests
    from tests.helpers import interaction

    def sender(share):
        session, interval = requests.Session(), 8 / rate
        session.headers["Authorization"] = "Bearer " + key
        next_at = time.monotonic() + share * interval / 8
        deadline = time.monotonic() + seconds
        while next_at < deadline:
            time.sleep(max(0, next_at - time.monotonic()))
            response = session.post(url + "/api/data/ingest", json=interaction(customer))
            sent.append((response.json()["id"], time.time()))
            next_at += interval

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def delivery(web, org, customer, sockets, rate, seconds):
    clients = start_clients(web.url, org["readKey"], sockets)
    sent = []
    send(web.url, org["ingestKey"], customer, rate, seconds, sent)
    time.sleep(2)
    received = stop_clients(clients)
    answered = dict(sent)
    latencies = [(at - answered[i]) * 1000 for i, at in received if i in answered]
    print("delivery: %d sockets, %d events at %.0f/s offered (%.0f/s achieved), %d of %d "
          "deliveries arrived" % (sockets, len(sent), rate, len(sent) / seconds,
                                  len(latencies), len(sent) * sockets))
    print("  latency from ingest response to socket: p50 %.1f ms, p99 %.1f ms, max %.1f ms "
          "(mean %.1f; negative = before the response)" % (
              percentile(latencies, 0.5), percentile(latencies, 0.99), max(latencies),
              statistics.mean(latencies)))


def worker_rss_kb(master_pid):
    total = 0
    for pid in os.listdir("/proc"):
        try:
            with open("/proc/%s/stat" % pid) as stat:
                if int(stat.read().rsplit(")", 1)[1].split()[1]) != master_pid:
                    continue
            with open("/proc/%s/status" % pid) as status:
                total += next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
        except (OSError, ValueError, StopIteration):
            continue
    return total


def hold(web, org, idle_org, customer, count):
    import requests
    from tests.feed_client import RawSocket
    from tests.helpers import interaction

    session = requests.Session()
    session.headers["Authorization"] = "Bearer " + org["ingestKey"]

    def ingest_ms():
        started = time.monotonic()
        for _ in range(100):
            assert session.post(web.url + "/api/data/ingest",
                                json=interaction(customer)).status_code == 201
        return (time.monotonic() - started) / 100 * 1000

    alone = ingest_ms()
    before = worker_rss_kb(web.process.pid)
    # Sockets of another organization: what they cost while idle, not their fan-out
    # (the delivery run above measures that).
    sockets = [RawSocket(web.url, idle_org["readKey"]) for _ in range(count)]
    after = worker_rss_kb(web.process.pid)
    held = ingest_ms()
    print("held %d sockets at once; worker RSS %.0f MiB -> %.0f MiB: %.1f KiB per socket" % (
        len(sockets), before / 1024, after / 1024, (after - before) / count))
    print("  sequential ingest: %.2f ms per request alone, %.2f ms with the sockets open "
          "(ratio %.2f)" % (alone, held, held / alone))
    for raw in sockets:
        raw.sock.close()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sockets", type=int, default=100)
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--hold", type=int, default=1000)
    database_argument(parser)
    args = parser.parse_args()
    url = scratch_environment(args.database_url)
    os.environ["EVENTS_URL"] = os.environ.get("BENCH_EVENTS_URL", "redis://127.0.0.1:6379/15")

    import models
    from app import create_app
    from ingest.cli import new_organization
    from models import Customer
    from tests.dbs import drop_scratch_database
    from tests.servers import Gunicorn

    with create_app().app_context():
        models.migrate()
        org, idle_org = new_organization("bench"), new_organization("idle")
        customer = str(Customer.create(organization=org["organizationId"]).id)
    web = Gunicorn(os.path.join(tempfile.mkdtemp(), "web.log"), workers=2,
                   env={"LOG_LEVEL": "WARNING"})
    try:
        delivery(web, org, customer, args.sockets, args.rate, args.seconds)
        hold(web, org, idle_org, customer, args.hold)
    finally:
        web.stop()
        drop_scratch_database(url)


if __name__ == "__main__":
    main()
