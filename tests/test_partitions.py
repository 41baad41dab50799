"""Storage at scale (DESIGN §17) on PostgreSQL: interaction partitioned by month of
received_at, partitions made ahead, the default partition catching and reporting
what falls outside them, messageId idempotency exact across partitions, retention
dropping whole partitions while ingest goes on, a conversion of an existing table
that survives kill -9, and the hot statements touching only the partitions they
need. On SQLite the same commands answer that it keeps one table."""
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import uuid

import psycopg
import pytest
from playhouse.migrations import Runner

import models
import tasks
from ingest import analysis, changes, lifecycle, partitions, store
from ingest.domain import CREATED, DUPLICATE, NewInteraction
from models import Interaction, db, utcnow
from tests import dbs
from tests.helpers import interaction, make_customer
from tests.servers import ROOT, wait_until

postgres_only = pytest.mark.skipif(not dbs.is_postgres_url(os.environ["DATABASE_URL"]),
                                   reason="PostgreSQL only: SQLite keeps one table")


def item(org, customer_id, received_at, message_id=None, timestamp=None):
    return NewInteraction(organization_id=uuid.UUID(org["organizationId"]), customer_id=uuid.UUID(customer_id),
                          timestamp=timestamp or received_at, channel="chat", event_type="message",
                          content="hello", message_id=message_id, received_at=received_at)


def partition_of(interaction_id):
    return db.execute_sql("SELECT tableoid::regclass::text FROM interaction WHERE id = %s",
                          [str(interaction_id)]).fetchone()[0]


def month_start(moment, months_ahead=0):
    start = partitions.period_start(moment, "month")
    for _ in range(months_ahead):
        start = partitions.next_start(start, "month")
    return start


def test_sqlite_keeps_one_table_and_says_so(runner):
    if dbs.is_postgres_url(os.environ["DATABASE_URL"]):
        pytest.skip("SQLite only")
    status = json.loads(runner.invoke(args=["partitions", "status", "--json"]).output)
    assert status == {"partitioned": False, "state": "sqlite"}


@postgres_only
def test_partitions_are_made_ahead_and_ensure_is_idempotent(app, runner):
    status = json.loads(runner.invoke(args=["partitions", "status", "--json"]).output)
    assert status["partitioned"] and status["interval"] == "month" and status["defaultRows"] == 0
    assert datetime.datetime.fromisoformat(status["coveredUntil"]) >= month_start(utcnow(), partitions.AHEAD + 1)
    ahead = runner.invoke(args=["partitions", "ensure", "--ahead", str(partitions.AHEAD + 2)])
    assert ahead.exit_code == 0, ahead.output
    again = runner.invoke(args=["partitions", "ensure", "--ahead", str(partitions.AHEAD + 2)])
    assert again.exit_code == 0 and again.output == ""
    status = json.loads(runner.invoke(args=["partitions", "status", "--json"]).output)
    assert datetime.datetime.fromisoformat(status["coveredUntil"]) >= month_start(utcnow(), partitions.AHEAD + 3)
    since = utcnow() - datetime.timedelta(days=70)  # before an import of history
    history = runner.invoke(args=["partitions", "ensure", "--since", since.strftime("%Y-%m-%d")])
    assert history.exit_code == 0, history.output
    starts = {p["from"] for p in json.loads(runner.invoke(args=["partitions", "status", "--json"]).output)[
        "partitions"]}
    assert month_start(since).isoformat() in starts


def write(org, customer_id, received_at, message_id=None, known=None):
    """(status, id) of one interaction written by the group commit's write."""
    return store.write_group([[item(org, customer_id, received_at, message_id)]], known or store.KnownCustomers())[0][0]


@postgres_only
def test_a_write_right_after_midnight_lands_in_next_month_and_one_beyond_the_partitions_waits_in_the_default(
        app, client, org, customer_id):
    next_month = month_start(utcnow(), 1)
    far = month_start(utcnow(), 40)
    with app.app_context():
        _, last_of_month = write(org, customer_id, next_month - datetime.timedelta(microseconds=1))
        _, first_of_next = write(org, customer_id, next_month)
        _, beyond = write(org, customer_id, far + datetime.timedelta(hours=1))
        assert partition_of(last_of_month) == "interaction_p%s" % month_start(utcnow()).strftime("%Y%m%d")
        assert partition_of(first_of_next) == "interaction_p%s" % next_month.strftime("%Y%m%d")
        assert partition_of(beyond) == "interaction_default"
    assert "ingest_partition_default_rows 1.0" in client.get("/metrics").get_data(as_text=True)
    with app.app_context():
        assert partitions.report(utcnow())["default_rows"] == 1
        [(made, moved)] = [(p, n) for p, n in partitions.ensure("month", 0, far) if p.start == far]
        assert moved == 1 and partition_of(beyond) == made.name
        assert partitions.report(utcnow())["default_rows"] == 0


@postgres_only
def test_a_message_id_sent_twice_at_once_across_a_month_boundary_is_stored_once(app, org, customer_id):
    """The first writer's transaction holds its messageId uncommitted while the
    second, a microsecond into the next month's partition, sends the same one."""
    boundary = month_start(utcnow(), 1)
    known, outcome, started = store.KnownCustomers(), {}, threading.Event()

    def second():
        started.set()
        outcome["second"] = write(org, customer_id, boundary, "m-1", known)

    with app.app_context():
        with db.atomic():
            status, first = write(org, customer_id, boundary - datetime.timedelta(microseconds=1), "m-1", known)
            assert status == CREATED
            thread = threading.Thread(target=second)
            thread.start()
            started.wait()
            wait_until(lambda: _waiting_on_a_lock(), message="the second writer to wait for the first")
        thread.join(timeout=30)
        assert outcome["second"] == (DUPLICATE, first)
        assert Interaction.select().where(Interaction.message_id == "m-1").count() == 1
        assert partition_of(first) == "interaction_p%s" % month_start(utcnow()).strftime("%Y%m%d")


def _waiting_on_a_lock():
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                            "AND datname = current_database()").fetchone()[0] > 0


@postgres_only
def test_retention_drops_whole_partitions_while_ingest_goes_on(app, service, org):
    """Months-old rows, with their messageIds, in partitions of their own; live
    ingest for the same customers meanwhile. After: the old months' partitions are
    gone, every live row is there, the counters agree (§4), and an old messageId can
    be stored again (taking over its key, which the hourly reclaim deletes otherwise)."""
    customers = [make_customer(app, org) for _ in range(5)]
    old = utcnow() - datetime.timedelta(days=150)
    partitions.ensure("month", 2, old)
    written = store.write_group([[item(org, customers[n % 5], old + datetime.timedelta(days=n % 60, seconds=n),
                                       "old-%d" % n) for n in range(500)]], store.KnownCustomers())
    assert all(status == CREATED for status, _ in written[0])
    live, stop = [], threading.Event()

    def ingest():
        while not stop.is_set():
            live.append(service.ingest_one(org["organizationId"], interaction(customers[len(live) % 5]))[0])

    writer = threading.Thread(target=ingest)
    writer.start()
    try:
        wait_until(lambda: len(live) >= 20, message="live ingest to start")
        result = lifecycle.apply_retention(utcnow() - datetime.timedelta(days=30))
        wait_until(lambda: len(live) >= 40, message="live ingest to go on after retention")
    finally:
        stop.set()
        writer.join(timeout=30)
    assert result.partitions_dropped >= 2 and result.deleted == 500
    assert not [p for p in partitions.partitions() if p.end <= month_start(old, 2)]
    assert dbs.invariant_violations() == []
    assert {str(i) for (i,) in Interaction.select(Interaction.id).tuples()} == {str(i) for i in live}
    assert write(org, customers[0], utcnow(), "old-1")[0] == CREATED  # its key, left behind, taken over
    tasks.maintain_storage.call_local()  # the consumer's hourly task deletes the other keys left behind
    assert db.execute_sql("SELECT message_id FROM message_key WHERE message_id LIKE 'old-%%'").fetchall() == [
        ("old-1",)]


@postgres_only
def test_the_feed_and_analysis_look_each_row_up_in_its_own_partition_only(app, service, org, customer_id):
    last_month = month_start(utcnow()) - datetime.timedelta(days=3)
    partitions.ensure("month", 1, last_month)
    write(org, customer_id, last_month)
    new = [service.ingest_one(org["organizationId"], interaction(customer_id))[0] for _ in range(3)]
    current = "interaction_p%s" % month_start(utcnow()).strftime("%Y%m%d")
    plan = _analyze(changes.PAGE_POSTGRES, [changes.Change.organization_id.db_value(org["organizationId"]), 1, 1000])
    assert _scans(plan) == {current: 3}, _scans(plan)
    scored, _, _ = analysis.score(new)
    with db.atomic() as transaction:
        plan = _analyze(*analysis.store_statement(scored, None))
        transaction.rollback()
    assert set(_scans(plan)) == {current}, _scans(plan)


def _analyze(sql, params):
    return db.execute_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params).fetchone()[0][0]["Plan"]


def _scans(plan):
    """{partition: times it was read} of the scans of interaction's partitions that ran."""
    found = {}
    for node in [plan, *_descendants(plan)]:
        relation = node.get("Relation Name", "")
        if relation.startswith("interaction_") and node.get("Actual Loops", 0):
            found[relation] = found.get(relation, 0) + node["Actual Loops"]
    return found


def _descendants(node):
    for child in node.get("Plans", []):
        yield child
        yield from _descendants(child)


@postgres_only
@pytest.mark.processes
def test_a_conversion_killed_halfway_resumes_and_keeps_every_row_once(tmp_path):
    """An unpartitioned table of 30,000 rows (as before migration 0006 converted it);
    `flask migrate --chunk 200` killed -9 a third of the way; rows updated, deleted and
    inserted meanwhile; run again: the same rows, with those changes, once each."""
    url = dbs.create_scratch_database(os.environ["DATABASE_URL"], str(tmp_path))
    env = {**os.environ, "DATABASE_URL": url, "INSTANCE_PATH": str(tmp_path),
           "QUEUE_URL": "sqlite:///" + str(tmp_path / "queue.db")}
    database = models.make_database(url)
    try:
        Runner(database, os.path.join(ROOT, "migrations")).up()  # the schema, not the conversion
        with psycopg.connect(url, autocommit=True) as conn:
            _fill_unpartitioned(conn, 30_000)
            before = _rows(conn)
            migrate = subprocess.Popen([sys.executable, "-m", "flask", "--app", "app", "migrate", "--chunk", "200"],
                                       cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            wait_until(lambda: _copied(conn) >= 10_000, timeout=60, message="a third of the rows copied")
            with psycopg.connect(url) as holder:  # the next chunk waits for the progress row: kill it there
                holder.execute("SELECT 1 FROM partition_conversion WHERE id = 1 FOR UPDATE")
                migrate.send_signal(signal.SIGKILL)
                migrate.wait()
            assert 10_000 <= _copied(conn) < 30_000
            changed = _change_some(conn, before)
            run = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "migrate", "--chunk", "500"],
                                 cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, run.stderr
            assert conn.execute("SELECT relkind FROM pg_class WHERE relname = 'interaction'").fetchone()[0] == "p"
            assert _rows(conn) == changed
            assert conn.execute(dbs.INVARIANT_VIOLATIONS).fetchall() == []
            assert conn.execute("SELECT count(*) FROM interaction_default").fetchone()[0] == 0
    finally:
        database.close_all()
        dbs.drop_database(url)


def _fill_unpartitioned(conn, rows):
    org = conn.execute("INSERT INTO organization (id, name, created_at) VALUES (gen_random_uuid(), 'old', now()) "
                       "RETURNING id").fetchone()[0]
    conn.execute("INSERT INTO customer (id, organization_id, traits, created_at, interaction_count) "
                 "SELECT gen_random_uuid(), %s, '{}', now(), 0 FROM generate_series(1, 10)", [org])
    conn.execute(
        "INSERT INTO interaction (id, organization_id, customer_id, message_id, timestamp, received_at, channel, "
        "event_type, content, metadata, analysis_status) "
        "SELECT gen_random_uuid(), %s, (array_agg(c.id))[1 + n %% 10], 'm' || n, now() - make_interval(hours => n), "
        "now() - make_interval(hours => n), 'web', 'view', 'hi', '{}', 'pending' "
        "FROM generate_series(1, %s) AS n, customer AS c GROUP BY n", [org, rows])
    conn.execute("INSERT INTO message_key SELECT organization_id, message_id, id, received_at FROM interaction")
    conn.execute("UPDATE customer SET interaction_count = (SELECT count(*) FROM interaction AS i "
                 "WHERE i.customer_id = customer.id), last_seen_at = (SELECT max(timestamp) FROM interaction AS i "
                 "WHERE i.customer_id = customer.id)")


def _rows(conn):
    return {str(i): status for i, status in conn.execute("SELECT id, analysis_status FROM interaction")}


def _copied(conn):
    try:
        return conn.execute("SELECT count(*) FROM interaction_partitioned").fetchone()[0]
    except psycopg.errors.UndefinedTable:
        return 0


def _change_some(conn, rows):
    """Mark the oldest 100 rows (copied already) done, delete 100 others with their
    customers' counts, and add one; returns what the table should then hold."""
    expected = dict(rows)
    oldest = [str(i) for (i,) in conn.execute("SELECT id FROM interaction ORDER BY received_at LIMIT 200")]
    conn.execute("UPDATE interaction SET analysis_status = 'done' WHERE id = ANY(%s::uuid[])", [oldest[:100]])
    expected.update(dict.fromkeys(oldest[:100], "done"))
    with conn.transaction():
        gone = conn.execute("DELETE FROM interaction WHERE id = ANY(%s::uuid[]) RETURNING customer_id",
                            [oldest[100:]]).fetchall()
        for (customer,) in gone:
            conn.execute("UPDATE customer SET interaction_count = interaction_count - 1 WHERE id = %s", [customer])
        conn.execute("UPDATE customer SET last_seen_at = (SELECT max(timestamp) FROM interaction AS i "
                     "WHERE i.customer_id = customer.id)")
    for gone_id in oldest[100:]:
        del expected[gone_id]
    added = conn.execute(
        "INSERT INTO interaction (id, organization_id, customer_id, timestamp, received_at, channel, event_type, "
        "metadata, analysis_status) SELECT gen_random_uuid(), organization_id, customer_id, now(), now(), channel, "
        "event_type, metadata, 'pending' FROM interaction LIMIT 1 RETURNING id, customer_id").fetchone()
    conn.execute("UPDATE customer SET interaction_count = interaction_count + 1, last_seen_at = (SELECT "
                 "max(timestamp) FROM interaction AS i WHERE i.customer_id = customer.id) WHERE id = %s", [added[1]])
    expected[str(added[0])] = "pending"
    return expected
