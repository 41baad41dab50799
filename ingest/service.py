"""The ingest write path (DESIGN §6), free of Flask and HTTP.

validate -> enrich with the organization -> store (one transaction: inserts and
one set-based UPDATE of the customers, via the process's group committer) -> after commit:
enqueue the analysis, publish ``interaction.created``.

Failures are raised as ``ServiceError`` (ingest/domain.py) with a stable code;
the web layer maps codes to HTTP statuses. Reads are in ingest/reads.py, customer
creation and the erasure's SQL in ingest/lifecycle.py, Segment's workflow in
ingest/segment.py.
"""
import functools
import logging
import uuid
from collections import defaultdict

from ingest import changes, lifecycle, metrics, schemas
from ingest.committer import GroupCommitter, Job, StorageFailure
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
from ingest.logs import bind_context
from ingest.store import KnownCustomers, probe, write_group
from models import release_connection

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
    ids = {True: defaultdict(list), False: defaultdict(list)}
    events = defaultdict(list)
    outcomes = defaultdict(int)
    for job, results in committed:
        for item, (status, _) in zip(job.items, results, strict=True):
            outcomes[status] += 1
            if status == CREATED:
                ids[job.high_priority][item.organization_id].append(item.id)
                events[item.organization_id].append((item.position, changes.created_event(item)))
    metrics.INTERACTIONS.labels("stored").inc(outcomes[CREATED])
    metrics.INTERACTIONS.labels("duplicate").inc(outcomes[DUPLICATE])
    if events:  # before the analyses are queued, so that "created" precedes "analyzed"
        safely_publish(publish, events)
    for high_priority, by_organization in ids.items():
        if by_organization:
            try:
                enqueue_analysis(by_organization, high_priority)
            except Exception:
                log.warning("analysis enqueue failed; the sweep will pick these up", exc_info=True,
                            extra={"count": sum(map(len, by_organization.values()))})


def safely_publish(publish, events_by_organization):
    """Publish; a failure is logged, never raised (the fan-out reads the store)."""
    try:
        publish(events_by_organization)
    except Exception:
        log.warning("publish failed", exc_info=True)


class IngestService:
    """Single and batch ingest, and erasure, through a group committer of its own
    (with its cache of known customers): one per process, held by its runtime.
    ``enqueue_analysis`` and ``publish`` are after_commit's; erasure publishes too.
    ``start()`` before use, ``stop()`` after."""

    def __init__(self, enqueue_analysis, publish, max_batch_items=1000, commit_timeout=20):
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
        safely_publish(self.publish, {organization_id: [(position, changes.event(
            changes.CUSTOMER_DELETED, organization_id, position, {"id": str(customer_uuid)}))]})

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
