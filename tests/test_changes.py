"""GET /api/changes (DESIGN §16), in process: every stored interaction, analysis and
erasure once, in position order, with the data the socket carries; opaque cursors
refused when forged or foreign; retention answered 410, never skipped."""
import base64
import datetime
import threading

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest import analysis, changes, lifecycle
from models import Change, utcnow
from tests.helpers import bearer, interaction, make_customer, make_organization


def page(client, org, **params):
    response = client.get("/api/changes", query_string=params, headers=bearer(org["readKey"]))
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def follow(client, org, after=None, limit=1000):
    """Every change after ``after``, page by page; (items, the cursor to ask after next)."""
    items = []
    while True:
        body = page(client, org, limit=limit, **({"after": after} if after else {}))
        items += body["items"]
        if not body["items"]:
            return items, body["nextCursor"]
        after = body["nextCursor"]


def test_every_change_once_in_order_with_the_sockets_data(app, client, service, org, customer_id):
    first, _ = service.ingest_one(org["organizationId"], interaction(customer_id, content="I love it",
                                                                 messageId="m-1"))
    duplicate, _ = service.ingest_one(org["organizationId"], interaction(customer_id, messageId="m-1"))
    batch = service.ingest_batch(org["organizationId"], {"interactions": [
        interaction(customer_id, content="one"), interaction(customer_id, messageId="m-1"),
        interaction(customer_id, channel="fax"), interaction(customer_id, content="two")]})
    stored = [str(first)] + [str(i) for i in batch.ids if i is not None and str(i) != str(first)]
    with app.app_context():
        analysis.score_and_store(stored)
        lifecycle.erase_customer(org["organizationId"], make_customer(app, org))
    items, _ = follow(client, org, limit=2)
    kinds = [item["type"] for item in items]
    assert kinds == ["interaction.created"] * 3 + ["interaction.analyzed"] * 3 + ["customer.deleted"]
    assert [item["data"]["id"] for item in items[:3]] == stored  # item order within the batch
    created = client.get("/api/interactions/" + stored[0], headers=bearer(org["readKey"])).get_json()
    assert items[0]["data"] == {**created, "analysisStatus": "pending", "sentiment": None,
                                "analyzedAt": None}  # as the socket showed it when it was stored
    analyzed = {item["data"]["id"]: item["data"] for item in items[3:6]}
    assert set(analyzed) == set(stored)
    assert analyzed[stored[0]] == {"id": stored[0], "customerId": customer_id, "analysisStatus": "done",
                                   "sentiment": created["sentiment"]}
    positions = [changes.position_of(org["organizationId"], item["cursor"]) for item in items]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)


def test_resuming_after_any_cursor_gives_exactly_what_follows(client, service, org, customer_id):
    ids = [str(service.ingest_one(org["organizationId"], interaction(customer_id))[0]) for _ in range(7)]
    items, last = follow(client, org)
    for n, item in enumerate(items):
        rest, _ = follow(client, org, after=item["cursor"], limit=3)
        assert [i["data"]["id"] for i in rest] == ids[n + 1:]
    assert page(client, org, after=last) == {"items": [], "nextCursor": last}  # poll again later
    more = str(service.ingest_one(org["organizationId"], interaction(customer_id))[0])
    assert [i["data"]["id"] for i in follow(client, org, after=last)[0]] == [more]


def test_an_erased_customers_interactions_leave_the_feed_and_its_erasure_enters_it(app, client, service,
                                                                                     org, customer_id):
    kept, _ = service.ingest_one(org["organizationId"], interaction(make_customer(app, org)))
    service.ingest_one(org["organizationId"], interaction(customer_id, content="private"))
    service.erase_customer(org["organizationId"], customer_id)
    items, _ = follow(client, org)
    assert [(i["type"], i["data"]["id"]) for i in items] == [
        ("interaction.created", str(kept)), ("customer.deleted", customer_id)]


def test_another_organizations_cursor_or_a_forged_one_is_a_400_naming_after(app, client, service, org,
                                                                             customer_id):
    service.ingest_one(org["organizationId"], interaction(customer_id))
    theirs = page(client, org)["nextCursor"]
    other = make_organization(app, "Other")
    for cursor in (theirs, theirs[:-2] + "AA", "x", base64.urlsafe_b64encode(b"\0" * 16).decode()):
        response = client.get("/api/changes", query_string={"after": cursor}, headers=bearer(other["readKey"]))
        assert response.status_code == 400 and "after" in response.get_json()["details"], cursor
    for limit in (0, 1001, "x"):
        response = client.get("/api/changes", query_string={"limit": limit}, headers=bearer(org["readKey"]))
        assert response.status_code == 400 and "limit" in response.get_json()["details"]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40) | st.binary(max_size=20).map(lambda b: base64.urlsafe_b64encode(b).decode()))
def test_any_after_is_a_page_or_a_400_naming_it(client, org, text):
    response = client.get("/api/changes", query_string={"after": text}, headers=bearer(org["readKey"]))
    assert response.status_code in (200, 400), response.get_data(as_text=True)
    if response.status_code == 400:
        assert "after" in response.get_json()["details"]


def test_retention_answers_410_with_the_oldest_cursor_never_a_silent_skip(app, client, service, org,
                                                                          customer_id):
    old = [service.ingest_one(org["organizationId"], interaction(customer_id))[0] for _ in range(3)]
    start, _ = follow(client, org)
    with app.app_context():
        Change.update(recorded_at=utcnow() - datetime.timedelta(days=40)).execute()
    new = str(service.ingest_one(org["organizationId"], interaction(customer_id))[0])
    with app.app_context():
        assert changes.prune(utcnow() - datetime.timedelta(days=30)) == len(old)
        assert Change.select().count() == len(old) + 1  # out of reach, their rows still there
        assert changes.reclaim(None, 10) == len(old) and Change.select().count() == 1
    for cursor in (start[0]["cursor"], start[1]["cursor"]):
        response = client.get("/api/changes", query_string={"after": cursor}, headers=bearer(org["readKey"]))
        assert response.status_code == 410 and response.get_json()["error"] == "cursor_expired"
        oldest = response.get_json()["details"]["oldestCursor"]
    assert [i["data"]["id"] for i in follow(client, org, after=oldest)[0]] == [new]
    assert [i["data"]["id"] for i in follow(client, org, after=start[2]["cursor"])[0]] == [new]
    assert [i["data"]["id"] for i in follow(client, org)[0]] == [new]  # no cursor: from the oldest kept


def test_concurrent_writers_never_commit_a_smaller_position_after_a_larger_one_is_seen(
        app, client, service, org, customer_id):
    """8 threads ingest while a reader follows the feed: what it read once never grows
    a change before its cursor (an earlier read would have missed it)."""
    stop, seen = threading.Event(), []

    def write():
        while not stop.is_set():
            service.ingest_one(org["organizationId"], interaction(customer_id))

    writers = [threading.Thread(target=write) for _ in range(8)]
    for writer in writers:
        writer.start()
    after = None
    try:
        for _ in range(60):
            body = page(client, org, limit=50, **({"after": after} if after else {}))
            seen += [item["data"]["id"] for item in body["items"]]
            after = body["nextCursor"]
    finally:
        stop.set()
        for writer in writers:
            writer.join()
    seen += [item["data"]["id"] for item in follow(client, org, after=after)[0]]
    everything = [item["data"]["id"] for item in follow(client, org)[0]]
    assert seen == everything and len(set(seen)) == len(seen)
