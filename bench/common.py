"""Shared set-up for the side-by-side benchmarks: scratch environments, a running
service stack, sample texts, percentiles."""
import json
import os
import random
import subprocess
import sys
import tempfile

WORDS = ("love great terrible awful fine okay happy sad slow fast broken excellent refund "
         "delivery support price quality product order late early helpful rude friendly "
         "the a is was and but very not really quite so too my your our package app").split()
REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def texts(count, seed=7):
    """Chat-like messages of 6 to 30 words."""
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(6, 30))).capitalize() + "."
            for _ in range(count)]


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


def scratch_environment(server_url=None):
    """Point DATABASE_URL/QUEUE_URL at fresh files, or a scratch database on the
    PostgreSQL server of ``server_url``; call before importing the app."""
    from tests.dbs import create_scratch_database

    run_dir = tempfile.mkdtemp(prefix="ingest-bench-")
    os.environ["INSTANCE_PATH"] = run_dir
    os.environ["DATABASE_URL"] = create_scratch_database(server_url, run_dir)
    os.environ["QUEUE_URL"] = "sqlite:///" + os.path.join(run_dir, "queue.db")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    return os.environ["DATABASE_URL"]


POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


def database_arguments(parser):
    parser.add_argument("--databases", default="sqlite,postgres",
                        help="which to bench on, in this order (default: sqlite,postgres)")
    parser.add_argument("--postgres", default=POSTGRES,
                        help="the PostgreSQL server (a scratch database is made on it)")


def servers(args):
    """What Stack takes for each database asked for: None (SQLite) or the server URL."""
    return [None if name == "sqlite" else args.postgres for name in args.databases.split(",")]


class Stack:
    """The service as deployed, in a scratch environment of its own: on SQLite
    (``server_url`` None: SQLite queue) or on a scratch database of a PostgreSQL
    server (Redis queue), Redis as the bus, gunicorn (gunicorn.conf.py) with
    ``workers``, and a huey_consumer if asked. Nothing is imported from the app:
    it is set up with its own CLI and driven over HTTP. ``root``: another checkout
    of the project to run instead of this one; ``app``: the gunicorn app to serve;
    ``database_url``: an empty database made beforehand instead of a scratch one
    (dropped by ``stop`` all the same)."""

    def __init__(self, server_url=None, workers=2, consumer=False, env=None, root=ROOT,
                 app="app:create_app()", database_url=None):
        from tests.dbs import create_scratch_database
        from tests.servers import Consumer, Gunicorn

        self.dir = tempfile.mkdtemp(prefix="ingest-bench-")
        self.database_url = database_url or create_scratch_database(server_url, self.dir)
        self.kind = "PostgreSQL + Redis" if server_url else "SQLite"
        queue = REDIS + "/14" if server_url else "sqlite:///" + os.path.join(self.dir, "queue.db")
        # Most benches measure ingest with no consumer draining the analyses: the
        # backlog bound (DESIGN §13) would refuse them after 100,000, so it is lifted.
        self.env = {"INSTANCE_PATH": self.dir, "DATABASE_URL": self.database_url,
                    "QUEUE_URL": queue, "EVENTS_URL": REDIS + "/15", "LOG_LEVEL": "INFO",
                    "ANALYSIS_BACKLOG_MAX": str(10 ** 12), **(env or {})}
        self.root = root
        self._empty_queue()  # tasks a stack before this one left, which its consumer would work through
        self.flask("init-db")
        self.web = Gunicorn(os.path.join(self.dir, "web.log"), workers=workers, env=self.env,
                            app=app, root=root)
        self.url = self.web.url
        self.consumer = Consumer(os.path.join(self.dir, "consumer.log"), env=self.env) if consumer else None

    def flask(self, *args):
        output = subprocess.run([os.path.join(BIN, "flask"), "--app", "app", *args], cwd=self.root,
                                env={**os.environ, **self.env}, check=True, capture_output=True,
                                text=True).stdout
        return output

    def organization(self, name, customers=1):
        """A new organization with its keys and ``customers`` customer ids."""
        import requests

        created = json.loads(self.flask("create-org", name, "--json"))
        created["customers"] = [
            requests.post(self.url + "/api/customers", json={"externalId": "c%d" % n},
                          headers={"Authorization": "Bearer " + created["ingestKey"]}).json()["id"]
            for n in range(customers)]
        return created

    def _empty_queue(self):
        """A Redis queue is shared by every stack on the server (a SQLite one is the stack's own file)."""
        if self.env["QUEUE_URL"].startswith("redis"):
            import redis
            redis.Redis.from_url(self.env["QUEUE_URL"]).flushdb()

    def stop(self):
        from tests.dbs import drop_database, is_postgres_url

        if self.consumer:
            self.consumer.stop()
        self.web.stop()
        self._empty_queue()
        if is_postgres_url(self.database_url):
            drop_database(self.database_url)


def cpu_seconds(pids, system_only=False):
    """{pid: user and system CPU seconds used so far} of ``pids``, or only the system
    (kernel) seconds (Linux /proc; a process gone meanwhile is left out)."""
    used = {pid: _stat_seconds("/proc/%d/stat" % pid, system_only) for pid in pids}
    return {pid: seconds for pid, seconds in used.items() if seconds is not None}


def thread_cpu_seconds(pid):
    """{native thread id: CPU seconds used so far} of each thread of ``pid``."""
    tasks = "/proc/%d/task" % pid
    used = {int(tid): _stat_seconds(os.path.join(tasks, tid, "stat")) for tid in os.listdir(tasks)}
    return {tid: seconds for tid, seconds in used.items() if seconds is not None}


def _stat_seconds(path, system_only=False):
    try:
        with open(path) as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return ((0 if system_only else int(fields[11])) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
