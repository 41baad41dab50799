"""What every request goes through, before and after its view, in one place: its
id and log context, its access line and metrics, the security headers, the rest
of a body it left unread, and its database connection given back.

The request id is the client's X-Request-ID if it is a short token, else a new
one; it is bound to the log context (ingest/logs.py) and sent back.

Security headers: what browsers and security scanners expect on every response.
The feed page sets its own Content-Security-Policy (it runs its script); every
other response is data, which may never be framed, sniffed or run.

No connection is opened up front (unlike playhouse.flask_utils, which connects in
before_request): peewee connects on a request's first query, so the requests
that need none (ingest, authenticated from the key cache and stored by the group
commit; health checks; the feed) never take one from the pool.
"""
import logging
import re
import time

from flask import current_app, g, request

from ingest import logs, metrics
from models import db, uuid4

access = logging.getLogger("ingest.access")

REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SECURITY_HEADERS = [
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
]
DATA_CSP = "default-src 'none'; frame-ancestors 'none'"
# A body that a refusal left unread is read and dropped up to this many times
# MAX_CONTENT_LENGTH: deploy/nginx.conf passes bodies up to twice the limit on
# (client_max_body_size), so that the service answers their 413 itself.
DISCARD_FACTOR = 2
DISCARD_CHUNK = 64 * 1024


def init_app(app):
    app.before_request(start)
    app.after_request(finish)
    app.teardown_request(release)


def start():
    incoming = request.headers.get("X-Request-ID", "")
    logs.context.set({"request_id": incoming if REQUEST_ID.match(incoming) else uuid4().hex})
    g.started = time.perf_counter()


def finish(response):
    _discard_unread()
    headers = response.headers
    headers["X-Request-ID"] = logs.context.get().get("request_id", "")
    for name, value in SECURITY_HEADERS:  # (Headers.add: cheaper than extend or setdefault)
        headers.add(name, value)
    if "Content-Security-Policy" not in headers:
        headers["Content-Security-Policy"] = DATA_CSP
    seconds = time.perf_counter() - g.started
    endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
    metrics.REQUESTS.labels(endpoint, str(response.status_code)).inc()
    metrics.LATENCY.labels(endpoint).observe(seconds)
    if access.isEnabledFor(logging.INFO):
        access.info("request", extra={"method": request.method, "path": request.path,
                                      "status": response.status_code, "duration_ms": round(seconds * 1000, 2)})
    return response


def release(exc):
    """Give the request's connection back (to the pool), if it took one."""
    if not db.is_closed():
        db.close()


def _discard_unread():
    """Read and drop what is left of the request body before the answer goes out.

    A refusal decided before the body is read (401, 403, 413, 429...) leaves it on
    the connection. gunicorn then drains at most 64 KiB of it and closes the
    connection while nginx is still sending: nginx answers 502 instead of the
    refusal, and the kept-alive upstream connection it shares between clients
    breaks for whoever uses it next. Read to its end, the body is gone and the
    connection serves the next request; reading the rest of a body already read
    costs one empty read.

    Only a stream the server ends (``wsgi.input_terminated``: gunicorn always, the
    dev server for chunked bodies) can be read past what Werkzeug would allow
    without hanging. A body over DISCARD_FACTOR x MAX_CONTENT_LENGTH is left to
    the server, which closes the connection: only a client without nginx in front
    can send one.
    """
    bound = DISCARD_FACTOR * current_app.config["MAX_CONTENT_LENGTH"]
    if "wsgi.input_terminated" in request.environ and (request.content_length or 0) <= bound:
        try:
            _discard(request.input_stream, bound)
        except Exception:  # whatever the server raises (the client left, a broken chunk): it closes
            pass           # the connection, and the answer stands


def _discard(stream, bound):
    while bound > 0:
        chunk = stream.read(min(DISCARD_CHUNK, bound))
        if not chunk:
            return
        bound -= len(chunk)
