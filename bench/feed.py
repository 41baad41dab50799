"""Live delivery (DESIGN §12): latency from an ingest's response to its arrival on
every socket of the organization, at several sockets x events/s; then sockets
held, memory per socket, and single-ingest latency with and without them open.
On SQLite and on PostgreSQL + Redis in one run.

The sockets are opened by a Node.js client (bench/feed_client.mjs) on the same
2 cores as the service, so the figures include its share of the CPU. Ingests
are single POSTs from 8 threads of this process at the row's rate.

Each row also says where the machine's CPU went while it ran (DESIGN §12 asks for
its idle share): the web workers, the Node client, this process's senders, and
the rest (the database, Redis, anything else). ``--threads`` also splits the web
workers' cores by thread (the request threads, the group commit, its follow-up,
the fan-out, the bus listener...), from each thread's CPU time in /proc: under
a saturated machine that is where the time went, which a sampling profiler's
view of the GIL is not. It needs py-spy (pip install py-spy) for the threads' names.

    .venv/bin/python -m bench.feed [--seconds 10] [--databases sqlite,postgres] [--quick] [--threads]
"""
import argparse
import collections
import http.client
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

from bench.common import BIN, Stack, cpu_seconds, database_arguments, percentile, servers, thread_cpu_seconds
from tests.servers import rss_kb

CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "feed_client.mjs")
ROWS = ((100, 500), (300, 50), (1000, 10), (1000, 50), (2000, 25))
QUICK_ROWS = ((100, 100),)
HOLD = 2000
# How long the client's sockets may take to open and authenticate; a socket that
# failed (its error is on stderr) never does, and the run stops rather than wait.
READY_SECONDS = 120


def start_clients(url, key, count):
    """Node's WebSocket client (V8 parses 50,000 events a second on a fraction of a
    core, leaving the CPU to the server under test)."""
    process = subprocess.Popen(["node", "--experimental-websocket", CLIENT, url, key, str(count)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    answered, _, _ = select.select([process.stdout], [], [], READY_SECONDS)
    if not answered or process.stdout.readline().strip() != "ready":
        process.kill()
        raise RuntimeError("the client's %d sockets were not all open within %d s" % (count, READY_SECONDS))
    return process


def stop_clients(process):
    """Close the client's stdin; it answers with what it received."""
    output, _ = process.communicate(timeout=300)
    return json.loads(output)


def send(url, key, customer, rate, seconds):
    """Single ingests at ``rate`` a second from 8 threads; [(id, response time)].
    Each thread keeps one connection (http.client, not requests, which cost the
    machine about a third of a core more at 500 a second: CPU the service under
    test did not get)."""
    from tests.helpers import interaction

    address = urlsplit(url)
    headers = {"Authorization": "Bearer " + key, "Content-Type": "application/json"}
    body = json.dumps(interaction(customer))
    sent = []

    def sender(share):
        connection, interval = http.client.HTTPConnection(address.hostname, address.port), 8 / rate
        next_at = time.monotonic() + share * interval / 8
        deadline = time.monotonic() + seconds
        while next_at < deadline:
            time.sleep(max(0, next_at - time.monotonic()))
            connection.request("POST", "/api/data/ingest", body, headers)
            response = connection.getresponse()
            sent.append((json.loads(response.read())["id"], time.time()))
            next_at += interval
        connection.close()

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sent


def delivery(stack, sockets, rate, seconds, threads=False):
    print("%s: %d sockets x %d events/s..." % (stack.kind, sockets, rate), file=sys.stderr)
    org = stack.organization("delivery %dx%d" % (sockets, rate))
    clients = start_clients(stack.url, org["readKey"], sockets) if sockets else None  # 0: ingest alone
    parts = {"web": stack.web.worker_pids(), "client": [clients.pid] if clients else [], "senders": [os.getpid()]}
    usage, by_thread = CpuUsage(parts), ThreadCpu(parts["web"]) if threads else None
    sent = send(stack.url, org["ingestKey"], org["customers"][0], rate, seconds)
    cores = usage.cores()
    if by_thread is not None:
        cores["web_threads"] = by_thread.cores()
    time.sleep(2)  # the last events in flight
    report = stop_clients(clients) if clients else {"received": [], "dropped": 0}
    answered = dict(sent)
    latencies = [(at - answered[i]) * 1000 for i, at in report["received"] if i in answered]
    return {"sockets": sockets, "rate": rate, "achieved": round(len(sent) / seconds),
            "expected": len(sent) * sockets, "arrived": len(latencies),
            "dropped": report["dropped"],
            "p50_ms": round(percentile(latencies, 0.5), 1),
            "p99_ms": round(percentile(latencies, 0.99), 1),
            "max_ms": round(max(latencies, default=float("nan")), 1), "cores": cores}


class CpuUsage:
    """The cores each part (``{name: pids}``, "web" among them) used from now on, the
    rest of the machine's busy time as "other", the machine's idle share, and the
    cores the web workers spent in the kernel (sends, polls, locks)."""

    def __init__(self, parts):
        self.parts = parts
        self.started = time.monotonic()
        self.machine = _machine_jiffies()
        self.seconds = {name: sum(cpu_seconds(pids).values()) for name, pids in parts.items()}
        self.web_kernel = sum(cpu_seconds(parts["web"], system_only=True).values())

    def cores(self):
        elapsed = time.monotonic() - self.started
        idle, total = (now - before for now, before in zip(_machine_jiffies(), self.machine, strict=True))
        used = {name: round((sum(cpu_seconds(pids).values()) - self.seconds[name]) / elapsed, 2)
                for name, pids in self.parts.items()}
        busy_cores = (1 - idle / total) * os.cpu_count()
        web_kernel = (sum(cpu_seconds(self.parts["web"], system_only=True).values()) - self.web_kernel) / elapsed
        return {**used, "other": round(max(0.0, busy_cores - sum(used.values())), 2),
                "idle_share": round(idle / total, 2), "web_kernel": round(web_kernel, 2)}


def _machine_jiffies():
    """(idle, total) CPU time of the machine so far, from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:9]]
    return fields[3] + fields[4], sum(fields)


class ThreadCpu:
    """The cores each kind of thread of ``workers`` used from now on. Python does not
    name its threads for the OS, so the names come from ``py-spy dump``; the pool
    threads that serve requests count together."""

    def __init__(self, workers):
        self.workers = workers
        self.started = time.monotonic()
        self.seconds = {pid: thread_cpu_seconds(pid) for pid in workers}

    def cores(self):
        elapsed = time.monotonic() - self.started
        kinds = collections.Counter()
        for pid in self.workers:
            names = _thread_names(pid)
            for tid, seconds in thread_cpu_seconds(pid).items():
                name = names.get(tid, "unnamed")
                kind = "request threads" if name.startswith("ThreadPoolExecutor") else name
                kinds[kind] += (seconds - self.seconds[pid].get(tid, 0)) / elapsed
        return {kind: round(used, 2) for kind, used in kinds.most_common() if used >= 0.005}


def _thread_names(pid):
    """{native thread id: Python thread name} of a process, from py-spy."""
    dump = subprocess.run([os.path.join(BIN, "py-spy"), "dump", "--nonblocking", "-p", str(pid)],
                          capture_output=True, text=True, check=True).stdout
    return {int(tid): name for tid, name in re.findall(r'^Thread (\d+) \([^)]*\): "([^"]*)"', dump, re.MULTILINE)}


def ingest_ms(url, key, customer, count=200):
    import requests

    from tests.helpers import interaction

    session = requests.Session()
    session.headers["Authorization"] = "Bearer " + key
    started = time.monotonic()
    for _ in range(count):
        assert session.post(url + "/api/data/ingest", json=interaction(customer)).status_code == 201
    return (time.monotonic() - started) / count * 1000


def hold(stack, count):
    """``count`` idle sockets of one organization while another ingests."""
    org, idle = stack.organization("ingesting"), stack.organization("idle")
    workers = stack.web.worker_pids()
    alone = ingest_ms(stack.url, org["ingestKey"], org["customers"][0])
    before = sum(map(rss_kb, workers))
    clients = start_clients(stack.url, idle["readKey"], count)
    after = sum(map(rss_kb, workers))
    held = ingest_ms(stack.url, org["ingestKey"], org["customers"][0])
    report = stop_clients(clients)
    return {"held": count - report["closed"], "kib_per_socket": round((after - before) / count, 1),
            "ingest_ms_alone": round(alone, 2), "ingest_ms_with_sockets": round(held, 2),
            "ratio": round(held / alone, 2)}


def bench(server_url, rows, seconds, hold_count, threads=False):
    stack = Stack(server_url)
    try:
        results = {"database": stack.kind,
                   "delivery": [delivery(stack, s, r, seconds, threads) for s, r in rows],
                   "hold": hold(stack, hold_count)}
    finally:
        stack.stop()
    return results


def print_table(results):
    print("\n%s: live delivery, ingest response -> socket" % results["database"])
    print("| sockets x events/s | achieved/s | arrived | dropped | p50 ms | p99 ms | max ms "
          "| idle share | cores: web (in the kernel) / client / senders / other |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in results["delivery"]:
        print("| %(sockets)d x %(rate)d | %(achieved)d | %(arrived)d of %(expected)d | "
              "%(dropped)d | %(p50_ms).1f | %(p99_ms).1f | %(max_ms).1f | " % row
              + "%(idle_share).2f | %(web).2f (%(web_kernel).2f) / %(client).2f / %(senders).2f / %(other).2f |"
              % row["cores"])
    for row in results["delivery"]:
        if "web_threads" in row["cores"]:
            print("%(sockets)d x %(rate)d, web cores by thread: " % row
                  + ", ".join("%s %.2f" % pair for pair in row["cores"]["web_threads"].items()))
    print("held %(held)d sockets: %(kib_per_socket).1f KiB each; sequential ingest "
          "%(ingest_ms_alone).2f ms alone, %(ingest_ms_with_sockets).2f ms with them "
          "(ratio %(ratio).2f)" % results["hold"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10)
    database_arguments(parser)
    parser.add_argument("--rows", help="sockets x events/s to run, e.g. 100x500,1000x50 (0x500: ingest alone)")
    parser.add_argument("--quick", action="store_true", help="one small row, a smoke run")
    parser.add_argument("--threads", action="store_true", help="split the web workers' cores by thread (py-spy)")
    args = parser.parse_args()
    rows, seconds, hold_count = (QUICK_ROWS, 2, 200) if args.quick else (ROWS, args.seconds, HOLD)
    if args.rows:
        rows = [tuple(map(int, row.split("x"))) for row in args.rows.split(",")]
    results = [bench(server, rows, seconds, hold_count, args.threads) for server in servers(args)]
    for result in results:
        print_table(result)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
