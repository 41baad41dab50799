"""GET /api/interactions (DESIGN §5): filters, newest first, keyset pagination
that sees every existing item exactly once while ingestion goes on."""
import datetime
import threading
import uuid

import pytest

from tests.helpers import bearer, interaction, make_organization

BASE = datetime.datetime(2026, 3, 1, 12, 0, tzinfo=datetime.timezone.utc)


def at(minutes):
    return (BASE + datetime.timedelta(minutes=minutes)).isoformat()


def listing(client, org, **params):
    response = client.get("/api/interactions", query_string=params, headers=bearer(org["readKey"]))
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def walk(client, org, **params):
    """Every page's ids, following nextCursor to the end."""
    ids, cursor = [], None
    while True:
        page = listing(client, org, **params, **({"cursor": cursor} if cursor else {}))
        ids.extend(item["id"] for item in page["items"])
        cursor = page["nextCursor"]
        if cursor is None:
            return ids


@pytest.fixture
def stored(service, org, customer_id):
    """12 interactions: minutes 0..11, chat/email alternating; 3 share minute 5's timestamp."""
    ids = {}
    for minute in range(12):
        stamp = at(5) if minute in (5, 6, 7) else at(minute)
        ids[minute], _ = service.ingest_one(org["organizationId"], interaction(
            customer_id, timestamp=stamp, channel="chat" if minute % 2 else "email",
            eventType="view" if minute < 6 else "click"))
    return {minute: str(id_) for minute, id_ in ids.items()}


def test_newest_first_with_filters(client, org, customer_id, stored):
    everything = listing(client, org)
    assert everything["nextCursor"] is None
    stamps = [item["timestamp"] for item in everything["items"]]
    assert stamps == sorted(stamps, reverse=True) and len(stamps) == 12
    assert everything["items"][0]["id"] == stored[11]

    chats = listing(client, org, channel="chat")["items"]
    assert {i["channel"] for i in chats} == {"chat"} and len(chats) == 6
    clicks = listing(client, org, eventType="click")["items"]
    assert len(clicks) == 6
    window = listing(client, org, since=at(2), until=at(4))["items"]
    assert sorted(i["id"] for i in window) == sorted([stored[2], stored[3]])  # since in, until out
    mine = listing(client, org, customerId=customer_id)["items"]
    assert len(mine) == 12
    assert listing(client, org, customerId=str(uuid.uuid4()))["items"] == []


def test_pages_cover_everything_once_including_equal_timestamps(client, org, stored):
    ids = walk(client, org, limit=2)
    assert len(ids) == 12 and set(ids) == set(stored.values())
    first = listing(client, org, limit=5)
    assert len(first["items"]) == 5 and first["nextCursor"]


def test_other_organizations_see_nothing(app, client, stored):
    other = make_organization(app, "Other")
    assert listing(client, other)["items"] == []


@pytest.mark.parametrize("params, name", [
    ({"limit": 0}, "limit"), ({"limit": 501}, "limit"), ({"limit": "many"}, "limit"),
    ({"since": "2026-01-01T00:00:00"}, "since"), ({"until": "soon"}, "until"),
    ({"cursor": "garbage!"}, "cursor"), ({"channel": "fax"}, "channel"),
    ({"customerId": "nope"}, "customerId"), ({"sort": "asc"}, "sort"),
])
def test_bad_parameters_are_400_naming_them(client, org, params, name):
    response = client.get("/api/interactions", query_string=params, headers=bearer(org["readKey"]))
    assert response.status_code == 400
    assert name in response.get_json()["details"]


def test_walking_pages_while_ingesting_sees_each_existing_item_once(app, client, service, org,
                                                                     customer_id):
    before = [str(service.ingest_one(org["organizationId"], interaction(customer_id, timestamp=at(m % 40)))[0])
              for m in range(120)]
    stop, written = threading.Event(), []

    def ingest_meanwhile():
        with app.app_context():
            while not stop.is_set():  # new items at old and new timestamps
                written.append(service.ingest_one(org["organizationId"], interaction(
                    customer_id, timestamp=at(len(written) * 7 % 60)))[0])

    writer = threading.Thread(target=ingest_meanwhile)
    writer.start()
    try:
        seen, cursor = [], None
        while True:
            page = listing(client, org, limit=7, **({"cursor": cursor} if cursor else {}))
            seen.extend(item["id"] for item in page["items"])
            cursor = page["nextCursor"]
            if cursor is None:
                break
            written_by = len(written)
            while len(written) == written_by:  # an insert between every two pages
                pass
    finally:
        stop.set()
        writer.join()
    assert len(written) > 15
    assert len(seen) == len(set(seen)), "an item was seen twice"
    assert set(before) <= set(seen), "an existing item was skipped"
