"""The ingest workflow (DESIGN §6), free of Flask and HTTP.

validate -> enrich with the organization -> store (one transaction: inserts and
one set-based UPDATE of the customers, via the process's group committer) -> after commit:
enqueue the analysis, publish ``interaction.created``.

Failures are raised as ``ServiceError`` with a stable code; the web layer maps
codes to HTTP statuses.
"""
import logging
import operator
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from functools import reduce

from marshmallow import ValidationError
from peewee import IntegrityError, Tuple

from ingest import lifecycle, metrics, schemas
from ingest.committer import GroupCommitter, Job, StorageFailure
from ingest.logs import bind_context
from ingest.store import (CREATED, DUPLICATE, UNKNOWN_CUSTOMER, KnownCustomers, NewInteraction, probe,
                          write_group)
from models import Customer, Interaction, db, release_connection

log = logging.getLogger(__name__)

CHUNK_SIZE = 100


class ServiceError(Exception):
    def __init__(self, code, message, details=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}


def validation_error(details, message="The request is invalid."):
    return ServiceError("validation_error", message, details)


def storage_error():
    return ServiceError("storage_error", "Nothing was stored; retry the request.",
                        {"retryable": True, "stored": False})


def outcome_unknown():
    return ServiceError(
        "commit_outcome_unknown",
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


@dataclass
class BatchResult:
    total: int
    ids: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    duplicates: int = 0

    @property
    def failed(self):
        return len(self.errors)

    @property
    def successful(self):
        return self.total - self.failed - self.duplicates


class IngestService:
    """The workflow, wired to the analysis queue and the live-event bus.

    ``enqueue_analysis(ids_by_organization, high_priority)`` and ``publish(events_by_organization)``
    are called after commit, once for each committed group of requests, and their
    failure never fails an ingest that is already stored.
    """

    def __init__(self, enqueue_analysis, publish, max_batch_items=1000, commit_timeout=20):
        self.enqueue_analysis = enqueue_analysis
        self.publish = publish
        self.max_batch_items = max_batch_items
        self.commit_timeout = commit_timeout  # seconds a request waits for its commit
        self.known_customers = KnownCustomers()
        self.committer = GroupCommitter(
            lambda jobs: write_group(jobs, self.known_customers), self._after_commit)

    # Customers -----------------------------------------------------------

    def create_customer(self, organization_id, payload):
        """Create a customer; returns (customer, created). An existing externalId wins."""
        data = _load(schemas.customer_in, payload)
        if data["external_id"] is not None:
            existing = self.find_customer(organization_id, data["external_id"])
            if existing is not None:
                return existing, False
        try:
            with db.atomic():
                return Customer.create(organization=organization_id, **data), True
        except IntegrityError:  # created concurrently under the same externalId
            return self.find_customer(organization_id, data["external_id"]), False

    def get_customer(self, organization_id, customer_id):
        customer = _get_or_none(Customer, organization_id, customer_id)
        if customer is None:
            raise ServiceError("customer_not_found", "No such customer.")
        return customer

    def find_customer(self, organization_id, external_id):
        return (Customer.select()
                .where((Customer.organization == organization_id)
                       & (Customer.external_id == external_id))
                .first())

    def erase_customer(self, organization_id, customer_id):
        """Erase a customer and all its interactions (DESIGN §15); the organization's
        sockets are told. Erasing an unknown (or already erased) id is customer_not_found."""
        customer_uuid = _uuid_or_none(customer_id)
        if customer_uuid is None or not lifecycle.erase_customer(organization_id, customer_uuid):
            raise ServiceError("customer_not_found", "No such customer.")
        self.known_customers.forget((uuid.UUID(str(organization_id)), customer_uuid))
        try:
            self.publish({organization_id: [{"type": "customer.deleted",
                                             "data": {"id": str(customer_uuid)}}]})
        except Exception:
            log.warning("publish failed", exc_info=True)

    def find_customers(self, organization_id, query):
        data = _load(schemas.customer_query, query)
        customer = self.find_customer(organization_id, data["external_id"])
        return [customer] if customer else []

    # Interactions -----------------------------------------------------------

    def ingest(self, organization_id, payload, dry_run=False):
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
        """Validate item by item, store valid ones in chunks; returns a BatchResult
        (in a dry run, the same result with no ids, and nothing stored)."""
        return self.ingest_items(organization_id, self._batch_items(payload), dry_run)

    def ingest_items(self, organization_id, raw_items, dry_run=False):
        """The batch workflow for a list of interaction payloads."""
        result = BatchResult(total=len(raw_items), ids=[None] * len(raw_items))
        valid = []  # (index, validated data)
        for index, raw in enumerate(raw_items):
            try:
                valid.append((index, validate_interaction(raw)))
            except ServiceError as error:
                result.errors.append(_item_error(index, error))
        if dry_run:
            valid = [(index, self._prepare(organization_id, data)) for index, data in valid]
            self._record(valid, probe([item for _, item in valid]), result)
            result.errors.sort(key=lambda error: error["index"])
            return result
        return self.store_validated(organization_id, valid, result)

    def store_validated(self, organization_id, valid, result):
        """Store validated items ``[(index, data)]`` in chunks; completes ``result``
        (a BatchResult whose errors may hold the items that failed validation)."""
        valid = [(index, self._prepare(organization_id, data)) for index, data in valid]
        chunks = [valid[start:start + CHUNK_SIZE] for start in range(0, len(valid), CHUNK_SIZE)]
        futures = [self.committer.submit(Job([item for _, item in chunk], high_priority=False))
                   for chunk in chunks]
        release_connection()
        for chunk, future in zip(chunks, futures):
            try:
                self._record(chunk, _wait(future, self.commit_timeout), result)
            except ServiceError as error:
                result.errors += [_item_error(index, error) for index, _ in chunk]
        result.errors.sort(key=lambda error: error["index"])
        metrics.INTERACTIONS.labels("failed").inc(result.failed)
        bind_context(total=result.total, successful=result.successful,
                     duplicates=result.duplicates, failed=result.failed)
        return result

    def _store(self, job):
        future = self.committer.submit(job)
        release_connection()
        return _wait(future, self.commit_timeout)

    @staticmethod
    def _record(chunk, outcomes, result):
        """Enter the outcomes of ``chunk``'s items in ``result``."""
        for (index, item), (status, interaction_id) in zip(chunk, outcomes):
            if status == UNKNOWN_CUSTOMER:
                result.errors.append(_item_error(index, customer_not_found(item)))
                continue
            result.ids[index] = interaction_id
            result.duplicates += status == DUPLICATE

    def _batch_items(self, payload):
        items = _load(schemas.batch_in, payload)["interactions"]
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

    def _after_commit(self, committed):
        """Hand a committed group's new interactions to the live feed (one publish)
        and to analysis (one enqueue per priority); never raises."""
        ids = {True: defaultdict(list), False: defaultdict(list)}
        events = defaultdict(list)
        outcomes = defaultdict(int)
        for job, results in committed:
            for item, (status, _) in zip(job.items, results):
                outcomes[status] += 1
                if status == CREATED:
                    ids[job.high_priority][item.organization_id].append(item.id)
                    events[item.organization_id].append(
                        {"type": "interaction.created", "data": schemas.interaction_out.dump(item)})
        metrics.INTERACTIONS.labels("stored").inc(outcomes[CREATED])
        metrics.INTERACTIONS.labels("duplicate").inc(outcomes[DUPLICATE])
        if events:  # before the analyses are queued, so that "created" precedes "analyzed"
            try:
                self.publish(events)
            except Exception:
                log.warning("publish failed", exc_info=True)
        for high_priority, by_organization in ids.items():
            if by_organization:
                try:
                    self.enqueue_analysis(by_organization, high_priority)
                except Exception:
                    log.warning("analysis enqueue failed; the sweep will pick these up", exc_info=True,
                                extra={"count": sum(map(len, by_organization.values()))})

    # Reads ------------------------------------------------------------------

    def list_interactions(self, organization_id, query):
        """A page of interactions, newest first; returns (items, next_cursor or None).

        Keyset pagination on (timestamp, id): a walk through the pages sees
        every interaction that existed when it began exactly once, whatever is
        inserted meanwhile.
        """
        data = _load(schemas.interaction_query, query)
        conditions = [Interaction.organization == organization_id]
        for name, column in (("customer_id", Interaction.customer), ("channel", Interaction.channel),
                             ("event_type", Interaction.event_type)):
            if data[name] is not None:
                conditions.append(column == data[name])
        if data["since"] is not None:
            conditions.append(Interaction.timestamp >= data["since"])
        if data["until"] is not None:
            conditions.append(Interaction.timestamp < data["until"])
        if data["cursor"] is not None:
            stamp, last_id = data["cursor"]
            conditions.append(Tuple(Interaction.timestamp, Interaction.id)
                              < Tuple(Interaction.timestamp.to_value(stamp),
                                      Interaction.id.to_value(last_id)))
        rows = list(Interaction.select()
                    .where(reduce(operator.and_, conditions))
                    .order_by(Interaction.timestamp.desc(), Interaction.id.desc())
                    .limit(data["limit"] + 1))
        items = rows[:data["limit"]]
        more = len(rows) > data["limit"]
        return items, schemas.encode_cursor(items[-1].timestamp, items[-1].id) if more else None

    def get_interaction(self, organization_id, interaction_id):
        interaction = _get_or_none(Interaction, organization_id, interaction_id)
        if interaction is None:
            raise ServiceError("interaction_not_found", "No such interaction.")
        return interaction


def _load(schema, payload):
    try:
        return schema.load(payload)
    except ValidationError as error:
        details = error.messages
        if not isinstance(details, dict):  # the payload itself was not an object
            details = {"_schema": details}
        raise validation_error(details) from None


def _uuid_or_none(value):
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def _get_or_none(model, organization_id, object_id):
    object_id = _uuid_or_none(object_id)
    if object_id is None:
        return None
    return (model.select()
            .where((model.id == object_id) & (model.organization == organization_id))
            .first())


def validate_interaction(payload):
    """An interaction payload, validated (DESIGN §5), as data; or a ServiceError."""
    return _load(schemas.interaction_in, payload)


def customer_not_found(item):
    return ServiceError("customer_not_found", "No such customer.",
                        {"customerId": [str(item.customer_id)]})


def _item_error(index, error):
    return {"index": index, "error": error.code, "message": error.message,
            "details": error.details}
