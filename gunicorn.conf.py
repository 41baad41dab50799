"""gunicorn settings for production: `gunicorn -c gunicorn.conf.py "app:create_app()"`.

Worker class: gthread (flask-sock on gunicorn needs a threaded worker). A
request thread waits on the group commit, so a worker needs as many threads as
ingest requests it serves at once. A live-feed WebSocket holds a thread only for
its handshake and auth message; then the worker's fan-out thread serves it
(ingest/fanout.py), so sockets are not limited by threads. gevent would make
sqlite3 and the commit thread block its event loop. See the README.

Every setting can be overridden on the command line or with GUNICORN_CMD_ARGS.
"""
import os

bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gthread"
# Concurrent requests (and feed sockets still authenticating), per worker.
threads = int(os.environ.get("WEB_THREADS", "256"))
worker_connections = threads + 100
keepalive = 5
# Logs go to stderr as JSON lines from the app; gunicorn's own access log is off.
accesslog = None


def post_worker_init(worker):
    # On SIGTERM (a restart), close the live-feed sockets at once with 1001 so
    # browsers reconnect, rather than holding the shutdown for graceful_timeout.
    import signal

    from ingest.fanout import close_all

    def handle_exit(signum, frame):
        close_all()
        worker.handle_exit(signum, frame)

    signal.signal(signal.SIGTERM, handle_exit)
    worker.log.info("worker %s ready", worker.pid)


def child_exit(server, worker):
    # With PROMETHEUS_MULTIPROC_DIR, a dead worker's live gauges (open sockets)
    # must stop counting; its counters stay in the totals.
    from ingest.metrics import mark_process_dead
    mark_process_dead(worker.pid)


def post_fork(server, worker):
    # Many threads per worker wait on sockets; a shorter GIL switch interval
    # (default 5 ms) keeps a CPU-bound request from delaying each of them in turn.
    import sys
    sys.setswitchinterval(0.001)
