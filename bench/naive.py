"""Anchor W of DESIGN §12: the naive durable write. A bare Flask app that, per
request, inserts the interaction and updates its customer's counters in one
transaction with the raw driver (sqlite3 / psycopg 3), into the project's own
schema, served by the same gunicorn configuration as the service:

    DATABASE_URL=... gunicorn -c gunicorn.conf.py "bench.naive:app"

What a user would write in an afternoon: it validates nothing and checks no key
(the organization is read from the customer's row, in the insert); no change feed,
no analysis queued, nothing published, no group commit. Each thread has its own
connection, opened with bench/raw.py's settings, and commits every request.
A repeated messageId is not stored and not counted: on SQLite through the unique
index, on PostgreSQL through ``message_key`` (the interaction table is partitioned).
"""
import contextlib
import datetime
import json
import os
import re
import threading
import uuid

from flask import Flask, request

from bench.raw import connect

app = Flask(__name__)

COLUMNS = ("id, organization_id, customer_id, message_id, timestamp, received_at, channel, "
           "event_type, content, metadata, analysis_status")
# Selected from the customer's row (``c``): its organization and id.
ROW = ("%(id)s, organization_id, id, %(message_id)s, %(timestamp)s, %(received_at)s, %(channel)s, "
       "%(event_type)s, %(content)s, %(metadata)s, 'pending'")
INSERT = ("INSERT INTO interaction (" + COLUMNS + ") SELECT " + ROW
          + " FROM customer AS c WHERE id = %(customer_id)s")
SQLITE_INSERT = INSERT + " ON CONFLICT (organization_id, message_id) DO NOTHING"
KEYED_INSERT = (
    "WITH c AS (SELECT organization_id, id FROM customer WHERE id = %(customer_id)s), "
    "keyed AS (INSERT INTO message_key (organization_id, message_id, interaction_id, received_at) "
    "SELECT organization_id, %(message_id)s, %(id)s, %(received_at)s FROM c "
    "ON CONFLICT (organization_id, message_id) DO NOTHING RETURNING interaction_id) "
    "INSERT INTO interaction (" + COLUMNS + ") SELECT " + ROW + " FROM c WHERE EXISTS (SELECT FROM keyed)")
UPDATE = ("UPDATE customer SET interaction_count = interaction_count + 1, "
          "last_seen_at = CASE WHEN last_seen_at IS NULL OR last_seen_at < %(timestamp)s "
          "THEN %(timestamp)s ELSE last_seen_at END WHERE id = %(customer_id)s")


def sqlite(statement):
    """sqlite3's spelling of a statement's named parameters."""
    return re.sub(r"%\((\w+)\)s", r":\1", statement)


_local = threading.local()


def connection():
    """This thread's (connection, is_postgres), opened on its first request."""
    if not hasattr(_local, "connection"):
        _local.connection, _, _local.postgres = connect(os.environ["DATABASE_URL"])
    return _local.connection, _local.postgres


@contextlib.contextmanager
def transaction(conn, postgres):
    if postgres:
        with conn.transaction():
            yield
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def utc(text):
    """An ISO 8601 time as naive UTC, the form every timestamp is stored in."""
    when = datetime.datetime.fromisoformat(text)
    return when.astimezone(datetime.timezone.utc).replace(tzinfo=None) if when.tzinfo else when


def parameters(ident, body, postgres):
    """The row's values as the driver takes them; on SQLite as peewee stores them
    (UUIDs as 32 hex digits, timestamps as text)."""
    values = {"id": ident, "customer_id": uuid.UUID(body["customerId"]),
              "message_id": body.get("messageId"), "timestamp": utc(body["timestamp"]),
              "received_at": datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None),
              "channel": body["channel"], "event_type": body["eventType"],
              "content": body.get("content"),
              "metadata": json.dumps(body.get("metadata", {}), separators=(",", ":"))}
    if postgres:
        return values
    return {**values, "id": values["id"].hex, "customer_id": values["customer_id"].hex,
            "timestamp": str(values["timestamp"]), "received_at": str(values["received_at"])}


STATEMENTS = {  # (is_postgres, has a messageId): (insert, counter update)
    (False, False): (sqlite(SQLITE_INSERT), sqlite(UPDATE)),
    (False, True): (sqlite(SQLITE_INSERT), sqlite(UPDATE)),
    (True, False): (INSERT, UPDATE),
    (True, True): (KEYED_INSERT, UPDATE),
}


@app.post("/api/data/ingest")
def ingest():
    conn, postgres = connection()
    ident = uuid.uuid4()
    values = parameters(ident, request.get_json(), postgres)
    insert, update = STATEMENTS[postgres, values["message_id"] is not None]
    with transaction(conn, postgres):
        created = conn.execute(insert, values).rowcount == 1
        if created:
            conn.execute(update, values)
    return {"id": str(ident), "created": created}, 201 if created else 200
