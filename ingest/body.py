"""Reading a JSON request body: content type, gzip, size limits, strict JSON;
and reading the rest of a body that a refusal left unread.

MAX_CONTENT_LENGTH bounds the body as sent (Werkzeug enforces it) and, here,
the body once decompressed, without ever inflating more than that limit, so
a decompression bomb costs at most MAX_CONTENT_LENGTH of memory.
"""
import json
import math
import zlib

from flask import current_app, request

from ingest.errors import ApiError
from ingest.problems import Code


def _reject_constant(name):
    raise ValueError("%s is not valid JSON" % name)


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("the number %s is out of range" % text)
    return value


# A body that a refusal left unread is read and dropped up to this many times
# MAX_CONTENT_LENGTH: deploy/nginx.conf passes bodies up to twice the limit on
# (client_max_body_size), so that the service answers their 413 itself.
DISCARD_FACTOR = 2
DISCARD_CHUNK = 64 * 1024

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


def init_app(app):
    app.after_request(discard_unread)


def discard_unread(response):
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
    return response


def _discard(stream, bound):
    while bound > 0:
        chunk = stream.read(min(DISCARD_CHUNK, bound))
        if not chunk:
            return
        bound -= len(chunk)
