"""Test databases: a scratch database per run, emptying it, injected faults."""
import os
import uuid
from urllib.parse import urlparse, urlunparse

import psycopg
from peewee import OperationalError

from models import POSTGRES, db

FAIL_INSERT = "__fail_insert__"
FAIL_UPDATE = "__fail_update__"


def is_postgres_url(url):
    return urlparse(url).scheme in ("postgres", "postgresql")


def create_scratch_database(server_url, run_dir):
    """A fresh database for this run: on the server of ``server_url`` if it is
    PostgreSQL (which must then be reachable), else a SQLite file in ``run_dir``."""
    if not server_url or not is_postgres_url(server_url):
        return "sqlite:///" + os.path.join(run_dir, "ingest.db")
    name = "ingest_test_%s" % uuid.uuid4().hex[:12]
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute('CREATE DATABASE "%s"' % name)
    return urlunparse(urlparse(server_url)._replace(path="/" + name))


def drop_scratch_database(url):
    """Drop this run's database (the test process's connections first)."""
    if is_postgres_url(url):
        db.close_all()
        drop_database(url)


def drop_database(url):
    """Drop a PostgreSQL database that others may still be connected to."""
    parsed = urlparse(url)
    name = parsed.path.lstrip("/")
    with psycopg.connect(urlunparse(parsed._replace(path="/postgres")), autocommit=True) as conn:
        conn.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name)


TABLES = ("change", "change_stream", "erasure", "interaction", "customer", "api_key", "organization")


def empty_tables(attempts=5):
    """Empty every table. On PostgreSQL a TRUNCATE takes its tables one by one, and a
    consumer of a previous test may still be storing analyses (it locks the change
    stream, then interactions, then changes): a deadlock PostgreSQL breaks by
    cancelling one of them, retried here."""
    with db.connection_context():
        if db.dialect is POSTGRES:
            for attempt in range(attempts):
                try:
                    db.execute_sql("TRUNCATE %s" % ", ".join(TABLES + ("message_key", "storage_horizon")))
                    return
                except OperationalError as error:
                    if "deadlock detected" not in str(error) or attempt == attempts - 1:
                        raise
        else:
            for table in TABLES:
                db.execute_sql("DELETE FROM %s" % table)


SQLITE_FAULTS = (
    "CREATE TRIGGER fail_insert BEFORE INSERT ON interaction WHEN NEW.content = '%s' "
    "BEGIN SELECT RAISE(ABORT, 'injected insert fault'); END" % FAIL_INSERT,
    "CREATE TRIGGER fail_update BEFORE UPDATE ON customer WHEN NEW.name = '%s' "
    "BEGIN SELECT RAISE(ABORT, 'injected update fault'); END" % FAIL_UPDATE,
)
POSTGRES_FAULTS = (
    "CREATE FUNCTION injected_fault() RETURNS trigger AS $$ BEGIN "
    "RAISE EXCEPTION 'injected fault'; END $$ LANGUAGE plpgsql",
    "CREATE TRIGGER fail_insert BEFORE INSERT ON interaction FOR EACH ROW "
    "WHEN (NEW.content = '%s') EXECUTE FUNCTION injected_fault()" % FAIL_INSERT,
    "CREATE TRIGGER fail_update BEFORE UPDATE ON customer FOR EACH ROW "
    "WHEN (NEW.name = '%s') EXECUTE FUNCTION injected_fault()" % FAIL_UPDATE,
)


def install_faults():
    with db.connection_context():
        for statement in (POSTGRES_FAULTS if db.dialect is POSTGRES else SQLITE_FAULTS):
            db.execute_sql(statement)


def remove_faults():
    with db.connection_context():
        if db.dialect is POSTGRES:
            db.execute_sql("DROP FUNCTION injected_fault() CASCADE")
        else:
            db.execute_sql("DROP TRIGGER fail_insert")
            db.execute_sql("DROP TRIGGER fail_update")


INVARIANT_VIOLATIONS = """
SELECT c.id, c.interaction_count, c.last_seen_at FROM customer c
WHERE c.interaction_count <> (SELECT COUNT(*) FROM interaction i WHERE i.customer_id = c.id)
   OR c.last_seen_at IS DISTINCT FROM
      (SELECT MAX(i.timestamp) FROM interaction i WHERE i.customer_id = c.id)
"""


def invariant_violations():
    """Customers breaking DESIGN §4's invariant, read in one statement (one snapshot)."""
    with db.connection_context():
        return db.execute_sql(INVARIANT_VIOLATIONS).fetchall()
