"""Reads from a streaming replica (DESIGN §18), PostgreSQL only.

The module makes a primary and a streaming replica of its own (tests/postgres.py)
and points the app at them:
DATABASE_URL the primary, DATABASE_READ_URL the replica. Pausing the replica's
replay (``pg_wal_replay_pause``) shows which database answered: what was written
meanwhile is on the primary only. Each test has its own organization.
"""
import contextlib
import os

import psycopg
import psycopg.sql
import pytest

import models
from ingest import changes, replica, runtime
from tests import dbs
from tests.feed_client import LocalSocket
from tests.helpers import bearer, json_log, make_customer, make_organization, post_interaction
from tests.postgres import Postgres
from tests.servers import free_port, wait_until

pytestmark = pytest.mark.skipif(not dbs.is_postgres_url(os.environ["DATABASE_URL"]),
                                reason="PostgreSQL only: a streaming replica is one of a PostgreSQL primary "
                                       "(the PostgreSQL suite, DATABASE_URL=postgresql://..., runs it)")


@pytest.fixture(scope="module")
def replication():
    """(primary, replica): a primary with a database ``ingest`` and a replica streaming
    from it; both stopped and removed after the module, whatever happened."""
    try:
        with contextlib.ExitStack() as made:
            primary = Postgres(free_port())
            made.callback(primary.remove)
            standby = Postgres(free_port(), primary=primary)
            made.callback(standby.remove)
            yield primary, standby
    finally:
        # Leave the process as the other modules expect it: the run's database, no replica.
        models.db.initialize(models.make_database(os.environ["DATABASE_URL"]))
        replica.bind(None)


@pytest.fixture
def app(replication, make_app):
    """The app on the module's primary (migrated) with reads on its replica."""
    primary, standby = replication
    app = make_app({"TESTING": True, "DATABASE_URL": primary.url(), "DATABASE_READ_URL": standby.url()})
    with app.app_context():
        models.migrate()
    return app


@pytest.fixture
def org(app, replication):
    """An organization whose keys the replica knows already."""
    made = make_organization(app, "Acme")
    caught_up(*replication)
    return made


@pytest.fixture
def replica_log():
    """The ingest.replica logger's lines, as the JSON logs carry them."""
    with json_log("ingest.replica") as lines:
        yield lines


def caught_up(primary, standby):
    """Wait until the replica replayed all the primary wrote so far."""
    written = primary.value("SELECT pg_current_wal_lsn()::text")
    wait_until(lambda: standby.value("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", written), timeout=60,
               message="the replica to replay up to %s" % written)


@contextlib.contextmanager
def replay_paused(standby):
    """The replica's replay paused for the block (it still receives the WAL)."""
    standby.sql("SELECT pg_wal_replay_pause()")
    try:
        wait_until(lambda: standby.value("SELECT pg_get_wal_replay_pause_state()") == "paused",
                   message="the replica's replay to pause")
        yield
    finally:
        standby.sql("SELECT pg_wal_replay_resume()")


def stored(client, org, customer_id, **fields):
    response = post_interaction(client, org["ingestKey"], customer_id, **fields)
    assert response.status_code == 201, response.get_json()
    return response.get_json()["id"]


def listed(client, org):
    response = client.get("/api/interactions", headers=bearer(org["readKey"]))
    assert response.status_code == 200, response.get_json()
    return {item["id"] for item in response.get_json()["items"]}


def changes_page(client, org, after=None):
    response = client.get("/api/changes", query_string={"after": after} if after else {},
                          headers=bearer(org["readKey"]))
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def positions(org, items):
    return [changes.position_of(org["organizationId"], item["cursor"]) for item in items]


def test_reads_come_from_the_replica_and_ingest_answers_from_the_primary(app, client, org, replication):
    customer_id = make_customer(app, org, external_id="c-1")
    first = stored(client, org, customer_id)
    caught_up(*replication)
    with replay_paused(replication[1]):
        late = stored(client, org, customer_id, messageId="m-late")
        again = post_interaction(client, org["ingestKey"], customer_id, messageId="m-late")
        assert again.status_code == 200 and again.get_json() == {"id": late, "duplicate": True}
        assert listed(client, org) == {first}  # the replica has not replayed it
        # ...but the id ingest answered is found at once: a miss on the replica is asked of the primary
        by_id = client.get("/api/interactions/" + late, headers=bearer(org["readKey"]))
        assert by_id.status_code == 200 and by_id.get_json()["id"] == late
        customer = client.get("/api/customers/" + customer_id, headers=bearer(org["readKey"])).get_json()
        assert customer["interactionCount"] == 1
        found = client.get("/api/customers", query_string={"externalId": "c-1"}, headers=bearer(org["readKey"]))
        assert [item["interactionCount"] for item in found.get_json()["items"]] == [1]
    wait_until(lambda: listed(client, org) == {first, late}, message="the interaction on the replica")
    customer = client.get("/api/customers/" + customer_id, headers=bearer(org["readKey"])).get_json()
    assert customer["interactionCount"] == 2


def test_a_key_created_while_the_replica_lags_works_at_once(app, client, replication):
    with replay_paused(replication[1]):
        org = make_organization(app, "New")  # its keys are on the primary only
        response = client.get("/api/interactions", headers=bearer(org["readKey"]))
        assert response.status_code == 200 and response.get_json()["items"] == []
        assert client.get("/api/interactions", headers=bearer(org["readKey"] + "x")).status_code == 401


def test_ingest_customer_creation_and_erasure_answer_from_the_primary_while_the_replica_lags(
        app, client, org, replication):
    headers = bearer(org["ingestKey"])
    with replay_paused(replication[1]):
        created = client.post("/api/customers", json={"externalId": "new"}, headers=headers)
        assert created.status_code == 201
        customer_id = created.get_json()["id"]
        existing = client.post("/api/customers", json={"externalId": "new"}, headers=headers)
        assert existing.status_code == 200 and existing.get_json()["id"] == customer_id
        stored(client, org, customer_id, messageId="m-1")
        assert client.delete("/api/customers/" + customer_id, headers=headers).status_code == 204
        assert client.delete("/api/customers/" + customer_id, headers=headers).status_code == 404
        gone = post_interaction(client, org["ingestKey"], customer_id)
        assert gone.status_code == 404 and gone.get_json()["error"] == "customer_not_found"
    caught_up(*replication)
    assert client.get("/api/customers/" + customer_id, headers=bearer(org["readKey"])).status_code == 404
    # (the created change is not shown: its interaction is gone, ingest/changes.py)
    assert [item["type"] for item in changes_page(client, org)["items"]] == ["customer.deleted"]


def test_the_change_feed_from_a_lagging_replica_is_a_prefix_and_what_follows_comes_from_the_primary(
        app, client, org, replication):
    customer_id = make_customer(app, org)
    before = [stored(client, org, customer_id) for _ in range(3)]
    caught_up(*replication)
    with replay_paused(replication[1]):
        during = [stored(client, org, customer_id) for _ in range(4)]
        prefix = changes_page(client, org)  # what the replica has: the first three, no hole
        assert [item["data"]["id"] for item in prefix["items"]] == before
        rest = changes_page(client, org, prefix["nextCursor"])  # the replica has nothing after it
        assert [item["data"]["id"] for item in rest["items"]] == during
        end = changes_page(client, org, rest["nextCursor"])
        assert end == {"items": [], "nextCursor": rest["nextCursor"]}
        walked = positions(org, prefix["items"] + rest["items"])
        assert walked == list(range(walked[0], walked[0] + 7))

        # Sockets resuming from a cursor the replica has (or has not) reached yet: what
        # follows it, in order, then live changes; nothing skipped, nothing twice.
        bus = runtime.of(app).bus
        behind = LocalSocket(bus, org["organizationId"], org["readKey"], after=walked[0])
        # ahead: a cursor seen live, not yet on the replica
        ahead = LocalSocket(bus, org["organizationId"], org["readKey"], after=walked[4])
        try:
            assert [behind.next()["data"]["id"] for _ in range(6)] == before[1:] + during
            assert [ahead.next()["data"]["id"] for _ in range(2)] == during[2:]
            live = stored(client, org, customer_id)
            assert behind.next()["data"]["id"] == live and ahead.next()["data"]["id"] == live
        finally:
            behind.close()
            ahead.close()
    caught_up(*replication)
    replayed = changes_page(client, org)["items"]
    assert [item["data"]["id"] for item in replayed] == before + during + [live]
    assert positions(org, replayed) == list(range(walked[0], walked[0] + 8))


def metric(text, name):
    """The value of an unlabelled sample in Prometheus text, or None if absent."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def test_readyz_and_metrics_report_the_lag_and_a_lagging_replica_keeps_the_service_ready(
        app, client, org, replication):
    primary, standby = replication
    customer_id = make_customer(app, org)
    with replay_paused(standby):
        stored(client, org, customer_id)
        wait_until(lambda: standby.value("SELECT pg_last_wal_receive_lsn() > pg_last_wal_replay_lsn()"),
                   message="the replica to receive what it does not replay")
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.get_json()["replica"]["status"] == "ok" and not ready.get_json()["replica"]["fallback"]
        assert ready.get_json()["replica"]["lagSeconds"] > 0
        scraped = client.get("/metrics").get_data(as_text=True)
        assert metric(scraped, "ingest_replica_lag_seconds") > 0
        assert metric(scraped, "ingest_replica_fallback") == 0
    wait_until(lambda: client.get("/readyz").get_json()["replica"]["lagSeconds"] == 0,
               message="the replica to catch up")
    assert metric(client.get("/metrics").get_data(as_text=True), "ingest_replica_lag_seconds") is not None


def test_a_replica_that_stopped_receiving_reports_its_lag_not_zero(app, client, org, replication):
    """Cut off from the primary, a replica has replayed all it received: its lag is the
    age of the last transaction it replayed, not 0."""
    primary, standby = replication
    stored(client, org, make_customer(app, org))
    caught_up(primary, standby)
    conninfo = standby.value("SHOW primary_conninfo")  # pg_basebackup -R's, in postgresql.auto.conf
    standby.sql("ALTER SYSTEM SET primary_conninfo = ''")
    standby.sql("SELECT pg_reload_conf()")
    try:
        wait_until(lambda: not standby.value("SELECT count(*) FROM pg_stat_wal_receiver"),
                   message="the replica to stop receiving")
        wait_until(lambda: (client.get("/readyz").get_json()["replica"]["lagSeconds"] or 0) > 0,
                   message="the lag of a replica that receives nothing")
    finally:
        standby.sql(psycopg.sql.SQL("ALTER SYSTEM SET primary_conninfo = {}").format(psycopg.sql.Literal(conninfo)))
        standby.sql("SELECT pg_reload_conf()")
    wait_until(lambda: client.get("/readyz").get_json()["replica"]["lagSeconds"] == 0,
               message="the replica streaming again")


def test_reads_go_to_the_primary_while_the_replica_is_down_and_back_once_it_returns(
        app, client, org, replication, replica_log, monkeypatch):
    monkeypatch.setattr(replica, "RETRY_SECONDS", 0.5)
    primary, standby = replication
    customer_id = make_customer(app, org)
    first = stored(client, org, customer_id)
    caught_up(primary, standby)
    assert listed(client, org) == {first}
    standby.stop()
    try:
        written = stored(client, org, customer_id)
        for _ in range(5):  # the replica is gone: these can only be the primary's answers
            assert listed(client, org) == {first, written}
        assert [item["data"]["id"] for item in changes_page(client, org)["items"]] == [first, written]
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.get_json()["replica"] == {"status": "down: reads go to the primary", "lagSeconds": None,
                                               "fallback": True}
        scraped = client.get("/metrics").get_data(as_text=True)
        assert metric(scraped, "ingest_replica_fallback") == 1
        assert metric(scraped, "ingest_replica_lag_seconds") is None
    finally:
        standby.start()
    wait_until(lambda: listed(client, org) and [line for line in replica_log() if line["level"] == "info"],
               timeout=60, message="reads to go back to the replica")
    lines = replica_log()
    assert [(line["level"], line["message"]) for line in lines] == [
        ("warning", "replica unreachable; reads go to the primary"),
        ("info", "replica reachable again; reads go to it")]
    assert "error" in lines[0] and lines[0]["retry_seconds"] == 0.5
    assert metric(client.get("/metrics").get_data(as_text=True), "ingest_replica_fallback") == 0
    caught_up(primary, standby)
    with replay_paused(standby):  # the replica answers again: what it has not replayed is not listed
        stored(client, org, customer_id)
        assert listed(client, org) == {first, written}
