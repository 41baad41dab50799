"""Anchor D of DESIGN §12: the raw driver (sqlite3 / psycopg 3) writing the rows
that batch ingests write, into the project's own schema (every index, the unique
messageId with ON CONFLICT DO NOTHING: on PostgreSQL through message_key, as the
interaction table is partitioned), 100 rows and one set-based counter update a
transaction, on one connection. No ORM, no validation, no HTTP: what
the database and its driver can take."""
import datetime
import json
import random
import time
import uuid
from urllib.parse import urlparse

COLUMNS = ("id", "organization_id", "customer_id", "message_id", "timestamp", "received_at",
           "channel", "event_type", "content", "metadata", "analysis_status")


def connect(database_url):
    """(connection, placeholder, is_postgres) with the service's own settings."""
    if urlparse(database_url).scheme == "sqlite":
        import sqlite3
        conn = sqlite3.connect(urlparse(database_url).path, isolation_level=None, timeout=30)
        conn.execute("PRAGMA journal_mode=wal")
        conn.execute("PRAGMA synchronous=normal")
        conn.execute("PRAGMA foreign_keys=1")
        return conn, "?", False
    import psycopg
    return psycopg.connect(database_url), "%s", True


# PostgreSQL: a messageId is unique through message_key (docs/design.md §17), written
# first in the same statement; the interactions whose key was new follow.
KEYED_INSERT = (
    "WITH v (%(columns)s) AS (VALUES %(values)s), "
    "keyed AS (INSERT INTO message_key SELECT organization_id, message_id, id, received_at FROM v "
    "ON CONFLICT (organization_id, message_id) DO NOTHING RETURNING interaction_id) "
    "INSERT INTO interaction (%(columns)s) SELECT %(columns)s FROM v WHERE id IN (SELECT interaction_id FROM keyed)")


def _statements(placeholder, rows, customers, postgres):
    columns = ", ".join(COLUMNS)
    if postgres:
        first = "(%s::uuid, %s::uuid, %s::uuid, %s, %s::timestamp, %s::timestamp, %s, %s, %s, %s, %s)"
        values = ", ".join([first] + ["(%s)" % ", ".join(["%s"] * len(COLUMNS))] * (rows - 1))
        insert = KEYED_INSERT % {"columns": columns, "values": values}
    else:
        values = "(%s)" % ", ".join([placeholder] * len(COLUMNS))
        insert = "INSERT INTO interaction (%s) VALUES %s ON CONFLICT (organization_id, message_id) DO NOTHING" % (
            columns, ", ".join([values] * rows))
    cast = "::uuid, %s::int, %s::timestamp" if postgres else ", ?, ?"
    update = ("UPDATE customer SET interaction_count = interaction_count + v.column2, "
              "last_seen_at = CASE WHEN last_seen_at IS NULL OR last_seen_at < v.column3 "
              "THEN v.column3 ELSE last_seen_at END "
              "FROM (VALUES %s) AS v WHERE customer.id = v.column1" % ", ".join(
                  ["(%s%s)" % (placeholder, cast)] * customers))
    return insert, update


def rows_per_second(database_url, organization_id, customer_ids, seconds, batch=100):
    """Rows a second written for ``seconds``; the rows' fields are made up front, so
    that what is timed is the driver and the database."""
    conn, placeholder, postgres = connect(database_url)
    insert, update = _statements(placeholder, batch, len(customer_ids), postgres)

    def ident(value):
        return value if postgres else value.hex

    def stamp(value):
        return value if postgres else str(value)

    org = ident(uuid.UUID(organization_id))
    customers = [ident(uuid.UUID(c)) for c in customer_ids]
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    times = [now - datetime.timedelta(seconds=random.randint(0, 3600)) for _ in range(batch)]
    fields = [(customers[n % len(customers)], stamp(times[n])) for n in range(batch)]
    newest = {}
    for (customer, _), when in zip(fields, times, strict=True):
        newest[customer] = max(newest.get(customer, when), when)
    counts = [value for customer in customers
              for value in (customer, batch // len(customers), stamp(newest[customer]))]
    metadata = json.dumps({"page": "/pricing", "plan": "pro"})
    base, written, started = uuid.uuid4().int, 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        params = []
        for n, (customer, when) in enumerate(fields):
            serial = written + n
            params += [ident(uuid.UUID(int=base + serial)), org, customer, str(serial), when,
                       stamp(now), "chat", "message", "Thanks, the support team was super helpful.",
                       metadata, "pending"]
        if postgres:
            with conn.transaction():
                conn.execute(insert, params, prepare=True)
                conn.execute(update, counts, prepare=True)
        else:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(insert, params)
            conn.execute(update, counts)
            conn.execute("COMMIT")
        written += batch
    elapsed = time.perf_counter() - started
    conn.close()
    return written / elapsed


def fill(database_url, organization_id, customer_ids, count, chunk=20_000):
    """Store ``count`` interactions of ``customer_ids`` straight into the tables, with
    the customers' counters set to match (DESIGN §4 holds)."""
    conn, placeholder, postgres = connect(database_url)
    base = datetime.datetime(2025, 1, 1)
    received = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)  # this month's partition
    customers = customer_ids if postgres else [uuid.UUID(c).hex for c in customer_ids]
    org = organization_id if postgres else uuid.UUID(organization_id).hex
    for start in range(0, count, chunk):
        rows = [(str(uuid.uuid4()) if postgres else uuid.uuid4().hex, org,
                 customers[n % len(customers)], None,
                 base + datetime.timedelta(seconds=n), received,
                 "web", "page_view", "Just browsing the pricing page.", "{}", "done")
                for n in range(start, min(count, start + chunk))]
        if postgres:
            with conn.transaction(), conn.cursor().copy(
                    "COPY interaction (%s) FROM STDIN" % ", ".join(COLUMNS)) as copy:
                for row in rows:
                    copy.write_row(row)
        else:
            rows = [row[:4] + (str(row[4]), str(row[5])) + row[6:] for row in rows]
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO interaction (%s) VALUES (%s)" % (
                ", ".join(COLUMNS), ", ".join("?" * len(COLUMNS))), rows)
            conn.execute("COMMIT")
    recount = ("UPDATE customer SET interaction_count = (SELECT COUNT(*) FROM interaction i "
               "WHERE i.customer_id = customer.id), last_seen_at = (SELECT MAX(i.timestamp) "
               "FROM interaction i WHERE i.customer_id = customer.id) WHERE organization_id = %s"
               % placeholder)
    if postgres:
        with conn.transaction():
            conn.execute(recount, [org])
    else:
        conn.execute(recount, [org])
    conn.close()
