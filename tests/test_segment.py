"""Segment compatibility (DESIGN §9): the HTTP tracking API's shape through the
test client, and the official segment-analytics-python client against gunicorn."""
import base64
import datetime
import gzip
import json
import uuid

import pytest
from segment.analytics import Client

from models import Customer, Interaction
from tests.helpers import UTC
from tests.servers import Gunicorn


def basic(key):
    return {"Authorization": "Basic " + base64.b64encode((key + ":").encode()).decode()}


def track(user, event="Order Completed", **fields):
    return {"type": "track", "userId": user, "event": event, "messageId": str(uuid.uuid4()),
            "timestamp": datetime.datetime.now(UTC).isoformat(), "properties": {"total": 20},
            **fields}


def post(client, path, body, headers):
    return client.post(path, data=json.dumps(body), content_type="application/json", headers=headers)


def test_batch_maps_segment_events(app, client, org):
    batch = {"batch": [
        track("u-1", properties={"text": "Great service!", "total": 5}, context={"channel": "browser"}),
        {"type": "identify", "userId": "u-1", "traits": {"name": "Ada", "email": "ada@example.com",
                                                         "plan": "pro"}},
        {"type": "page", "anonymousId": "anon-7", "properties": {"title": "Pricing"},
         "messageId": "page-1"},
        track("u-2", context={"channel": "server"}),
    ], "sentAt": datetime.datetime.now(UTC).isoformat()}
    response = post(client, "/v1/batch", batch, basic(org["ingestKey"]))
    assert response.status_code == 200 and response.get_json() == {"success": True}
    with app.app_context():
        customers = {c.external_id: c for c in Customer.select()}
        assert set(customers) == {"u-1", "anon-7", "u-2"}
        assert (customers["u-1"].name, customers["u-1"].email) == ("Ada", "ada@example.com")
        assert customers["u-1"].traits["plan"] == "pro"
        rows = {r.customer.external_id: r for r in Interaction.select()}
    assert (rows["u-1"].channel, rows["u-1"].event_type, rows["u-1"].content) == (
        "web", "Order Completed", "Great service!")
    assert rows["u-1"].metadata == {"text": "Great service!", "total": 5}
    assert (rows["anon-7"].event_type, rows["anon-7"].channel, rows["anon-7"].content) == (
        "page_view", "web", "Pricing")
    assert rows["u-2"].channel == "api"
    assert customers["u-1"].interaction_count == 1


def test_write_key_in_body_and_gzip(app, client, org):
    body = gzip.compress(json.dumps({"batch": [track("u-9")], "writeKey": org["ingestKey"]}).encode())
    response = client.post("/v1/batch", data=body, content_type="application/json",
                           headers={"Content-Encoding": "gzip"})
    assert response.status_code == 200 and response.get_json() == {"success": True}
    single = post(client, "/v1/track", {**track("u-9"), "writeKey": org["ingestKey"]}, {})
    assert single.status_code == 200
    with app.app_context():
        assert Interaction.select().count() == 2


def test_replayed_batch_stores_nothing_new(app, client, org):
    batch = {"batch": [track("u-%d" % (i % 3)) for i in range(10)]}
    for _ in range(3):
        assert post(client, "/v1/batch", batch, basic(org["ingestKey"])).status_code == 200
    with app.app_context():
        assert Interaction.select().count() == 10
        assert sum(c.interaction_count for c in Customer.select()) == 10


def test_clock_skew_is_corrected(app, client, org):
    skew = datetime.timedelta(hours=3)  # the sender's clock runs 3 h fast
    now = datetime.datetime.now(UTC)
    event = track("u-skew", timestamp=(now + skew - datetime.timedelta(minutes=10)).isoformat())
    response = post(client, "/v1/batch", {"batch": [event], "sentAt": (now + skew).isoformat()},
                    basic(org["ingestKey"]))
    assert response.status_code == 200
    with app.app_context():
        stored = Interaction.get().timestamp.replace(tzinfo=UTC)
    assert abs(stored - (now - datetime.timedelta(minutes=10))) < datetime.timedelta(seconds=5)


def test_bad_events_are_reported_and_never_fail_the_rest(app, client, org):
    batch = {"batch": [
        track("u-1"),
        {"type": "alias", "userId": "u-1", "previousId": "x", "messageId": "m-alias"},
        track(None, anonymousId=None, messageId="m-nouser"),
        track("u-1", event="", messageId="m-noevent"),
        "not an event",
        track("u-1", properties=[1, 2], messageId="m-props"),
        track("u-1"),
    ]}
    response = post(client, "/v1/batch", batch, basic(org["ingestKey"]))
    body = response.get_json()
    assert response.status_code == 200 and body["success"] is True
    assert [(p["index"], p["messageId"]) for p in body["errors"]] == [
        (1, "m-alias"), (2, "m-nouser"), (3, "m-noevent"), (4, None), (5, "m-props")]
    assert "eventType" in body["errors"][2]["details"]
    with app.app_context():
        assert Interaction.select().count() == 2


def test_a_user_id_is_checked_as_a_customer_external_id_and_named(app, client, org):
    """Segment's userId becomes the customer's externalId, by the same field rules
    (1-255 characters of text a database can hold), and a problem names userId."""
    batch = {"batch": [track("x" * 256, messageId="long"), track("nul\x00", messageId="nul"),
                       track("x" * 255, messageId="longest")]}
    body = post(client, "/v1/batch", batch, basic(org["ingestKey"])).get_json()
    assert body["success"] is True
    assert [(p["messageId"], list(p["details"])) for p in body["errors"]] == [("long", ["userId"]),
                                                                              ("nul", ["userId"])]
    with app.app_context():
        assert Interaction.select().count() == 1


@pytest.mark.parametrize("body", [{"batch": []}, {"batch": "x"}, {}, [1]])
def test_invalid_envelope_is_400(client, org, body):
    response = post(client, "/v1/batch", body, basic(org["ingestKey"]))
    assert response.status_code == 400 and response.get_json()["error"] == "validation_error"


def test_bad_write_key_is_401(client, customer_id):
    assert post(client, "/v1/batch", {"batch": [track("u")]}, basic("ik_wrong")).status_code == 401
    for key in ("nope", 42, ["k"], None, "\ud800"):
        assert post(client, "/v1/batch", {"batch": [track("u")], "writeKey": key}, {}).status_code == 401
    assert post(client, "/v1/batch", {"batch": [track("u")]}, {}).status_code == 401


def test_absurd_clock_skew_is_a_problem_of_that_event_only(app, client, org):
    batch = {"batch": [track("u", timestamp="0001-01-01T00:00:00Z", messageId="ancient"),
                       track("u", timestamp=None)],
             "sentAt": "9999-12-31T23:59:59Z"}
    body = post(client, "/v1/batch", batch, basic(org["ingestKey"])).get_json()
    assert body["success"] is True and [p["messageId"] for p in body["errors"]] == ["ancient"]


def test_storage_failure_asks_the_client_to_retry(client, org, storage_faults):
    event = track("u-1", properties={"content": storage_faults.FAIL_INSERT}, messageId="m-1")
    response = post(client, "/v1/batch", {"batch": [event]}, basic(org["ingestKey"]))
    assert response.status_code == 503 and response.headers["Retry-After"]
    [problem] = response.get_json()["details"]["errors"]
    assert (problem["index"], problem["error"], problem["messageId"]) == (0, "storage_error", "m-1")


@pytest.fixture(scope="module")
def gunicorn(tmp_path_factory):
    """gunicorn with 2 workers, for the module (each test has its own organization)."""
    web = Gunicorn(tmp_path_factory.mktemp("gunicorn") / "web.log", workers=2)
    yield web
    web.stop()


def test_official_client_delivers_every_event_exactly_once(app, gunicorn, org):
    errors = []
    analytics = Client(org["ingestKey"], host=gunicorn.url, gzip=True, max_retries=3,
                       on_error=lambda error, batch: errors.append(error), upload_size=100)
    users = ["user-%d" % n for n in range(20)]
    for user in users:
        analytics.identify(user, {"name": user.title(), "plan": "trial"})
    sent = []
    for n in range(1000):
        message_id = "track-%d" % n
        analytics.track(users[n % 20], "Clicked", {"n": n, "text": "nice"}, message_id=message_id)
        sent.append(message_id)
    analytics.flush()
    analytics.join()
    assert errors == []
    with app.app_context():
        stored = [row[0] for row in Interaction.select(Interaction.message_id).tuples()]
        customers = {c.external_id: c for c in Customer.select()}
    assert sorted(stored) == sorted(sent)
    assert set(customers) == set(users)
    assert all(c.interaction_count == 50 and c.traits["plan"] == "trial" for c in customers.values())
    assert customers["user-3"].name == "User-3"


def test_official_library_replay_and_clock_skew_over_http(app, gunicorn, org):
    """The library's own request function: a retried (replayed) batch stores nothing
    new; a batch from a clock 2 h fast lands at the corrected time."""
    from segment.analytics.request import post as segment_post

    batch = [track("replayed-%d" % (n % 2)) for n in range(5)]
    for _ in range(2):
        assert segment_post(org["ingestKey"], host=gunicorn.url, gzip=True, batch=batch).status_code == 200
    now = datetime.datetime.now(UTC)
    fast = now + datetime.timedelta(hours=2)
    skewed = track("skewed", timestamp=(fast - datetime.timedelta(minutes=30)).isoformat())
    assert segment_post(org["ingestKey"], host=gunicorn.url, gzip=True, batch=[skewed],
                        sentAt=fast.isoformat()).status_code == 200
    with app.app_context():
        assert Interaction.select().count() == 6
        landed = (Interaction.select().join(Customer)
                  .where(Customer.external_id == "skewed").get().timestamp.replace(tzinfo=UTC))
    assert abs(landed - (now - datetime.timedelta(minutes=30))) < datetime.timedelta(seconds=5)
