"""Structured logs: one JSON object a line, carrying the ids of what is going on.

The request id and organization are bound to a context variable, so every
line logged while serving a request carries them without being passed around.
Never log an API key or an Authorization header.
"""
import contextvars
import io
import json
import logging
import os
import sys
import time
import traceback
import types

from ingest.threads import Threads

# What every line logged in this context carries (the request id, the organization...);
# never mutated: replaced (bind_context; ingest/web.py starts one per request).
context = contextvars.ContextVar("log_context", default=types.MappingProxyType({}))
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def bind_context(**values):
    context.set({**context.get(), **values})


class JsonFormatter(logging.Formatter):
    _second = (None, "")  # the last second formatted, and its text
    _encoder = json.JSONEncoder(default=str, ensure_ascii=False)  # json.dumps would build one a line

    def format(self, record):
        entry = {
            "ts": self._timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
            **context.get(),
        }
        fields = vars(record)
        for key in fields.keys() - _STANDARD:  # what the caller passed as extra=
            entry[key] = fields[key]
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return self._encoder.encode(entry)

    def formatException(self, exc_info):
        """The traceback without Python 3.11's ``^^^`` markers. Placing them parses
        each line's source with ``ast``, and CPython 3.11's ast is not thread-safe:
        a background thread logging an error while another thread parses (Werkzeug
        compiling its URL rules, say) made the other fail with "AST constructor
        recursion depth mismatch"."""
        exception = traceback.TracebackException(*exc_info)
        pending, seen = [exception], set()
        while pending:
            current = pending.pop()
            if id(current) in seen:
                continue
            seen.add(id(current))
            for frame in current.stack:
                frame.colno = frame.end_colno = None
            pending += [chained for chained in (current.__cause__, current.__context__) if chained]
        return "".join(exception.format()).rstrip("\n")

    def _timestamp(self, created):
        second = int(created)
        if self._second[0] != second:
            self._second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        return "%s.%03dZ" % (self._second[1], (created - second) * 1000)


class BatchingHandler(logging.StreamHandler):
    """Writes to stderr through its own buffer, drained every FLUSH_SECONDS and at
    once for warnings and errors: a busy worker makes a few writes a second
    instead of one per request. A process killed outright loses at most the
    last FLUSH_SECONDS of info lines."""

    FLUSH_SECONDS = 0.2

    def __init__(self):
        super().__init__(io.TextIOWrapper(
            io.BufferedWriter(io.FileIO(sys.stderr.fileno(), "wb", closefd=False), 1 << 16),
            encoding="utf-8", errors="backslashreplace"))
        self._start_flusher()
        # A forked child (a consumer's process worker) inherits no thread: it starts its own.
        os.register_at_fork(after_in_child=self._start_flusher)

    def emit(self, record):
        super().emit(record)
        if record.levelno >= logging.WARNING:
            self.drain()

    def flush(self):
        """StreamHandler flushes after every record; that is what this handler avoids."""

    def drain(self):
        with self.lock:
            self.stream.flush()

    def close(self):
        """Stop the flushing thread (logging.shutdown calls this at exit), then drain."""
        self._flusher.stop()
        self.drain()
        super().close()

    def _start_flusher(self):
        self._flusher = Threads(("log-flush", self._flush_often))
        self._flusher.start()

    def _flush_often(self):
        while not self._flusher.stopping.wait(self.FLUSH_SECONDS):
            self.drain()


def configure(level="INFO"):
    """Send every logger's records to stderr as JSON lines (idempotent).

    huey_consumer gives the "huey" logger a plain-text handler of its own;
    it is removed so that those records, too, reach the JSON handler.
    """
    root = logging.getLogger()
    if not any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        handler = BatchingHandler()
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
    root.setLevel(level)
    # A line carries no thread or process names: not gathering them makes every
    # record cheaper (the logging documentation's "Optimization" section).
    logging.logThreads = False
    logging.logMultiprocessing = False
    huey_logger = logging.getLogger("huey")
    for handler in list(huey_logger.handlers):
        huey_logger.removeHandler(handler)
    huey_logger.propagate = True
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
