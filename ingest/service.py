"""The ingest workflow (DESIGN §6), free of Flask and HTTP.

validate -> enrich with the organization -> store (one transaction: inserts and
one UPDATE per customer, via the process's group committer) -> after commit:
enqueue the analysis, publish ``interaction.created``.

Failures are raised as ``ServiceError`` with a stable code; the web layer maps
codes to HTTP statuses.
"""
import logging
import uuid
from dataclasses import dataclass, field

from marshmallow import ValidationError
from peewee import IntegrityError

from ingest import schemas
from ingest.committer import GroupCommitter, StorageFailure
from ingest.store import CREATED, NewInteraction, write_group
from models import Customer, Interaction, db

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
    return ServiceError("storage_error", "Storing failed and was rolled back; retry the request.",
                        {"retryable": True})


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

    ``enqueue_analysis(ids, high_priority)`` and ``publish(organization_id,
    events)`` are called only after commit, and their failure never fails an
    ingest that is already stored.
    """

    def __init__(self, enqueue_analysis, publish, max_batch_items=1000):
        self.enqueue_analysis = enqueue_analysis
        self.publish = publish
        self.max_batch_items = max_batch_items
        self.committer = GroupCommitter(write_group)

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

    def find_customers(self, organization_id, query):
        data = _load(schemas.customer_query, query)
        customer = self.find_customer(organization_id, data["external_id"])
        return [customer] if customer else []

    # Interactions -----------------------------------------------------------

    def ingest(self, organization_id, payload):
        """Store one interaction; returns (interaction_id, duplicate)."""
        item = self._prepare(organization_id, _load(schemas.interaction_in, payload))
        if item.customer_id not in self._known_customers(organization_id, [item.customer_id]):
            raise ServiceError("customer_not_found", "No such customer.",
                               {"customerId": [str(item.customer_id)]})
        try:
            [(status, interaction_id)] = self.committer.submit([item]).result()
        except StorageFailure:
            raise storage_error() from None
        if status == CREATED:
            self._after_commit([item], high_priority=True)
        log.info("interaction ingested", extra={
            "organization_id": organization_id, "customer_id": item.customer_id,
            "interaction_id": interaction_id, "duplicate": status != CREATED})
        return interaction_id, status != CREATED

    def ingest_batch(self, organization_id, payload):
        """Validate item by item, store valid ones in chunks; returns a BatchResult."""
        raw_items = self._batch_items(payload)
        result = BatchResult(total=len(raw_items), ids=[None] * len(raw_items))
        valid = []  # (index, NewInteraction)
        for index, raw in enumerate(raw_items):
            try:
                valid.append((index, self._prepare(organization_id,
                                                   _load(schemas.interaction_in, raw))))
            except ServiceError as error:
                result.errors.append(_item_error(index, error))
        known = self._known_customers(organization_id, {item.customer_id for _, item in valid})
        for index, item in valid:
            if item.customer_id not in known:
                result.errors.append(_item_error(index, ServiceError(
                    "customer_not_found", "No such customer.",
                    {"customerId": [str(item.customer_id)]})))
        valid = [(index, item) for index, item in valid if item.customer_id in known]

        chunks = [valid[start:start + CHUNK_SIZE] for start in range(0, len(valid), CHUNK_SIZE)]
        futures = [self.committer.submit([item for _, item in chunk]) for chunk in chunks]
        for chunk, future in zip(chunks, futures):
            self._settle_chunk(chunk, future, result)
        result.errors.sort(key=lambda error: error["index"])
        log.info("batch ingested", extra={
            "organization_id": organization_id, "total": result.total,
            "successful": result.successful, "duplicates": result.duplicates,
            "failed": result.failed})
        return result

    def _settle_chunk(self, chunk, future, result):
        try:
            outcomes = future.result()
        except StorageFailure:
            for index, _ in chunk:
                result.errors.append(_item_error(index, storage_error()))
            return
        created = []
        for (index, item), (status, interaction_id) in zip(chunk, outcomes):
            result.ids[index] = interaction_id
            if status == CREATED:
                created.append(item)
            else:
                result.duplicates += 1
        self._after_commit(created, high_priority=False)

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

    @staticmethod
    def _known_customers(organization_id, customer_ids):
        if not customer_ids:
            return set()
        query = (Customer.select(Customer.id)
                 .where((Customer.organization == organization_id)
                        & Customer.id.in_(list(customer_ids)))
                 .tuples())
        return {row[0] for row in query}

    def _after_commit(self, items, high_priority):
        """Hand committed interactions (of one organization) to analysis and the
        live feed; never raises."""
        if not items:
            return
        ids = [item.id for item in items]
        try:
            self.enqueue_analysis(ids, high_priority)
        except Exception:
            log.warning("analysis enqueue failed; the sweep will pick these up",
                        exc_info=True, extra={"interaction_ids": ids})
        try:
            self.publish(items[0].organization_id, [
                {"type": "interaction.created", "data": schemas.interaction_out.dump(item)}
                for item in items])
        except Exception:
            log.warning("publish failed", exc_info=True, extra={"interaction_ids": ids})

    # Reads ------------------------------------------------------------------

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


def _get_or_none(model, organization_id, object_id):
    try:
        object_id = uuid.UUID(str(object_id))
    except ValueError:
        return None
    return (model.select()
            .where((model.id == object_id) & (model.organization == organization_id))
            .first())


def _item_error(index, error):
    return {"index": index, "error": error.code, "message": error.message,
            "details": error.details}
