"""Segment events racing the erasure of their customer (DESIGN §9, §15), each
reproduced here first (hardening round 3): an identify or a track whose customer
is erased while it is in flight is refused as ``customer_erased``, never a 500;
an event not after the erasure never brings the customer back, under any
interleaving; a messageId that is not a string of 1-128 characters is refused."""
import datetime
import os
import threading
import uuid

import psycopg
import pytest
import requests

from ingest import lifecycle
from models import Customer, Interaction, db
from tests.dbs import is_postgres_url
from tests.helpers import UTC, bearer, hours_ago, iso, make_customer
from tests.servers import Gunicorn, wait_until
from tests.test_hardening import writes_blocked


def segment(client, org, event):
    return client.post("/v1/batch", json={"batch": [event]}, auth=(org["ingestKey"], ""))


def event(kind, user, when, **fields):
    body = {"track": {"event": "Clicked", "properties": {"text": "hi"}},
            "identify": {"traits": {"plan": "pro"}}}[kind]
    return {"type": kind, "userId": user, "timestamp": iso(when), "messageId": str(uuid.uuid4()),
            **body, **fields}


def problems(response):
    assert response.status_code == 200, response.get_data(as_text=True)
    return [(p["index"], p["error"], p.get("messageId")) for p in response.get_json().get("errors", [])]


# A message id must be what Segment's libraries send: a string (DESIGN §5: 1-128 characters).

@pytest.mark.parametrize("message_id", [{"a": 1}, ["m-1"], 7, 1.5, True, "", "x" * 129])
@pytest.mark.parametrize("kind", ["track", "identify"])
def test_a_message_id_that_is_not_a_short_string_is_refused_and_nothing_stored(app, client, org, kind,
                                                                              message_id):
    good = event(kind, "good", hours_ago(1))
    response = client.post("/v1/batch", auth=(org["ingestKey"], ""), json={"batch": [
        event(kind, "bad", hours_ago(1), messageId=message_id), good]})
    [problem] = response.get_json()["errors"]
    assert (response.status_code, problem["index"], problem["error"]) == (200, 0, "validation_error")
    assert list(problem["details"]) == ["messageId"]
    with app.app_context():
        assert [c.external_id for c in Customer.select()] == ["good"]
        assert [i.message_id for i in Interaction.select()] == ([good["messageId"]] if kind == "track" else [])


# Interleavings made certain with locks: a transaction is held open, the
# requests to race are queued behind it, each seen waiting before the next is
# sent, then the transaction ends.

def in_line():
    """How many of the app's transactions are held up by a lock: on PostgreSQL those
    waiting for one; on SQLite the holder and the waiters of the writers' flock
    (models.QueuedWritersSqliteDatabase), read from /proc/locks (Linux)."""
    url = os.environ["DATABASE_URL"]
    if is_postgres_url(url):
        with psycopg.connect(url, autocommit=True) as conn:
            return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                "AND wait_event_type = 'Lock'").fetchone()[0]
    inode = os.stat(url[len("sqlite:///"):] + "-writers.lock").st_ino
    with open("/proc/locks") as locks:
        return sum(1 for line in locks
                   if "FLOCK" in line and line.replace("->", "").split()[5].endswith(":%d" % inode))


def one_after_another(*functions):
    """Start each function in a thread once the one before it waits in line;
    returns the threads."""
    threads = []
    for function in functions:
        waiting = in_line()
        threads.append(threading.Thread(target=function))
        threads[-1].start()
        wait_until(lambda: in_line() > waiting, message="%s to wait in line" % function.__name__)
    return threads


@pytest.mark.parametrize("kind", ["identify", "track"])
def test_an_event_whose_customer_is_erased_in_flight_is_refused_as_erased(app, org, kind):
    """The erasure, its customer locked, waits for another client's lock on the
    interactions (SQLite: the write lock), the event waits for the erasure: the
    erasure commits between the event's lookup of the customer and its write."""
    customer_id = make_customer(app, org, external_id="in-flight")
    answers = {}

    def erase():
        answers["erase"] = app.test_client().delete("/api/customers/" + customer_id,
                                                    headers=bearer(org["ingestKey"]))

    def send():
        answers["event"] = segment(app.test_client(), org, event(kind, "in-flight", hours_ago(1),
                                                                  messageId="m-1"))

    with writes_blocked():
        threads = one_after_another(erase, send)
    for thread in threads:
        thread.join()
    assert answers["erase"].status_code == 204
    assert problems(answers["event"]) == [(0, "customer_erased", "m-1")]
    with app.app_context():
        assert not Customer.select().exists() and not Interaction.select().exists()


@pytest.mark.parametrize("kind", ["identify", "track"])
def test_an_erasure_that_commits_while_an_older_event_waits_to_create_its_customer_wins(app, org, kind):
    """The event finds no customer and no erasure of its user; before it creates the
    customer, one is created (for a newer event, say) and erased, in one transaction
    that commits once the event waits for it. The event, older than that erasure, is
    refused and creates nothing."""
    organization, answers, held, go = org["organizationId"], {}, threading.Event(), threading.Event()

    def create_and_erase():
        with app.app_context(), db.atomic():
            lifecycle.erase_customer(organization, Customer.create(organization=organization,
                                                                   external_id="late").id)
            held.set()
            go.wait()

    def send():
        answers["event"] = segment(app.test_client(), org, event(kind, "late", hours_ago(1), messageId="m-1"))

    holder = threading.Thread(target=create_and_erase)
    holder.start()
    try:
        assert held.wait(20)
        [sender] = one_after_another(send)
    finally:
        go.set()
        holder.join()
    sender.join()
    assert problems(answers["event"]) == [(0, "customer_erased", "m-1")]
    with app.app_context():
        assert not Customer.select().exists() and not Interaction.select().exists()


# The same races with real concurrency, over HTTP: threads send Segment events
# for a user while another thread erases its customer.

@pytest.fixture(scope="module")
def gunicorn(tmp_path_factory):
    web = Gunicorn(tmp_path_factory.mktemp("gunicorn") / "web.log", workers=2)
    yield web
    web.stop()


ROUNDS = 60
SENDERS = 4  # per round, half of them identify, half track
AFTER = 2  # events each sender sends once the erasure has answered


def race(url, org, user, when, erase):
    """One round: SENDERS threads send events of time ``when`` for ``user`` until
    ``erase()`` (its status) has erased the user's customer, and AFTER more each;
    returns what went wrong: any answer but a 200 whose problems are `customer_erased`."""
    start, erased, wrong = threading.Barrier(SENDERS + 1), threading.Event(), []

    def send(kind):
        with requests.Session() as session:
            start.wait()
            left = AFTER
            while left:
                left -= erased.is_set()
                response = session.post(url + "/v1/batch", auth=(org["ingestKey"], ""),
                                        json={"batch": [event(kind, user, when)]})
                refused = {p["error"] for p in response.json().get("errors", [])} if response.ok else set()
                if response.status_code != 200 or not refused <= {"customer_erased"}:
                    wrong.append("%s: %d %s" % (kind, response.status_code, response.text[:200]))

    senders = [threading.Thread(target=send, args=(("identify", "track")[n % 2],)) for n in range(SENDERS)]
    for thread in senders:
        thread.start()
    start.wait()
    status = erase()
    erased.set()
    for thread in senders:
        thread.join()
    return wrong + (["erasure: %d" % status] if status != 204 else [])


def create(url, org, user):
    response = requests.post(url + "/api/customers", json={"externalId": user}, headers=bearer(org["ingestKey"]))
    return response.json()["id"]


def erase(url, org, customer_id):
    return requests.delete(url + "/api/customers/" + customer_id, headers=bearer(org["ingestKey"])).status_code


def found(url, org, user):
    """The id of ``user``'s customer, or None."""
    items = requests.get(url + "/api/customers", params={"externalId": user},
                         headers=bearer(org["readKey"])).json()["items"]
    return items[0]["id"] if items else None


def assert_rounds(app, users, wrong):
    """Every round answered right and left no customer: all its events were older
    than its erasure."""
    with app.app_context():
        back = {c.external_id for c in Customer.select().where(Customer.external_id.in_(users))}
    failed = {user: answers for user, answers in wrong.items() if answers or user in back}
    assert not failed, "%d of %d rounds failed; recreated: %s; %s" % (
        len(failed), len(users), sorted(back), {user: answers[:3] for user, answers in failed.items()})


def test_events_older_than_the_erasure_never_bring_the_customer_back(app, gunicorn, org):
    """ROUNDS rounds of `race` for a customer that exists, with events from before
    the round: once the erasure has answered, no customer of that external id may
    exist, whatever the interleaving."""
    users, before = ["racer-%d" % n for n in range(ROUNDS)], hours_ago(1)
    assert_rounds(app, users, {user: race(gunicorn.url, org, user, before, lambda user=user: erase(
        gunicorn.url, org, create(gunicorn.url, org, user))) for user in users})


def test_events_newer_than_an_erasure_create_the_customer_anew_and_the_next_erasure_holds(app, gunicorn, org):
    """Rounds of `race` for a user erased just before: its events, newer than that
    erasure, create it anew (in the transaction that locks its external id), and
    the eraser erases the new customer as soon as it appears; all the events are
    older than this second erasure, so after it no customer may exist."""
    users = ["churn-%d" % n for n in range(ROUNDS // 2)]
    wrong = {}
    for user in users:
        assert erase(gunicorn.url, org, create(gunicorn.url, org, user)) == 204
        after = datetime.datetime.now(UTC)
        wrong[user] = race(gunicorn.url, org, user, after, lambda user=user: erase(gunicorn.url, org, wait_until(
            lambda: found(gunicorn.url, org, user), interval=0.001, message="the customer created anew")))
    assert_rounds(app, users, wrong)
