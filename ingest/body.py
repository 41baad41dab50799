"""Reading a JSON request body: content type, gzip, size limits, strict JSON.

MAX_CONTENT_LENGTH bounds the body as sent (Werkzeug enforces it) and, here,
the body once decompressed, without ever inflating more than that limit, so
a decompression bomb costs at most MAX_CONTENT_LENGTH of memory.
"""
import json
import math
import zlib

from flask import current_app, request

from ingest.domain import Code
from ingest.errors import ApiError


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
