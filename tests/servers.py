"""Real processes for end-to-end tests: gunicorn serving the app over HTTP, nginx
in front of it, huey consumers, a private redis-server; where Chromium is."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)

CHROMIUM = "/usr/bin/chromium"  # Debian's, driven by Playwright (test_page, docs/make_screenshot.py)
# Chromium flags for a sandbox with no network but loopback (see the machine notes).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Loopback:
    """Where a process runs by default: this host, on 127.0.0.1 (tests/hosts.py
    has hosts of their own, each in its network namespace)."""

    address = "127.0.0.1"

    @staticmethod
    def command(argv):
        return argv

    @staticmethod
    def port():
        return free_port()


LOCAL = Loopback()


def wait_until(condition, timeout=20.0, interval=0.05, message="condition"):
    """Poll ``condition`` until it returns a truthy value; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out waiting for " + message)


class Gunicorn:
    """`gunicorn -c gunicorn.conf.py "app:create_app()"` on a free port of ``host``,
    from this checkout or from ``root`` (another checkout, for a side-by-side
    benchmark)."""

    def __init__(self, log_path, workers=2, env=None, app="app:create_app()", root=ROOT, host=LOCAL):
        self.port = host.port()
        self.url = "http://%s:%d" % (host.address, self.port)
        self.log_path = log_path
        self.workers = workers
        self.process = subprocess.Popen(
            host.command([os.path.join(BIN, "gunicorn"), "-c", "gunicorn.conf.py",
                          "--bind", "%s:%d" % (host.address, self.port), "--workers", str(workers), app]),
            cwd=root, env={**os.environ, "LOG_LEVEL": "INFO", **(env or {})},
            stdout=subprocess.DEVNULL, stderr=open(log_path, "w"), start_new_session=True)
        wait_until(self._ready, message="every gunicorn worker to be ready")

    def _ready(self):
        if self.process.poll() is not None:
            raise AssertionError("gunicorn exited: " + open(self.log_path).read()[-3000:])
        booted = open(self.log_path).read().count(" ready")  # post_worker_init in gunicorn.conf.py
        try:
            return booted >= self.workers and requests.get(self.url + "/healthz", timeout=1) is not None
        except requests.ConnectionError:
            return False

    def log_lines(self):
        lines = []
        for line in open(self.log_path):
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue  # gunicorn's own start-up lines
        return lines

    def worker_pids(self):
        """The pids of the master's worker processes."""
        return [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                if parent_pid(pid) == self.process.pid]

    def stop(self):
        stop_group(self.process)


def parent_pid(pid):
    try:
        with open("/proc/%d/stat" % pid) as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        return None


def rss_kb(pid):
    """Resident memory of a process, in KiB (0 once it is gone)."""
    try:
        with open("/proc/%d/status" % pid) as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
    except (OSError, StopIteration):
        return 0


class Nginx:
    """deploy/nginx.conf in front of one Gunicorn or several, on a free port of
    ``host`` (the production topology).

    The repository's config is used as it is, but for the addresses (its listen
    address and the upstream's servers), where nginx keeps its pid file and, if
    given, ``sockets_per_address`` (for tests whose thousands of browsers all come
    from one address)."""

    CONFIG = os.path.join(ROOT, "deploy", "nginx.conf")
    SOCKETS_PER_ADDRESS = "limit_conn feed_sockets 500;"

    def __init__(self, directory, upstreams, sockets_per_address=None, host=LOCAL):
        self.host = host
        self.port = host.port()
        self.url = "http://%s:%d" % (host.address, self.port)
        servers = " ".join("server %s;" % upstream.url.split("//")[1] for upstream in upstreams)
        config = (open(self.CONFIG).read()
                  .replace("listen 8080 ", "listen %s:%d " % (host.address, self.port))
                  .replace("server 127.0.0.1:8000;", servers)
                  .replace("pid /run/nginx-ingest.pid;", "pid %s;" % os.path.join(directory, "nginx.pid")))
        assert self.SOCKETS_PER_ADDRESS in config
        if sockets_per_address is not None:
            config = config.replace(self.SOCKETS_PER_ADDRESS,
                                    "limit_conn feed_sockets %d;" % sockets_per_address)
        path = os.path.join(directory, "nginx.conf")
        with open(path, "w") as file:
            file.write(config)
        self.log_path = os.path.join(directory, "nginx.log")
        self.process = subprocess.Popen(
            host.command(["nginx", "-p", str(directory), "-c", path, "-g", "daemon off;"]),
            stdout=subprocess.DEVNULL, stderr=open(self.log_path, "w"), start_new_session=True)
        wait_until(self._up, message="nginx on %s" % self.url)

    def _up(self):
        if self.process.poll() is not None:
            raise AssertionError("nginx exited: " + open(self.log_path).read()[-2000:])
        with socket.socket() as sock:
            return sock.connect_ex((self.host.address, self.port)) == 0

    def stop(self):
        stop_group(self.process)


class Production:
    """nginx in front of gunicorn: ``url`` is nginx's; the rest is gunicorn's."""

    def __init__(self, directory, workers=2, env=None, sockets_per_address=None):
        self.web = Gunicorn(os.path.join(directory, "web.log"), workers=workers, env=env)
        self.proxy = Nginx(directory, [self.web], sockets_per_address)
        self.url = self.proxy.url

    def __getattr__(self, name):  # log_lines, worker_pids, process, ...
        return getattr(self.web, name)

    def stop(self):
        self.proxy.stop()
        self.web.stop()


class Consumer:
    """`huey_consumer tasks.huey -w N` (or a module of ours that wraps it) on
    ``host``; on one CPU (`taskset -c CPU`, as the README runs it) if ``cpu`` is given."""

    def __init__(self, log_path, env=None, workers=2, module=None, args=(), cpu=None, host=LOCAL):
        command = ([sys.executable, "-m", module] if module else
                   [os.path.join(BIN, "huey_consumer"), "tasks.huey"])
        if cpu is not None:
            command = ["taskset", "-c", str(cpu)] + command
        self.process = subprocess.Popen(
            host.command(command + ["-w", str(workers), "-k", "thread", *args]),
            cwd=ROOT, env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL, stderr=open(log_path, "w"), start_new_session=True)
        self.log_path = log_path

    def kill(self):
        """SIGKILL: no shutdown, whatever it was doing is lost."""
        self.process.kill()
        self.process.wait()

    def stop(self):
        stop_group(self.process)


def stop_group(process, grace=10):
    """SIGTERM the process, SIGKILL its whole group if it has not exited in time."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # stragglers: workers of a killed master
    except ProcessLookupError:
        pass
    process.wait()


class RedisServer:
    """A private redis-server on ``host`` (its address only) and ``port``, to take away
    and bring back in a test."""

    def __init__(self, port, host=LOCAL):
        self.port, self.host = port, host
        self.url = "redis://%s:%d/0" % (host.address, port)
        self.process = None

    def start(self):
        self.process = subprocess.Popen(
            self.host.command(["redis-server", "--port", str(self.port), "--bind", self.host.address,
                               "--save", "", "--appendonly", "no", "--protected-mode", "no"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._up, message="redis-server on %s:%d" % (self.host.address, self.port))
        return self

    def _up(self):
        with socket.socket() as sock:
            return sock.connect_ex((self.host.address, self.port)) == 0

    def stop(self):
        if self.process is not None:
            self.process.terminate()
            self.process.wait()
            self.process = None
