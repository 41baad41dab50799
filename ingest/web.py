"""What every request goes through, before and after its view, in one place: its
id and log context, its process's runtime (``g.runtime``, which views and
admission use), its access line and metrics, the security headers, the rest
of a body it left unread, and its database connection given back; and the
reading of a JSON body, which views call (``read_json``).

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
import json
import logging
import math
import re
import time
import zlib

from flask import current_app, g, request

from ingest import logs, metrics, runtime
from ingest.domain import Code
from ingest.errors import ApiError
from models import db, random_uuid

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
    logs.context.set({"request_id": incoming if REQUEST_ID.match(incoming) else random_uuid().hex})
    g.started = time.perf_counter()
    g.runtime = runtime.of(current_app)


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


# ============================================================================
# Reading a JSON request body: content type, gzip, size limits, strict JSON.
#
# MAX_CONTENT_LENGTH bounds the body as sent (Werkzeug enforces it) and, here,
# the body once decompressed, without ever inflating more than that limit, so
# a decompression bomb costs at most MAX_CONTENT_LENGTH of memory.

def _reject_constant(name):
    raise ValueError("%s is not valid JSON" % name)


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("the number %s is out of range" % text)
    return value


# One decoder for every body: json.loads with hooks would build one per call.
_decoder = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def read_json():
    """The request's JSON document, or an ApiError (400, 413, 415)."""
    mimetype = request.mimetype
    if mimetype and mimetype != "application/json" and not mimetype.endswith("+json"):
        raise ApiError(415, Code.UNSUPPORTED_MEDIA_TYPE,
                       "Send JSON with Content-Type: application/json.")
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    raw = _decoded_body(_body(limit), limit)
    try:
        return _decoder.decode(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, Code.INVALID_JSON, "The body is not UTF-8.") from None
    except (ValueError, RecursionError) as error:
        raise ApiError(400, Code.INVALID_JSON, "The body is not valid JSON: %s" % error) from None


def _body(limit):
    """The body as sent. Werkzeug answers 413 for a Content-Length over the limit,
    but a chunked body it quietly cuts at the limit; that one is read here up to
    one byte more, so that it gets the same 413."""
    environ = request.environ
    if request.content_length is not None or "wsgi.input_terminated" not in environ:
        return request.get_data(cache=False)
    body = environ["wsgi.input"].read(limit + 1)  # the server ends a chunked stream
    if len(body) > limit:
        raise ApiError(413, Code.PAYLOAD_TOO_LARGE, "The body is larger than %d bytes." % limit)
    return body


def _decoded_body(data, limit):
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return data
    if encoding not in ("gzip", "x-gzip"):
        raise ApiError(415, Code.UNSUPPORTED_MEDIA_TYPE,
                       "Content-Encoding must be gzip or absent, not %r." % encoding)
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        body = inflater.decompress(data, limit + 1)
    except zlib.error:
        raise ApiError(400, Code.INVALID_GZIP, "The body is not valid gzip.") from None
    if len(body) > limit or inflater.unconsumed_tail:
        raise ApiError(413, Code.PAYLOAD_TOO_LARGE,
                       "The decompressed body is larger than %d bytes." % limit)
    if not inflater.eof:
        raise ApiError(400, Code.INVALID_GZIP, "The gzip body is truncated.")
    return body
