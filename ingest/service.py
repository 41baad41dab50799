"""The ingest write path (DESIGN §6), free of Flask and HTTP.

validate -> enrich with the organization -> store (one transaction: inserts and
one set-based UPDATE of the customers, via the process's group committer) -> after commit:
publish ``interaction.created``, then enqueue the analysis (so that a socket sees
"created" before "analyzed"). The group committer, which
stores what concurrent requests submit in shared transactions, is the second part
of this module (``GroupCommitter``).

Failures are raised as ``ServiceError`` (ingest/domain.py) with a stable code;
the web layer maps codes to HTTP statuses. Reads are in ingest/reads.py, customer
creation and the erasure's SQL in ingest/lifecycle.py, Segment's workflow in
ingest/segment.py.
"""
import collections
import functools
import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass

from ingest import changes, lifecycle, metrics, schemas
from ingest.config import DEFAULTS
from ingest.domain import (
    CREATED,
    DUPLICATE,
    UNKNOWN_CUSTOMER,
    BatchOutcome,
    Code,
    NewInteraction,
    ServiceError,
    not_found,
    uuid_or_none,
    validation_error,
)
from ingest.events import publish_safely
from ingest.logs import bind_context
from ingest.store import KnownCustomers, probe, write_group
from ingest.threads import Threads
from models import db, release_connection

log = logging.getLogger(__name__)

BATCH_CHUNK_ITEMS = 100  # items of a batch stored in one transaction (a chunk fails or stands alone)


def storage_error():
    return ServiceError(Code.STORAGE_ERROR, "Nothing was stored; retry the request.",
                        {"retryable": True, "stored": False})


def outcome_unknown():
    return ServiceError(
        Code.COMMIT_OUTCOME_UNKNOWN,
        "The database did not answer in time while storing this; it may or may not "
        "have been stored. Retry with the same messageId: the retry is then safe.",
        {"retryable": "with the same messageId"})


def _wait(future, timeout):
    """The results of a submitted job; a ServiceError if it failed or took too long.

    A job still waiting for the writer is withdrawn at its deadline, so that
    "nothing was stored" is true; one whose commit has begun cannot be, and its
    outcome is unknown until the database answers.
    """
    try:
        return future.result(timeout=timeout)
    except StorageFailure:
        raise storage_error() from None
    except TimeoutError:
        raise (storage_error() if future.cancel() else outcome_unknown()) from None


def after_commit(committed, enqueue_analysis, publish):
    """Hand committed groups' new interactions to the live feed (one publish) and to
    analysis (one enqueue per priority); never raises. The group committer calls it
    off its writer thread with the (job, results) pairs of one or more groups.

    ``enqueue_analysis(ids_by_organization, high_priority)`` and
    ``publish(events_by_organization)`` fail no ingest: it is already stored."""
    ids = {True: collections.defaultdict(list), False: collections.defaultdict(list)}
    events = collections.defaultdict(list)
    outcomes = collections.defaultdict(int)
    for job, results in committed:
        for item, (status, _) in zip(job.items, results, strict=True):
            outcomes[status] += 1
            if status == CREATED:
                ids[job.high_priority][item.organization_id].append(item.id)
                events[item.organization_id].append((item.position, changes.created_event(item)))
    metrics.INTERACTIONS.labels("stored").inc(outcomes[CREATED])
    metrics.INTERACTIONS.labels("duplicate").inc(outcomes[DUPLICATE])
    if events:  # before the analyses are queued, so that "created" precedes "analyzed"
        publish_safely(publish, events)
    for high_priority, by_organization in ids.items():
        if by_organization:
            try:
                enqueue_analysis(by_organization, high_priority)
            except Exception:
                log.warning("analysis enqueue failed; the sweep will pick these up", exc_info=True,
                            extra={"count": sum(map(len, by_organization.values()))})


class IngestService:
    """Single and batch ingest, and erasure, through a group committer of its own
    (with its cache of known customers): one per process, held by its runtime.
    ``enqueue_analysis`` and ``publish`` are after_commit's; erasure publishes too.
    ``start()`` before use, ``stop()`` after."""

    def __init__(self, enqueue_analysis, publish, max_batch_items=DEFAULTS["MAX_BATCH_ITEMS"],
                 commit_timeout=DEFAULTS["COMMIT_TIMEOUT"]):
        self.known_customers = KnownCustomers()
        self.committer = GroupCommitter(
            functools.partial(write_group, known=self.known_customers),
            functools.partial(after_commit, enqueue_analysis=enqueue_analysis, publish=publish))
        self.publish = publish
        self.max_batch_items = max_batch_items
        self.commit_timeout = commit_timeout  # seconds a request waits for its commit

    def start(self):
        self.committer.start()

    def stop(self):
        """Store and follow up what is waiting, then end the committer's threads."""
        self.committer.stop()

    def ingest_one(self, organization_id, payload, dry_run=False):
        """Store one interaction; returns (interaction_id, duplicate).

        A dry run validates and checks exactly as storing would, then stores,
        counts, queues and publishes nothing: it returns (None, duplicate)."""
        try:
            item = self._prepare(organization_id, validate_interaction(payload))
            bind_context(customer_id=str(item.customer_id))
            [(status, interaction_id)] = (probe([item]) if dry_run else
                                          self._store(Job([item], high_priority=True)))
            if status == UNKNOWN_CUSTOMER:
                raise customer_not_found(item)
        except ServiceError:
            if not dry_run:
                metrics.INTERACTIONS.labels("failed").inc()
            raise
        bind_context(interaction_id=str(interaction_id), duplicate=status == DUPLICATE)
        return interaction_id, status == DUPLICATE

    def ingest_batch(self, organization_id, payload, dry_run=False):
        """Validate item by item, store valid ones in chunks; returns a BatchOutcome
        (in a dry run, the same outcome with no ids, and nothing stored)."""
        raw_items = self._batch_items(payload)
        outcome = BatchOutcome(total=len(raw_items), ids=[None] * len(raw_items), dry_run=dry_run)
        valid = []  # (index, validated data)
        for index, raw in enumerate(raw_items):
            try:
                valid.append((index, validate_interaction(raw)))
            except ServiceError as error:
                outcome.errors.append(item_error(index, error))
        if dry_run:
            valid = [(index, self._prepare(organization_id, data)) for index, data in valid]
            self._record(valid, probe([item for _, item in valid]), outcome)
            outcome.errors.sort(key=lambda error: error["index"])
            return outcome
        return self.store_validated(organization_id, valid, outcome)

    def store_validated(self, organization_id, valid, outcome):
        """Store validated items ``[(index, data)]`` in chunks; completes ``outcome``
        (a BatchOutcome whose errors may hold the items that failed validation)."""
        valid = [(index, self._prepare(organization_id, data)) for index, data in valid]
        chunks = [valid[start:start + BATCH_CHUNK_ITEMS] for start in range(0, len(valid), BATCH_CHUNK_ITEMS)]
        futures = [self.committer.submit(Job([item for _, item in chunk], high_priority=False))
                   for chunk in chunks]
        release_connection()
        for chunk, future in zip(chunks, futures, strict=True):
            try:
                self._record(chunk, _wait(future, self.commit_timeout), outcome)
            except ServiceError as error:
                outcome.errors += [item_error(index, error) for index, _ in chunk]
        outcome.errors.sort(key=lambda error: error["index"])
        metrics.INTERACTIONS.labels("failed").inc(outcome.failed)
        bind_context(total=outcome.total, successful=outcome.successful,
                     duplicates=outcome.duplicates, failed=outcome.failed)
        return outcome

    def erase_customer(self, organization_id, customer_id):
        """Erase a customer and all its interactions (DESIGN §15); the organization's
        sockets are told. Erasing an unknown (or already erased) id is customer_not_found."""
        customer_uuid = uuid_or_none(customer_id)
        position = None if customer_uuid is None else lifecycle.erase_customer(organization_id, customer_uuid)
        if position is None:
            raise not_found(Code.CUSTOMER_NOT_FOUND)
        self.known_customers.forget((uuid.UUID(str(organization_id)), customer_uuid))
        publish_safely(self.publish, {organization_id: [(position, changes.event(
            changes.Kind.CUSTOMER_DELETED, organization_id, position, {"id": str(customer_uuid)}))]})

    def _store(self, job):
        future = self.committer.submit(job)
        release_connection()
        return _wait(future, self.commit_timeout)

    @staticmethod
    def _record(chunk, outcomes, batch):
        """Enter the outcomes of ``chunk``'s items in ``batch``."""
        for (index, item), (status, interaction_id) in zip(chunk, outcomes, strict=True):
            if status == UNKNOWN_CUSTOMER:
                batch.errors.append(item_error(index, customer_not_found(item)))
                continue
            batch.ids[index] = interaction_id
            batch.duplicates += status == DUPLICATE

    def _batch_items(self, payload):
        items = schemas.batch_in.load(payload)["interactions"]
        if not items:
            raise validation_error({"interactions": ["Must contain at least one item."]})
        if len(items) > self.max_batch_items:
            raise validation_error({"interactions": [
                "At most %d items per batch." % self.max_batch_items]})
        return items

    @staticmethod
    def _prepare(organization_id, data):
        """Enrich validated data with its organization."""
        return NewInteraction(organization_id=uuid.UUID(str(organization_id)), **data)


def validate_interaction(payload):
    """An interaction payload, validated (DESIGN §5), as data; or a ServiceError."""
    return schemas.interaction_in.load(payload)


def customer_not_found(item):
    return not_found(Code.CUSTOMER_NOT_FOUND, {"customerId": [str(item.customer_id)]})


def item_error(index, error):
    """A batch item's ServiceError as its entry in the outcome's errors."""
    return {"index": index, "error": error.code, "message": error.message,
            "details": error.details}


# ============================================================================
# Group commit: one writer thread per process stores what concurrent requests submit.
#
# DESIGN §6 and §12: one write transaction per request caps throughput (SQLite
# serialises writers, each commit syncs). Instead requests hand their
# interactions to this process's writer, which stores what is waiting in one
# transaction, taking the organizations' jobs in turn. If that shared transaction fails, each job is retried on its
# own, so one request's failure never fails another's, and every caller gets
# its own answer.
#
# Once a group is committed its callers are answered at once, and the work that
# follows a commit (queueing the analyses, publishing the events) is done by a
# second thread, once for every group committed in the last FOLLOW_WINDOW,
# while the writer goes on to the next.

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
