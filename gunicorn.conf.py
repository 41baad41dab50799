"""gunicorn settings for production: `gunicorn -c gunicorn.conf.py "app:create_app()"`.

Worker class: gthread (flask-sock on gunicorn needs a threaded worker). A
request thread waits on the group commit, so a worker needs as many threads as
ingest requests it serves at once. A live-feed WebSocket holds a thread only for
its handshake; then the worker's fan-out thread serves it, auth message included
(ingest/fanout.py), so sockets are not limited by threads. Why not gevent: see
the README ("Why gthread workers").

Every setting can be overridden on the command line or with GUNICORN_CMD_ARGS.
"""
import os

bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gthread"
# Concurrent requests (and feed sockets being upgraded), per worker.
threads = int(os.environ.get("WEB_THREADS", "256"))
worker_connections = threads + 100
keepalive = 5
# Logs go to stderr as JSON lines from the app; gunicorn's own access log is off.
accesslog = None


def _runtime(worker):
    """The worker's runtime (ingest/runtime.py); None for an app without one (the
    benchmarks' anchors share this file)."""
    return getattr(worker.wsgi, "extensions", {}).get("runtime")


def post_worker_init(worker):
    # The app is loaded: start its runtime. On SIGTERM (a restart), close the
    # live-feed sockets at once with 1001 so browsers reconnect, rather than
    # holding the shutdown for graceful_timeout.
    import signal

    process = _runtime(worker)
    if process is not None:
        process.start()

        def handle_exit(signum, frame):
            process.close_sockets()
            worker.handle_exit(signum, frame)

        signal.signal(signal.SIGTERM, handle_exit)
    worker.log.info("worker %s ready", worker.pid)


def worker_exit(server, worker):
    # Commit what is waiting, write the last results, join every thread.
    process = _runtime(worker)
    if process is not None:
        process.stop()


def child_exit(server, worker):
    # With PROMETHEUS_MULTIPROC_DIR, a dead worker's live gauges (open sockets)
    # must stop counting; its counters stay in the totals.
    from ingest.metrics import mark_process_dead
    mark_process_dead(worker.pid)


# Each worker on a CPU of its own, while there are as many CPUs as workers: a
# worker's threads take turns holding the GIL, and when the turn passes to a
# thread on another core the data it works on moves with it: pinned workers
# serve more single ingests (docs/BENCHMARKS.md). WEB_PIN_CPUS=0 leaves
# placement to the OS (say, when other processes are pinned on the same CPUs).
pin_cpus = os.environ.get("WEB_PIN_CPUS", "1") != "0" and hasattr(os, "sched_setaffinity")


def pre_fork(server, worker):
    # Chosen in the master, which knows the CPUs its live workers hold.
    worker.cpu = None
    if pin_cpus:
        cpus = sorted(os.sched_getaffinity(0))
        taken = {getattr(other, "cpu", None) for other in server.WORKERS.values()}
        free = [cpu for cpu in cpus if cpu not in taken]
        if server.num_workers <= len(cpus) and free:
            worker.cpu = free[0]


def post_fork(server, worker):
    # Many threads per worker wait on sockets; a shorter GIL switch interval
    # (default 5 ms) keeps a CPU-bound request from delaying each of them in turn.
    import sys
    sys.setswitchinterval(0.001)
    if worker.cpu is not None:  # before any thread starts: they all inherit it
        os.sched_setaffinity(0, {worker.cpu})
