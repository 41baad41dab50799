"""What an adversarial probe found (hardening round 2), each reproduced here first:
crafted cursors, Segment batches of any shape, chunked bodies over the limit, concurrent Segment identifies,
Segment events that are refused, honest answers when a commit times out."""
import base64
import contextlib
import datetime
import json
import os
import sqlite3
import threading
import time
import uuid

import psycopg
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models import Customer, Interaction
from tests.dbs import is_postgres_url
from tests.helpers import bearer, interaction, make_customer, make_organization, post_interaction
from tests.servers import Gunicorn, wait_until


def json_like(floats):
    return st.recursive(
        st.none() | st.booleans() | st.integers() | floats | st.text(max_size=40),
        lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
        max_leaves=8)


json_documents = json_like(st.floats(allow_nan=False))  # Infinity too: a cursor is decoded by us


def as_cursor(raw):
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


cursors = st.one_of(
    json_documents.map(lambda doc: as_cursor(json.dumps(doc).encode())),
    st.tuples(json_documents, json_documents).map(lambda pair: as_cursor(json.dumps(list(pair)).encode())),
    st.integers(1, 5000).map(lambda depth: as_cursor(b"[" * depth + b"]" * depth)),
    st.binary(max_size=60).map(as_cursor),
    st.text(max_size=60),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cursor=cursors)
def test_any_cursor_is_a_page_or_a_400_naming_it(client, org, cursor):
    response = client.get("/api/interactions", query_string={"cursor": cursor},
                          headers=bearer(org["readKey"]))
    assert response.status_code in (200, 400), response.get_data(as_text=True)
    if response.status_code == 400:
        assert "cursor" in response.get_json()["details"]


def segment_events():
    """Segment events as a client could send them: every field valid, missing, of
    the wrong type or out of bounds."""
    anything = json_like(st.floats(allow_nan=False, allow_infinity=False))
    return st.fixed_dictionaries({}, optional={
        "type": st.sampled_from(["track", "page", "identify", "alias", "", 7]),
        "userId": st.one_of(st.text(max_size=12), st.text(min_size=256, max_size=260), anything),
        "anonymousId": st.one_of(st.text(max_size=12), anything),
        "event": st.one_of(st.text(max_size=120), anything),
        "properties": st.one_of(st.dictionaries(st.sampled_from(["content", "text", "title", "n"]),
                                                anything, max_size=3), anything),
        "traits": st.one_of(st.dictionaries(st.sampled_from(["name", "email", "plan"]), anything,
                                            max_size=3), anything),
        "context": st.one_of(st.fixed_dictionaries({"channel": st.sampled_from(
            ["browser", "mobile", "server", "fax", 3])}), anything),
        "timestamp": st.one_of(st.datetimes(timezones=st.just(datetime.timezone.utc)).map(
            datetime.datetime.isoformat), anything),
        "messageId": st.one_of(st.just("unique"), st.text(min_size=129, max_size=130), anything),
    })


def tagged(event, tag, index):
    """The event with its user ids and a "unique" messageId made this example's own."""
    event = dict(event)
    for field in ("userId", "anonymousId"):
        if isinstance(event.get(field), str) and event[field]:
            event[field] = tag + event[field]
    if event.get("messageId") == "unique":
        event["messageId"] = "%s-%d" % (tag, index)
    return event


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=st.lists(segment_events(), min_size=1, max_size=6))
def test_any_segment_batch_is_200_and_creates_only_the_customers_of_stored_events(app, client, org,
                                                                                 events):
    tag = "%s:" % uuid.uuid4().hex[:8]
    events = [tagged(event, tag, index) for index, event in enumerate(events)]
    response = client.post("/v1/batch", json={"batch": events}, auth=(org["ingestKey"], ""))
    assert response.status_code == 200, response.get_data(as_text=True)
    refused = {problem["index"] for problem in response.get_json().get("errors", [])}
    expected = {str(event.get("userId") or event.get("anonymousId"))
                for index, event in enumerate(events) if index not in refused}
    with app.app_context():
        created = {customer.external_id for customer in
                   Customer.select().where(Customer.external_id.startswith(tag))}
    assert created == {user for user in expected if user.startswith(tag)}


@pytest.fixture(scope="module")
def single_worker_gunicorn(tmp_path_factory):
    gunicorn = Gunicorn(tmp_path_factory.mktemp("gunicorn") / "server.log", workers=1)
    yield gunicorn
    gunicorn.stop()


def chunks(data, size=65536):
    for start in range(0, len(data), size):
        yield data[start:start + size]


def test_a_chunked_body_over_the_limit_is_413_like_any_other(single_worker_gunicorn, org, customer_id):
    body = json.dumps({"interactions": [interaction(customer_id, content="x" * 9000)] * 150}).encode()
    assert len(body) > 1024 * 1024
    headers = {**bearer(org["ingestKey"]), "Content-Type": "application/json"}
    sized = requests.post(single_worker_gunicorn.url + "/api/data/ingest/batch", data=body, headers=headers)
    chunked = requests.post(single_worker_gunicorn.url + "/api/data/ingest/batch", data=chunks(body), headers=headers)
    assert (sized.status_code, chunked.status_code) == (413, 413)
    assert sized.json()["error"] == chunked.json()["error"] == "payload_too_large"


def segment(single_worker_gunicorn, org, event):
    return requests.post(single_worker_gunicorn.url + "/v1/batch", json={"batch": [event]},
                         auth=(org["ingestKey"], ""))


def test_concurrent_identifies_of_one_user_keep_every_trait(app, single_worker_gunicorn, org):
    """40 identifies of one user at once, each with its own trait: all 40 stay."""
    assert segment(single_worker_gunicorn, org, {"type": "identify", "userId": "u-1", "traits": {}}).ok
    threads = [threading.Thread(target=segment, args=(single_worker_gunicorn, org, {
        "type": "identify", "userId": "u-1", "traits": {"trait%d" % n: n}})) for n in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with app.app_context():
        customer = Customer.get(Customer.external_id == "u-1")
    assert customer.traits == {"trait%d" % n: n for n in range(40)}


def test_a_refused_segment_event_creates_no_customer(app, single_worker_gunicorn, org):
    response = segment(single_worker_gunicorn, org, {"type": "track", "userId": "ghost", "event": "x" * 101})
    assert response.status_code == 200 and response.json()["errors"][0]["index"] == 0
    with app.app_context():
        assert not Customer.select().where(Customer.external_id == "ghost").exists()


@contextlib.contextmanager
def writes_blocked():
    """Another client holds the interaction table's write lock meanwhile."""
    url = os.environ["DATABASE_URL"]
    if is_postgres_url(url):
        with psycopg.connect(url) as conn:
            conn.execute("LOCK TABLE interaction IN EXCLUSIVE MODE")
            yield
            conn.rollback()
    else:
        conn = sqlite3.connect(url[len("sqlite:///"):], isolation_level=None, timeout=30)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()


def test_a_commit_that_times_out_is_answered_honestly(make_app, org, customer_id):
    """With the database stuck, the request whose commit had begun is told its
    outcome is unknown (retry only with its messageId), and the one still waiting
    is withdrawn and told it was not stored; both are true once the database
    moves again."""
    app = make_app({"TESTING": True, "COMMIT_TIMEOUT": 1})
    answers = {}

    def post(message_id):
        response = post_interaction(app.test_client(), org["ingestKey"], customer_id, messageId=message_id)
        answers[message_id] = response

    with writes_blocked():
        first = threading.Thread(target=post, args=("in-flight",))
        first.start()
        time.sleep(0.3)  # its commit has begun, and waits on the lock
        second = threading.Thread(target=post, args=("queued",))
        second.start()
        first.join()
        second.join()
    unknown, withdrawn = answers["in-flight"], answers["queued"]
    assert (unknown.status_code, unknown.json["error"]) == (503, "commit_outcome_unknown")
    assert "messageId" in unknown.json["message"] and unknown.headers["Retry-After"]
    assert (withdrawn.status_code, withdrawn.json["error"]) == (503, "storage_error")
    assert withdrawn.json["details"]["stored"] is False

    def stored(message_id):
        with app.app_context():
            return Interaction.select().where(Interaction.message_id == message_id).count()
    wait_until(lambda: stored("in-flight") == 1, message="the in-flight commit to land")
    assert stored("queued") == 0
    retry = post_interaction(app.test_client(), org["ingestKey"], customer_id, messageId="in-flight")
    assert retry.status_code == 200 and retry.json["duplicate"] is True


def test_the_group_commit_serves_organizations_in_turn(app, service, org, customer_id):
    """One organization's 3,000 queued items do not hold back another's single
    ingest: the writer takes each organization's jobs in turn."""
    other = make_organization(app, "Other")
    other_customer = make_customer(app, other)
    finished = []

    def heavy():
        service.ingest_batch(org["organizationId"], {"interactions": [
            interaction(customer_id, content="bulk %d" % n) for n in range(1000)]})
        finished.append("heavy")

    def light():
        service.ingest_one(other["organizationId"], interaction(other_customer))
        finished.append("light")

    with writes_blocked():
        threads = [threading.Thread(target=heavy) for _ in range(3)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)  # their 30 chunks are queued behind the blocked writer
        threads.append(threading.Thread(target=light))
        threads[-1].start()
        time.sleep(0.2)
    for thread in threads:
        thread.join()
    # (The writer had taken the first 500 items before the light one came; it goes
    # in the next group, with the rest of the first heavy request.)
    assert finished.index("light") <= 1, finished
