"""Group commit: one writer thread per process stores what concurrent requests submit.

DESIGN §12: one write transaction per request caps throughput (SQLite
serialises writers, each commit syncs). Instead requests hand their
interactions to this process's writer, which stores everything waiting in one
transaction. If that shared transaction fails, each job is retried on its
own, so one request's failure never fails another's, and every caller gets
its own answer.
"""
import logging
import os
import queue
import threading
from concurrent.futures import Future

from models import db

log = logging.getLogger(__name__)


class GroupCommitter:
    def __init__(self, write_group, max_items=500):
        """``write_group(jobs) -> results per job`` runs in one transaction."""
        self._write_group = write_group
        self._max_items = max_items
        self._queue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pid = None

    def submit(self, job):
        """Queue ``job`` (a list of items) for storage; returns a Future of its result."""
        self._ensure_writer()
        future = Future()
        self._queue.put((job, future))
        return future

    def _ensure_writer(self):
        # Started lazily and per process: a forked worker inherits no thread.
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid != os.getpid():
                threading.Thread(target=self._run, name="group-commit", daemon=True).start()
                self._pid = os.getpid()

    def _run(self):
        while True:
            group = [self._queue.get()]
            size = len(group[0][0])
            while size < self._max_items:
                try:
                    entry = self._queue.get_nowait()
                except queue.Empty:
                    break
                group.append(entry)
                size += len(entry[0])
            self._commit(group)

    def _commit(self, group):
        try:
            results = self._write_group([job for job, _ in group])
        except Exception:
            if len(group) == 1:
                group[0][1].set_exception(StorageFailure())
                log.exception("storage failed", extra={"items": len(group[0][0])})
                self._reset_connection()
                return
            for entry in group:  # isolate the failing job(s)
                self._commit([entry])
            return
        for (_, future), result in zip(group, results):
            future.set_result(result)

    @staticmethod
    def _reset_connection():
        if not db.is_closed():
            db.close()


class StorageFailure(Exception):
    """The job's transaction failed and was rolled back; the caller may retry."""
