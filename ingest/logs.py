"""Structured logs: one JSON object a line, carrying the ids of what is going on.

The request id and organization are bound to a context variable, so every
line logged while serving a request carries them without being passed around.
Never log an API key or an Authorization header.
"""
import contextvars
import json
import logging
import re
import sys
import time
import uuid

from flask import g, request

_context = contextvars.ContextVar("log_context", default={})
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def bind_context(**values):
    _context.set({**_context.get(), **values})


class JsonFormatter(logging.Formatter):
    def format(self, record):
        entry = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + ".%03dZ" % record.msecs,
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
            **_context.get(),
        }
        entry.update((k, v) for k, v in vars(record).items() if k not in _STANDARD)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


JsonFormatter.converter = time.gmtime


def configure(level="INFO"):
    """Send every logger's records to stderr as JSON lines (idempotent).

    huey_consumer gives the "huey" logger a plain-text handler of its own;
    it is removed so that those records, too, reach the JSON handler.
    """
    root = logging.getLogger()
    if not any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
    root.setLevel(level)
    huey_logger = logging.getLogger("huey")
    for handler in list(huey_logger.handlers):
        huey_logger.removeHandler(handler)
    huey_logger.propagate = True
    logging.getLogger("werkzeug").setLevel(logging.WARNING)


def init_app(app):
    """A request id per request (X-Request-ID in and out) and one access line."""
    access = logging.getLogger("ingest.access")

    @app.before_request
    def _start():
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        g.started = time.perf_counter()
        _context.set({"request_id": g.request_id})

    @app.after_request
    def _finish(response):
        response.headers["X-Request-ID"] = g.get("request_id", "")
        access.info("request", extra={
            "method": request.method, "path": request.path, "status": response.status_code,
            "duration_ms": round((time.perf_counter() - g.get("started", time.perf_counter())) * 1000, 2)})
        return response
