"""gunicorn settings for production: `gunicorn -c gunicorn.conf.py "app:create_app()"`.

Every setting can be overridden on the command line or with GUNICORN_CMD_ARGS.
"""
import os

bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Threads let one worker wait on the group commit for many requests at once.
worker_class = "gthread"
threads = int(os.environ.get("WEB_THREADS", "16"))
keepalive = 5
# Logs go to stderr as JSON lines from the app; gunicorn's own access log is off.
accesslog = None
