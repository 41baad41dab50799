"""Wire schemas (marshmallow 4): camelCase outside, snake_case inside.

The field rules of DESIGN §5 live here and nowhere else. Every string and
JSON value that loads must also store on PostgreSQL exactly as on SQLite, so
the custom fields below refuse what one of them cannot keep (NUL, lone
surrogates, non-finite numbers).
"""
import base64
import binascii
import datetime
import json
import math
import uuid

from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_dump, validate

from ingest.changes import EventType
from ingest.domain import validation_error
from models import DONE, FAILED, SKIPPED

CHANNELS = ("web", "mobile", "email", "chat", "phone", "social", "in_store", "api", "other")
MAX_FUTURE = datetime.timedelta(hours=24)
MAX_JSON_BYTES = 16 * 1024
MAX_JSON_DEPTH = 32
UTC = datetime.timezone.utc


def check_text(value):
    """Raise ValidationError for text that PostgreSQL or UTF-8 cannot hold."""
    if "\x00" in value:
        raise ValidationError("Must not contain NUL characters.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError("Must be valid Unicode text (no lone surrogates).") from None


class Text(fields.String):
    """A string that stores identically on SQLite and PostgreSQL."""

    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        check_text(value)
        return value


class UtcDateTime(fields.AwareDateTime):
    """ISO 8601 with an offset on the wire; naive UTC inside (how it is stored)."""

    def __init__(self, **kwargs):
        super().__init__(format="iso", **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        aware = super()._deserialize(value, attr, data, **kwargs)
        try:
            return aware.astimezone(UTC).replace(tzinfo=None)
        except OverflowError:
            raise ValidationError("Out of range once converted to UTC.") from None

    # _serialize/_deserialize: marshmallow's documented way to write a field ("Custom
    # Fields"); test_properties.test_what_validates_reads_back_exactly guards both.
    def _serialize(self, value, attr, obj, **kwargs):
        return None if value is None else value.replace(tzinfo=UTC).isoformat()


def _check_json(value, depth=0):
    if depth > MAX_JSON_DEPTH:
        raise ValidationError("Nested deeper than %d levels." % MAX_JSON_DEPTH)
    if isinstance(value, str):
        check_text(value)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValidationError("Numbers must be finite.")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key)
            _check_json(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_json(item, depth + 1)


class JsonObject(fields.Dict):
    """A JSON object of at most 16 KiB serialised, storable on every database."""

    _encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # one for every value

    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        _check_json(value)
        size = len(self._encoder.encode(value).encode("utf-8"))
        if size > MAX_JSON_BYTES:
            raise ValidationError("Larger than %d bytes serialised." % MAX_JSON_BYTES)
        return value


def not_far_future(value):
    now = datetime.datetime.now(UTC).replace(tzinfo=None)
    if value > now + MAX_FUTURE:
        raise ValidationError("Must not be more than %d hours in the future." % (MAX_FUTURE.total_seconds() // 3600))


def printable(value):
    if not value.isprintable():
        raise ValidationError("Must contain printable characters only.")


class Incoming(Schema):
    """What a client sends: ``load`` raises a validation_error (ingest/domain.py)
    naming each wrong field, which the error handler answers with a 400."""

    def load(self, data, **kwargs):
        try:
            return super().load(data, **kwargs)
        except ValidationError as error:
            raise validation_error(field_errors(error)) from None


def field_errors(error):
    """A ValidationError's messages by field; "_schema" for the payload as a whole
    (one that is not an object, say)."""
    return error.messages if isinstance(error.messages, dict) else {"_schema": error.messages}


class InteractionIn(Incoming):
    """One interaction as a client sends it (POST /api/data/ingest, batch items)."""
    customer_id = fields.UUID(required=True, data_key="customerId")
    timestamp = UtcDateTime(required=True, validate=not_far_future)
    channel = fields.String(required=True, validate=validate.OneOf(CHANNELS))
    event_type = Text(required=True, data_key="eventType",
                      validate=[validate.Length(1, 100), printable])
    content = Text(load_default=None, allow_none=True, validate=validate.Length(max=10_000))
    metadata = JsonObject(load_default=dict)
    message_id = Text(load_default=None, allow_none=True, data_key="messageId",
                      validate=validate.Length(1, 128))


class BatchIn(Incoming):
    """The batch envelope; its items are validated one by one by the service."""
    interactions = fields.List(fields.Raw(), required=True)


class CustomerIn(Incoming):
    external_id = Text(load_default=None, allow_none=True, data_key="externalId",
                       validate=validate.Length(1, 255))
    name = Text(load_default=None, allow_none=True, validate=validate.Length(max=255))
    email = fields.Email(load_default=None, allow_none=True,
                         validate=[validate.Length(max=320), check_text])
    traits = JsonObject(load_default=dict)


class CustomerQuery(Incoming):
    external_id = Text(required=True, data_key="externalId", validate=validate.Length(1, 255))


class Cursor(fields.String):
    """An opaque keyset position: base64url of [timestamp, id] of the last item seen."""

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            position = json.loads(base64.urlsafe_b64decode(text.encode() + b"==="))
            if not (isinstance(position, list) and len(position) == 2
                    and all(isinstance(part, str) for part in position)):
                raise ValueError("not [timestamp, id]")
            stamp, id_ = position
            return datetime.datetime.fromisoformat(stamp).replace(tzinfo=None), uuid.UUID(id_)
        except (ValueError, TypeError, RecursionError, binascii.Error):
            raise ValidationError("Not a cursor this API returned.") from None


def encode_cursor(timestamp, id_):
    raw = json.dumps([timestamp.isoformat(), str(id_)]).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class InteractionQuery(Incoming):
    """GET /api/interactions: filters, newest first, keyset pagination."""
    customer_id = fields.UUID(load_default=None, data_key="customerId")
    channel = fields.String(load_default=None, validate=validate.OneOf(CHANNELS))
    event_type = Text(load_default=None, data_key="eventType", validate=validate.Length(1, 100))
    since = UtcDateTime(load_default=None)
    until = UtcDateTime(load_default=None)
    limit = fields.Integer(load_default=50, validate=validate.Range(1, 500))
    cursor = Cursor(load_default=None)


class ChangeQuery(Incoming):
    """GET /api/changes: the changes after a cursor, oldest first."""
    after = fields.String(load_default=None, validate=validate.Length(1, 64))
    limit = fields.Integer(load_default=100, validate=validate.Range(1, 1000))


class CustomerOut(Schema):
    id = fields.UUID()
    external_id = fields.String(data_key="externalId", allow_none=True)
    name = fields.String(allow_none=True)
    email = fields.String(allow_none=True)
    traits = fields.Dict()
    created_at = UtcDateTime(data_key="createdAt")
    last_seen_at = UtcDateTime(data_key="lastSeenAt", allow_none=True)
    interaction_count = fields.Integer(data_key="interactionCount")


class SentimentOut(Schema):
    label = fields.String()
    score = fields.Float()


class InteractionOut(Schema):
    id = fields.UUID()
    customer_id = fields.UUID(data_key="customerId")
    message_id = fields.String(data_key="messageId", allow_none=True)
    timestamp = UtcDateTime()
    received_at = UtcDateTime(data_key="receivedAt")
    channel = fields.String()
    event_type = fields.String(data_key="eventType")
    content = fields.String(allow_none=True)
    metadata = fields.Dict()
    analysis_status = fields.String(data_key="analysisStatus")
    sentiment = fields.Nested(SentimentOut, allow_none=True)
    analysis_error = fields.String(data_key="analysisError", allow_none=True)
    analyzed_at = UtcDateTime(data_key="analyzedAt", allow_none=True)


class Error(Schema):
    """Every error response (ingest/errors.py)."""
    error = fields.String(required=True, metadata={"description": "A stable code, e.g. validation_error."})
    message = fields.String(required=True)
    details = fields.Dict(required=True, metadata={"description": "Per-field messages, when any."})


class ItemError(Error):
    """One failed item of a batch, by its index in the request."""
    index = fields.Integer(required=True)


class WriteResult(Schema):
    """An answer to a write that can be a dry run (``?dryRun=true``)."""
    dry_run = fields.Boolean(data_key="dryRun", metadata={"description": "present, true, in a dry run"})

    @post_dump
    def _dry_run_last_and_only_when_true(self, data, **kwargs):
        if data.pop("dryRun", False):
            data["dryRun"] = True
        return data


class IngestResult(WriteResult):
    id = fields.UUID(required=True, allow_none=True, metadata={"description": "null in a dry run"})
    duplicate = fields.Boolean(required=True)


class BatchResult(WriteResult):
    total = fields.Integer(required=True)
    successful = fields.Integer(required=True)
    failed = fields.Integer(required=True)
    duplicates = fields.Integer(required=True)
    ids = fields.List(fields.UUID(allow_none=True), required=True)
    errors = fields.List(fields.Nested(ItemError), required=True)


class CustomerList(Schema):
    items = fields.List(fields.Nested(CustomerOut), required=True)


class InteractionPage(Schema):
    items = fields.List(fields.Nested(InteractionOut), required=True)
    next_cursor = fields.String(data_key="nextCursor", allow_none=True, required=True)


class ChangeOut(Schema):
    """One change of the organization's stream, as the feed's socket sends it (DESIGN §16)."""
    type = fields.String(required=True, metadata={
        "description": "interaction.created, interaction.analyzed or customer.deleted"})
    cursor = fields.String(required=True, metadata={"description": "opaque; resume after it"})
    data = fields.Dict(required=True, metadata={
        "description": "the interaction as stored; {id, customerId, analysisStatus, sentiment}; "
                       "or the erased customer's {id}"})


class ChangePage(Schema):
    items = fields.List(fields.Nested(ChangeOut), required=True)
    next_cursor = fields.String(data_key="nextCursor", required=True, metadata={
        "description": "the cursor to ask after next: the last change read, or `after` itself "
                       "when there was none (poll again later)"})


# Live messages: what the feed's socket sends (DESIGN §8, §16), published in the
# OpenAPI document's components. Their producers build them directly, for speed
# (changes.event and its data builders, the fan-out's notices, the feed's ready);
# the tests check every message a test socket receives against these.

class AnalyzedData(Schema):
    """An interaction's analysis: done, skipped (no text) or failed (no sentiment)."""
    id = fields.UUID(required=True)
    customer_id = fields.UUID(data_key="customerId", required=True)
    analysis_status = fields.String(data_key="analysisStatus", required=True,
                                    validate=validate.OneOf((DONE, SKIPPED, FAILED)))
    sentiment = fields.Nested(SentimentOut, required=True, allow_none=True)


class DeletedData(Schema):
    """The erased customer."""
    id = fields.UUID(required=True)


class CreatedEvent(ChangeOut):
    """An interaction was stored: as the read API shows it, pending."""
    type = fields.String(required=True, validate=validate.Equal(EventType.CREATED))
    data = fields.Nested(InteractionOut, required=True)


class AnalyzedEvent(ChangeOut):
    """An interaction's analysis was stored."""
    type = fields.String(required=True, validate=validate.Equal(EventType.ANALYZED))
    data = fields.Nested(AnalyzedData, required=True)


class DeletedEvent(ChangeOut):
    """A customer and every interaction of it were erased."""
    type = fields.String(required=True, validate=validate.Equal(EventType.CUSTOMER_DELETED))
    data = fields.Nested(DeletedData, required=True)


class ReadyNotice(Schema):
    """The socket is authenticated; its changes follow, after ``cursor``."""
    type = fields.String(required=True, validate=validate.Equal("ready"))
    organization_id = fields.UUID(data_key="organizationId", required=True)
    cursor = fields.String(required=True)


class DroppedNotice(Schema):
    """This socket fell behind: ``count`` changes were dropped for it, and are sent
    again, in order, once it has drained."""
    type = fields.String(required=True, validate=validate.Equal("dropped"))
    count = fields.Integer(required=True)


# A live message's ``type`` -> its schema.
LIVE_MESSAGES = {EventType.CREATED: CreatedEvent, EventType.ANALYZED: AnalyzedEvent,
                 EventType.CUSTOMER_DELETED: DeletedEvent, "ready": ReadyNotice, "dropped": DroppedNotice}


class ReplicaHealth(Schema):
    """The read replica (DATABASE_READ_URL), which never makes the service unready:
    while it is down (``fallback``), reads go to the primary."""
    status = fields.String(required=True)
    lag_seconds = fields.Float(data_key="lagSeconds", allow_none=True, required=True)
    fallback = fields.Boolean(required=True)


class Health(Schema):
    status = fields.String(required=True)
    checks = fields.Dict(keys=fields.String(), values=fields.String())
    replica = fields.Nested(ReplicaHealth)


interaction_in = InteractionIn()
batch_in = BatchIn(unknown=EXCLUDE)
customer_in = CustomerIn()
customer_query = CustomerQuery(unknown=EXCLUDE)
interaction_query = InteractionQuery()
change_query = ChangeQuery()
customer_out = CustomerOut()
interaction_out = InteractionOut()
error = Error()
ingest_result = IngestResult()
batch_result = BatchResult()
customer_list = CustomerList()
interaction_page = InteractionPage()
change_page = ChangePage()
health = Health()
