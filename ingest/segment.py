"""Segment compatibility (DESIGN §9): Segment's events mapped onto ours.

`track` and `page` become interactions of the customer whose external id is
the event's userId (or anonymousId), created when new; `identify` upserts that
customer and merges its traits. Timestamps are corrected for the sender's
clock: timestamp = receivedAt - (sentAt - timestamp). messageId is our
idempotency key, so a client that retries a whole batch stores nothing twice.
Problems with one event are reported and never fail the others, and an event
that is refused creates no customer: every event is validated first.

Erasure (DESIGN §15): once a customer is erased, events for its external id
whose time (corrected as above) is not after the erasure are refused with
``customer_erased``, in a 200 like any problem, so that a client retrying an
older batch does not bring the customer back; a later event creates it anew.
That decision and the creation are one transaction that no erasure of those
external ids can interleave with (``resolve_customers``). An event whose
customer is erased while it is in flight, after it was looked up, is refused
the same way: the erasure came after the event.
"""
import datetime
from dataclasses import dataclass

from marshmallow import INCLUDE, Schema, ValidationError, fields

from ingest import lifecycle, metrics
from ingest.domain import BatchOutcome, Code, ServiceError, validation_error
from ingest.schemas import (
    UTC,
    ItemError,
    JsonObject,
    WriteResult,
    check_text,
    customer_in,
    field_errors,
    interaction_in,
    not_far_future,
)
from models import Customer, db, utcnow

# Segment's wire shapes, as published in the OpenAPI description. The request
# bodies are read by the functions below, event by event, so that one bad event
# never fails the others.

class SegmentProblem(ItemError):
    message_id = fields.String(data_key="messageId", allow_none=True)


class SegmentResult(WriteResult):
    success = fields.Boolean(required=True)
    errors = fields.List(fields.Nested(SegmentProblem))


class SegmentBatch(Schema):
    """Segment's batch envelope; each event is checked on its own."""
    batch = fields.List(fields.Dict(), required=True)
    sent_at = fields.String(data_key="sentAt")
    write_key = fields.String(data_key="writeKey")
    context = fields.Dict()


class SegmentEvent(Schema):
    """A Segment track/identify/page call; see Segment's HTTP Tracking API."""
    class Meta:
        unknown = INCLUDE

    user_id = fields.String(data_key="userId")
    anonymous_id = fields.String(data_key="anonymousId")
    event = fields.String()
    properties = fields.Dict()
    traits = fields.Dict()
    context = fields.Dict()
    timestamp = fields.String()
    message_id = fields.String(data_key="messageId")
    write_key = fields.String(data_key="writeKey")


problem_out = SegmentProblem()
result_out = SegmentResult()


@dataclass
class Accepted:
    """An event that passed validation: an identify's traits or a track's data."""
    index: int
    user: str
    when: datetime.datetime
    traits: dict = None
    data: dict = None


def accept(service, organization_id, payload, kind=None, dry_run=False):
    """Segment's /v1/batch (or, with ``kind``, /v1/track etc.).

    Returns ``(problems, retry)``: per-event problems, and whether storing
    failed so that the client should retry (safe: messageIds make it idempotent).
    A dry run returns the same problems and stores nothing, customers included.
    """
    try:
        events = events_of(payload, kind)
    except EnvelopeError as error:
        raise validation_error({"batch": [str(error)]}) from None
    if len(events) > service.max_batch_items:
        raise validation_error({"batch": ["At most %d events per batch." % service.max_batch_items]})
    received_at, accepted, problems = utcnow(), [], []
    for index, event in enumerate(events):
        try:
            accepted.append(_accept(index, event, payload.get("sentAt"), received_at))
        except ValidationError as error:
            problems.append(_problem(index, event, field_errors(error)))
        except ServiceError as error:
            problems.append(_problem(index, event, error.details))
    if dry_run:
        _not_erased(accepted, lifecycle.erased_since(organization_id, _users(accepted)), events, problems)
        return sorted(problems, key=lambda problem: problem["index"]), False
    customers, erased = resolve_customers(organization_id, accepted)
    accepted = _not_erased(accepted, erased, events, problems, customers)
    tracks = [event for event in accepted if event.data is not None]
    for event in accepted:
        if event.traits is not None and not identify(customers[event.user], event.traits):
            problems.append(_erased(event, events, ERASED_IN_FLIGHT))
    metrics.INTERACTIONS.labels("failed").inc(len(problems))  # (store_validated counts its own)
    result = service.store_validated(
        organization_id, [(n, {**event.data, "customer_id": customers[event.user]})
                          for n, event in enumerate(tracks)],
        BatchOutcome(total=len(tracks), ids=[None] * len(tracks)))
    for error in result.errors:
        event = tracks[error["index"]]
        problems.append(_erased(event, events, ERASED_IN_FLIGHT) if error["error"] == Code.CUSTOMER_NOT_FOUND
                        else {**error, "index": event.index, "message_id": _message_id(events[event.index])})
    problems.sort(key=lambda problem: problem["index"])
    return problems, any(e["error"] == Code.STORAGE_ERROR for e in result.errors)


def _accept(index, event, sent_at, received_at):
    if not isinstance(event, dict) or event.get("type") not in SUPPORTED:
        raise ValidationError({"type": ["Must be one of: %s." % ", ".join(SUPPORTED)]})
    user = user_of(event)
    check_message_id(event)
    when = event_time(event, sent_at, received_at)
    if event["type"] == "identify":
        return Accepted(index, user, when, traits=traits_of(event))
    return Accepted(index, user, when, data=interaction_of(event, when))


ERASED_SINCE = "This customer was erased after this event's time."
ERASED_IN_FLIGHT = "This customer was erased while this event was being stored."


def _not_erased(accepted, erased, events, problems, customers=None):
    """``accepted`` without the events refused for an erasure (added to ``problems``):
    those not after their user's erasure (``erased``: {user: when}), and, given
    ``customers``, those whose customer was erased after it was looked up."""
    kept = []
    for event in accepted:
        if _predates_erasure(event, erased):
            problems.append(_erased(event, events, ERASED_SINCE))
        elif customers is not None and event.user not in customers:
            problems.append(_erased(event, events, ERASED_IN_FLIGHT))
        else:
            kept.append(event)
    return kept


def _predates_erasure(event, erased):
    return event.user in erased and event.when <= erased[event.user]


def _erased(event, events, reason):
    return {**_problem(event.index, events[event.index], {"userId": [reason]}),
            "error": Code.CUSTOMER_ERASED, "message": "The customer was erased."}


def _users(events):
    return {event.user for event in events}


def _problem(index, event, details):
    return {"index": index, "error": Code.VALIDATION_ERROR, "message": "The event is invalid.",
            "details": details, "message_id": _message_id(event)}


def _message_id(event):
    """The event's messageId, to name it in a problem report, when it is a string."""
    message_id = event.get("messageId") if isinstance(event, dict) else None
    return message_id if isinstance(message_id, str) else None

CHANNEL_OF = {"browser": "web", "mobile": "mobile", "server": "api"}  # Segment context.channel -> ours
CONTENT_KEYS = ("content", "text", "message", "body")
SUPPORTED = ("track", "page", "identify")


class EnvelopeError(ValueError):
    """The request as a whole is not a Segment batch (400)."""


def events_of(payload, kind=None):
    """The events of a /v1/batch body, or the one event of /v1/track etc."""
    if not isinstance(payload, dict):
        raise EnvelopeError("The body must be a JSON object.")
    if kind is not None:
        return [{**payload, "type": kind}]
    batch = payload.get("batch")
    if not isinstance(batch, list) or not batch:
        raise EnvelopeError("'batch' must be a non-empty list of events.")
    return batch


def _parse_time(value, name):
    """An ISO 8601 time as naive UTC; Segment's libraries send offsets, naive means UTC."""
    if value is None:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC).replace(tzinfo=None)
    except (ValueError, OverflowError):
        raise ValidationError({name: ["Not a valid ISO 8601 time."]}) from None


def event_time(event, sent_at, received_at):
    """timestamp corrected for the sender's clock skew (DESIGN §9)."""
    stamp = _parse_time(event.get("timestamp") or event.get("originalTimestamp"), "timestamp")
    sent = _parse_time(event.get("sentAt") or sent_at, "sentAt")
    if stamp is None:
        return received_at
    if sent is None:
        return stamp
    try:
        return received_at - (sent - stamp)
    except OverflowError:
        raise ValidationError({"timestamp": ["Out of range once corrected for sentAt."]}) from None


MESSAGE_ID = interaction_in.fields["message_id"]


def check_message_id(event):
    """A messageId is what our interactions take (DESIGN §5: 1-128 characters); a
    number or an object is refused rather than stored as its text."""
    try:
        MESSAGE_ID.deserialize(event.get("messageId"))
    except ValidationError as error:
        raise ValidationError({"messageId": error.messages}) from None


EXTERNAL_ID = customer_in.fields["external_id"]


def user_of(event):
    """The event's user as its customer's external id, checked as our API checks one."""
    user = event.get("userId") or event.get("anonymousId")
    if user is None or isinstance(user, (dict, list, bool)):
        raise ValidationError({"userId": ["userId or anonymousId is required."]})
    try:
        return EXTERNAL_ID.deserialize(str(user))
    except ValidationError as error:
        raise ValidationError({"userId": error.messages}) from None


def interaction_of(event, when):
    """A track or page event as our interaction's fields (NewInteraction's, but for
    its organization and its customer, which are resolved later), each checked by
    the field our own API checks it with (schemas.InteractionIn)."""
    properties = event.get("properties") or {}
    if not isinstance(properties, dict):
        raise ValidationError({"properties": ["Not a valid object."]})
    context = event.get("context") if isinstance(event.get("context"), dict) else {}
    page = event["type"] == "page"
    sent_channel = context.get("channel")
    if sent_channel is None:
        channel = "web" if page else "api"
    else:
        channel = CHANNEL_OF.get(sent_channel, "other") if isinstance(sent_channel, str) else "other"
    content = next((properties[k] for k in CONTENT_KEYS if isinstance(properties.get(k), str)), None)
    try:
        not_far_future(when)
    except ValidationError as error:
        raise ValidationError({"timestamp": error.messages}) from None
    return {"timestamp": when, **_checked({
        "channel": channel,
        "event_type": "page_view" if page else event.get("event"),
        "content": content if content is not None else (properties.get("title") if page else None),
        "metadata": properties,
        "message_id": event.get("messageId"),
    })}


def _checked(values):
    """``values`` deserialised by InteractionIn's fields; a ValidationError naming
    every wrong one (by its wire name)."""
    checked, errors = {}, {}
    for name, value in values.items():
        field = interaction_in.fields[name]
        try:
            checked[name] = field.deserialize(value)
        except ValidationError as error:
            errors[field.data_key or name] = error.messages
    if errors:
        raise ValidationError(errors)
    return checked


def resolve_customers(organization_id, accepted):
    """``(customers, erased)`` for the users of the ``accepted`` events: their customers'
    ids ({external id: id}), created for the events that are after their user's
    erasure, and when each erased user was erased ({external id: when}).

    Customers are created in one transaction that decides again, under the lock of
    their external ids (lifecycle.external_ids_locked), which events an erasure
    refuses: an erasure either committed before it, and is read, or waits for it,
    and erases what it created. Without a customer to create nothing is locked: an
    erasure committed after those reads erases a customer that existed, and the
    events for it find no customer when they are written."""
    customers, erased, missing = _look_up(organization_id, accepted)
    if not missing:
        return customers, erased
    with lifecycle.external_ids_locked(organization_id, missing):
        customers, erased, still_missing = _look_up(organization_id, accepted)
        # Not the others: their customers were erased since they were looked up, and
        # their ids are not locked; their events were in flight, and are refused.
        create = missing & still_missing
        if create:
            lifecycle.add_customers(organization_id, [{"external_id": ext, "traits": {}} for ext in sorted(create)])
            customers = _customer_ids(organization_id, _users(accepted))
    return customers, erased


def _look_up(organization_id, accepted):
    """The customers of the events' users, the users' erasures, and the users
    missing a customer for an event after their erasure."""
    users = _users(accepted)
    customers, erased = _customer_ids(organization_id, users), lifecycle.erased_since(organization_id, users)
    return customers, erased, _users(e for e in accepted if not _predates_erasure(e, erased)) - set(customers)


def _customer_ids(organization_id, external_ids):
    """{external id: customer id} for those of ``external_ids`` that are customers."""
    if not external_ids:
        return {}
    return dict(Customer.select(Customer.external_id, Customer.id)
                .where((Customer.organization == organization_id)
                       & Customer.external_id.in_(list(external_ids))).tuples())


def traits_of(event):
    """An identify's traits, checked: an object whose name and email store as text."""
    traits = event.get("traits") or {}
    if not isinstance(traits, dict):
        raise ValidationError({"traits": ["Not a valid object."]})
    for key in ("name", "email"):
        if isinstance(traits.get(key), str):
            check_text(traits[key])
    return JsonObject().deserialize(traits)


def identify(customer_id, traits):
    """Merge ``traits`` into the customer's; name and email fill their own fields.

    The row is locked while its traits are merged (SQLite's BEGIN IMMEDIATE does
    that for the whole database), so concurrent identifies of one user each add
    their traits instead of overwriting each other's. Returns False, merging
    nothing, if the customer is gone: erased since it was looked up."""
    values = {key: traits[key][:255] for key in ("name", "email") if isinstance(traits.get(key), str)}
    with db.atomic():
        query = Customer.select(Customer.traits).where(Customer.id == customer_id)
        current = db.dialect.locked(query).scalar()
        if current is None:
            return False
        merged = JsonObject().deserialize({**current, **traits})
        Customer.update(traits=merged, **values).where(Customer.id == customer_id).execute()
    return True
