"""Group commit: one writer thread per process stores what concurrent requests submit.

DESIGN §6 and §12: one write transaction per request caps throughput (SQLite
serialises writers, each commit syncs). Instead requests hand their
interactions to this process's writer, which stores what is waiting in one
transaction, taking the organizations' jobs in turn. If that shared transaction fails, each job is retried on its
own, so one request's failure never fails another's, and every caller gets
its own answer.

Once a group is committed its callers are answered at once, and the work that
follows a commit (queueing the analyses, publishing the events) is done by a
second thread, once for every group committed in the last FOLLOW_WINDOW,
while the writer goes on to the next.
"""
import collections
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from ingest import metrics
from ingest.threads import Threads
from models import db

log = logging.getLogger(__name__)

# The follow-up of a commit waits this long for more commits to do theirs with
# it: under load one enqueue and one publish serve several groups; an event
# reaches the live feed at most this much later.
FOLLOW_WINDOW = 0.002


@dataclass
class Job:
    """Interactions from one request (or one batch chunk) of one organization,
    stored together or not at all."""
    items: list
    high_priority: bool

    @property
    def organization_id(self):
        return self.items[0].organization_id


class GroupCommitter:
    def __init__(self, write_group, after_commit, max_items=500):
        """``write_group(jobs) -> results per job`` runs in one transaction;
        ``after_commit(committed)``, with the (job, results) pairs of one or more
        groups, runs after it, off the writer thread."""
        self.write_group = write_group
        self.after_commit = after_commit
        self._max_items = max_items
        self._waiting = collections.OrderedDict()  # organization -> deque of (job, future)
        self._arrived = threading.Condition()
        self._committed = queue.SimpleQueue()
        self._threads = Threads(("group-commit", self._write), ("after-commit", self._follow), wake=self._wake)
        self._accepting = False

    def start(self):
        self._threads.start()
        self._accepting = True

    def stop(self):
        """Commit what is waiting, do its follow-up, and end both threads."""
        self._accepting = False
        self._threads.stop()

    def submit(self, job):
        """Queue ``job`` for storage; returns a Future of its results. Cancelling
        the future withdraws the job, unless its commit has begun."""
        if not self._accepting:
            raise RuntimeError("the group committer is not running (Runtime.start)")
        future = Future()
        with self._arrived:
            self._waiting.setdefault(job.organization_id, collections.deque()).append((job, future))
            self._arrived.notify()
        return future

    def _wake(self):
        with self._arrived:
            self._arrived.notify_all()

    def _write(self):
        while (group := self._next_group()) is not None:
            committed = self._commit(group) if group else []
            if committed:
                self._committed.put(committed)
        self._committed.put(None)  # the follow-up thread ends after what came before

    def _next_group(self):
        """Up to max_items of waiting jobs, one job of each organization in turn:
        one organization's backlog never holds back another's next request.
        Jobs withdrawn by their callers (cancelled) are dropped; the ones taken
        can no longer be withdrawn. None once stopping with nothing left."""
        with self._arrived:
            while not self._waiting:
                if self._threads.stopping.is_set():
                    return None
                self._arrived.wait()
            group, size = [], 0
            while self._waiting and size < self._max_items:
                for organization_id in list(self._waiting):
                    jobs = self._waiting[organization_id]
                    job, future = jobs.popleft()
                    if jobs:
                        self._waiting.move_to_end(organization_id)  # the next group starts elsewhere
                    else:
                        del self._waiting[organization_id]
                    if future.set_running_or_notify_cancel():
                        group.append((job, future))
                        size += len(job.items)
                        if size >= self._max_items:
                            break
            return group

    def _commit(self, group):
        """Commit ``group``, or each of its jobs alone if that fails; answers every
        caller and returns the (job, results) pairs that were stored."""
        try:
            results = self.write_group([job.items for job, _ in group])
        except Exception:
            if len(group) == 1:
                group[0][1].set_exception(StorageFailure())
                log.exception("storage failed", extra={"items": len(group[0][0].items)})
                self._reset_connection()
                return []
            return [pair for entry in group for pair in self._commit([entry])]
        for (_, future), result in zip(group, results, strict=True):
            future.set_result(result)
        metrics.COMMIT_SIZE.observe(sum(len(job.items) for job, _ in group))
        return [(job, result) for (job, _), result in zip(group, results, strict=True)]

    def _follow(self):
        last = False
        while not last:
            committed = self._committed.get()
            if committed is None:
                return
            time.sleep(FOLLOW_WINDOW)
            while True:  # whatever else was committed meanwhile, in the same follow-up
                try:
                    more = self._committed.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    last = True
                    break
                committed += more
            try:
                self.after_commit(committed)
            except Exception:  # never let one group's follow-up stop the next
                log.exception("after-commit work failed")

    @staticmethod
    def _reset_connection():
        if not db.is_closed():
            db.close()


class StorageFailure(Exception):
    """The job's transaction failed and was rolled back; the caller may retry."""
