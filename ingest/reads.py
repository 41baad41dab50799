"""Reads (DESIGN §5): customers and interactions of one organization, as plain
queries over the models. Arguments come from the request as received; they are
validated here and a wrong one is a validation_error naming it.

The read API's queries run on the replica when there is one (ingest/replica.py);
``find_customer``, which customer creation asks, stays on the primary."""
import operator
from functools import reduce

from peewee import Tuple

from ingest import changes, replica, schemas
from ingest.domain import Code, ServiceError, not_found, uuid_or_none, validation_error
from models import Customer, Interaction


def get_customer(organization_id, customer_id):
    customer = _get_or_none(Customer, organization_id, customer_id)
    if customer is None:
        raise not_found(Code.CUSTOMER_NOT_FOUND)
    return customer


def find_customer(organization_id, external_id):
    """The organization's customer with this external id, or None, from the primary
    (customer creation asks it before and after its insert)."""
    return _with_external_id(organization_id, external_id).first()


def find_customers(organization_id, query):
    data = schemas.customer_query.load(query)
    customer = replica.first(_with_external_id(organization_id, data["external_id"]))
    return [customer] if customer else []


def _with_external_id(organization_id, external_id):
    return Customer.select().where((Customer.organization == organization_id)
                                   & (Customer.external_id == external_id))


def list_interactions(organization_id, query):
    """A page of interactions, newest first; returns (items, next_cursor or None).

    Keyset pagination on (timestamp, id): a walk through the pages sees
    every interaction that existed when it began exactly once, whatever is
    inserted meanwhile.
    """
    data = schemas.interaction_query.load(query)
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
    rows = replica.rows(Interaction.select()
                        .where(reduce(operator.and_, conditions))
                        .order_by(Interaction.timestamp.desc(), Interaction.id.desc())
                        .limit(data["limit"] + 1))
    items = rows[:data["limit"]]
    more = len(rows) > data["limit"]
    return items, schemas.encode_cursor(items[-1].timestamp, items[-1].id) if more else None


def list_changes(organization_id, query):
    """A page of the organization's change feed (DESIGN §16), oldest first; returns
    (events, the cursor to ask after next). A cursor that is not this organization's
    is a validation_error naming ``after``; one older than what is kept,
    ``cursor_expired`` with the oldest cursor still good."""
    data = schemas.change_query.load(query)
    try:
        after = None if data["after"] is None else changes.position_of(organization_id, data["after"])
        events, last = changes.read(organization_id, after, data["limit"])
    except changes.BadCursor:
        raise validation_error({"after": ["Not a cursor of this organization's changes."]}) from None
    except changes.ExpiredCursor as expired:
        raise ServiceError(Code.CURSOR_EXPIRED, "The changes after this cursor are no longer kept; "
                           "start again from oldestCursor.", {"oldestCursor": expired.oldest}) from None
    return events, changes.cursor(organization_id, last)


def get_interaction(organization_id, interaction_id):
    interaction = _get_or_none(Interaction, organization_id, interaction_id)
    if interaction is None:
        raise not_found(Code.INTERACTION_NOT_FOUND)
    return interaction


def _get_or_none(model, organization_id, object_id):
    object_id = uuid_or_none(object_id)
    if object_id is None:
        return None
    return replica.first(model.select().where((model.id == object_id) & (model.organization == organization_id)))
