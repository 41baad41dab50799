"""Growth (DESIGN §12, §17) on PostgreSQL + Redis: the service with ``--rows``
interactions stored (10M by default) against the same service on a nearly empty
store, side by side in one run.

Two stacks run at once. Each has a bench organization of 100 customers. The grown
store gets ``--rows`` interactions over ``--organizations`` organizations (the
bench's among them), the other store 20,000 for the bench organization alone: raw
SQL on the server, a year of ``received_at`` in time order, every interaction
analysed, with its ``interaction.created`` change and the customers' counters as
§4 says; then the indexes are rebuilt and the tables vacuumed and analysed, so
that autovacuum does not run during the measurements. Then, ``--rounds`` times, in
alternating order: batch ingest (4 connections), single ingest (16), pages of
``GET /api/interactions`` (limit 100: the organization's newest, and a customer's)
and of ``GET /api/changes`` (limit 1,000, from a quarter into the feed), at 4
connections. Last, `flask retention apply` of the oldest month on each, then
`flask retention reclaim`, timed, and `flask migrate` converting an unpartitioned
table of 1M interactions, timed.

    .venv/bin/python -m bench.growth [--rows 10000000] [--organizations 10] [--seconds 10] [--rounds 3]
                                     [--skip retention,conversion]
"""
import argparse
import datetime
import json
import os
import subprocess
import tempfile
import time

import psycopg
from playhouse.migrations import Runner

import models
from bench.changes import wrk_get
from bench.common import BIN, POSTGRES, ROOT, Stack
from bench.ingest import batch_bodies, log, single_bodies, wrk
from ingest.changes import cursor
from tests.dbs import create_scratch_database, drop_database

EMPTY_ROWS = 20_000
CUSTOMERS = 100  # an organization's
FILL_ROWS = 1_000_000
DAYS = 365
READ_PAGES = 10
CONVERSION_ROWS = 1_000_000

# Rows n in [start, stop) of a fill of ``rows`` over customers numbered k = n % C (in
# organization order), received in time order over the last DAYS days; every other one
# with a messageId (and its message_key row); each with its interaction.created change,
# whose position is the row's rank within its organization.
FILL = """
WITH src AS (
  SELECT n, gen_random_uuid() AS id, k.organization_id, k.id AS customer_id,
         (now() AT TIME ZONE 'UTC') - make_interval(secs => 86400.0 * %(days)s * (1 - n::float8 / %(rows)s))
           AS received_at,
         (n / %(customers)s) * {per_org} + k.j + 1 AS position
  FROM generate_series(%(start)s, %(stop)s - 1) AS n
  JOIN grown_customer AS k ON k.k = n %% %(customers)s),
keyed AS (
  INSERT INTO message_key (organization_id, message_id, interaction_id, received_at)
  SELECT organization_id, 'm' || n, id, received_at FROM src WHERE n %% 2 = 0),
inserted AS (
  INSERT INTO interaction (id, organization_id, customer_id, message_id, "timestamp", received_at,
                           channel, event_type, content, metadata, analysis_status, sentiment_label,
                           sentiment_score, analyzed_at)
  SELECT id, organization_id, customer_id, CASE WHEN n %% 2 = 0 THEN 'm' || n END,
         received_at - make_interval(secs => n %% 600), received_at, 'chat', 'message',
         'Thanks, the support team was super helpful.', '{{"page":"/pricing","plan":"pro"}}', 'done',
         'positive', 0.7, received_at
  FROM src)
INSERT INTO "change" (organization_id, position, kind, subject, recorded_at, subject_at)
SELECT organization_id, position, 1, id, received_at, received_at FROM src
""".format(per_org=CUSTOMERS)

FINISH = """
UPDATE customer SET interaction_count = counted.n, last_seen_at = counted.newest
FROM (SELECT customer_id, COUNT(*) AS n, MAX("timestamp") AS newest FROM interaction GROUP BY customer_id)
  AS counted WHERE customer.id = counted.customer_id;
INSERT INTO change_stream (organization_id, position, oldest)
SELECT organization_id, MAX(position), 1 FROM "change" GROUP BY organization_id
ON CONFLICT (organization_id) DO UPDATE SET position = excluded.position;
"""


def fill(database_url, rows, organizations):
    """Fill the stack's database as the module says (its bench organization exists)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")  # no foreign-key triggers row by row
        conn.execute("SET maintenance_work_mem = '1GB'")
        conn.execute("INSERT INTO organization (id, name, created_at) SELECT gen_random_uuid(), 'grown ' || n, "
                     "now() FROM generate_series(2, %s) AS n", [organizations])
        conn.execute("INSERT INTO customer (id, organization_id, external_id, traits, created_at, "
                     "interaction_count) SELECT gen_random_uuid(), o.id, 'c' || n, '{}', now(), 0 "
                     "FROM organization AS o, generate_series(0, %s) AS n WHERE o.name LIKE 'grown %%'",
                     [CUSTOMERS - 1])
        conn.execute("CREATE TABLE grown_customer AS SELECT row_number() OVER w - 1 AS k, id, organization_id, "
                     "row_number() OVER (PARTITION BY organization_id ORDER BY id) - 1 AS j "
                     "FROM customer WINDOW w AS (ORDER BY organization_id, id)")
        conn.execute("CREATE UNIQUE INDEX ON grown_customer (k)")
        customers = conn.execute("SELECT COUNT(*) FROM grown_customer").fetchone()[0]
        indexes = conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename IN ('interaction', 'change', 'message_key') "
            "AND indexname NOT IN (SELECT conname FROM pg_constraint)").fetchall()
        for name, _ in indexes:
            conn.execute('DROP INDEX "%s"' % name)
        started = time.perf_counter()
        for start in range(0, rows, FILL_ROWS):
            conn.execute(FILL, {"days": DAYS, "rows": rows, "customers": customers, "start": start,
                                "stop": min(rows, start + FILL_ROWS)})
            log("filled %d of %d interactions (%.0f s)" % (min(rows, start + FILL_ROWS), rows,
                                                         time.perf_counter() - started))
        for _, definition in indexes:  # a partitioned table's index, made ON ONLY, would skip its partitions
            conn.execute(definition.replace(" ON ONLY ", " ON "))
        conn.execute(FINISH)
        conn.execute("DROP TABLE grown_customer")
        conn.execute("VACUUM (ANALYZE)")
        log("indexes rebuilt, counters set, vacuumed (%.0f s)" % (time.perf_counter() - started))


def read_paths(stack, org):
    """Pages to GET: the organization's newest interactions, a customer's, and
    READ_PAGES pages of the change feed from a quarter into it."""
    with psycopg.connect(stack.database_url) as conn:
        last = conn.execute("SELECT position FROM change_stream WHERE organization_id = %s",
                            [org["organizationId"]]).fetchone()[0]
    start = last // 4
    return {"interactions": ["/api/interactions?limit=100"] + [
                "/api/interactions?limit=100&customerId=" + customer for customer in org["customers"][:20]],
            "changes": ["/api/changes?limit=1000&after=" + cursor(org["organizationId"], start + 1000 * n)
                        for n in range(READ_PAGES)]}


def measure(stack, org, paths, seconds):
    key, customers = org["ingestKey"], org["customers"]
    figures = {"batch": wrk(stack.url + "/api/data/ingest/batch", key, batch_bodies(customers), 4, seconds),
               "single": wrk(stack.url + "/api/data/ingest", key, single_bodies(customers), 16, seconds)}
    for name, listing in paths.items():
        figures[name] = wrk_get(stack.url, org["readKey"], listing, 4, seconds)
    return figures


def retention_days(now):
    """`--days` for a retention run that drops the fill's oldest month: its horizon a
    day (retention's margin for event times) past the end of that month's partition,
    so the rest deleted row by row is a day or two, as for a daily cron job."""
    oldest = now - datetime.timedelta(days=DAYS)
    month_after = (oldest.replace(day=28) + datetime.timedelta(days=4)).replace(day=1, hour=0, minute=0,
                                                                                second=0, microsecond=0)
    return (now - month_after - datetime.timedelta(days=1)).days


def retention_seconds(stack):
    """Wall times (start-up included) of `flask retention apply` of the oldest month and
    of the `flask retention reclaim` after it, with what each printed."""
    days = retention_days(datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None))
    timed = []
    for command in (("retention", "apply", "--days", str(days)), ("retention", "reclaim")):
        started = time.perf_counter()
        output = stack.flask(*command)
        timed += [time.perf_counter() - started, " / ".join(output.strip().splitlines())]
    return timed


def conversion(server_url, rows):
    """`flask migrate` converting an unpartitioned table of ``rows`` (a database made as
    before partitions existed, filled as above): (seconds, what it printed)."""
    directory = tempfile.mkdtemp(prefix="ingest-bench-")
    url = create_scratch_database(server_url, directory)
    database = models.make_database(url)
    try:
        Runner(database, os.path.join(ROOT, "migrations")).up()  # the schema only: no conversion
        database.close_all()
        fill(url, rows, 11)
        env = {**os.environ, "DATABASE_URL": url, "INSTANCE_PATH": directory, "LOG_LEVEL": "WARNING",
               "QUEUE_URL": "sqlite:///" + os.path.join(directory, "queue.db")}
        started = time.perf_counter()
        output = subprocess.run([os.path.join(BIN, "flask"), "--app", "app", "migrate"], cwd=ROOT, env=env,
                                check=True, capture_output=True, text=True).stdout
        return time.perf_counter() - started, " / ".join(output.strip().splitlines())
    finally:
        database.close_all()
        drop_database(url)


VARIANTS = ("empty", "grown")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--organizations", type=int, default=10)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--postgres", default=POSTGRES, help="the PostgreSQL server (scratch databases on it)")
    parser.add_argument("--skip", default="", help="comma-separated: retention, conversion")
    args = parser.parse_args()
    stacks = {}
    try:
        for name in VARIANTS:
            stacks[name] = Stack(args.postgres)
        orgs = {name: stack.organization("bench", customers=CUSTOMERS) for name, stack in stacks.items()}
        since = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=DAYS + 1)).strftime("%Y-%m-%d")
        for name, rows, organizations in (("empty", EMPTY_ROWS, 1), ("grown", args.rows, args.organizations)):
            log("%s: filling %d interactions over %d organization(s)" % (name, rows, organizations))
            stacks[name].flask("partitions", "ensure", "--since", since)  # as before an import of history
            fill(stacks[name].database_url, rows, organizations)
        paths = {name: read_paths(stacks[name], orgs[name]) for name in VARIANTS}
        rounds = []
        for number in range(args.rounds):
            log("round %d" % (number + 1))
            order = VARIANTS if number % 2 == 0 else VARIANTS[::-1]
            rounds.append({name: measure(stacks[name], orgs[name], paths[name], args.seconds) for name in order})
        retention = ({} if "retention" in args.skip else
                     {name: retention_seconds(stacks[name]) for name in VARIANTS})
    finally:
        for stack in stacks.values():
            stack.stop()
    converted = None
    if "conversion" not in args.skip:
        log("flask migrate of an unpartitioned table of %d interactions" % CONVERSION_ROWS)
        converted = conversion(args.postgres, CONVERSION_ROWS)
    report(args.rows, rounds, retention, converted)


ROWS = (("batch", "batch ingest, events/s", 100), ("single", "single ingest, requests/s", 1),
        ("interactions", "/api/interactions pages/s", 1), ("changes", "/api/changes pages/s", 1))


def report(rows, rounds, retention, converted):
    print("\n| round | " + " | ".join("%s: empty | grown / empty (p99)" % title for _, title, _ in ROWS) + " |")
    print("|---|" + "---|---|" * len(ROWS))
    for number, result in enumerate(rounds, 1):
        cells = []
        for name, _, scale in ROWS:
            empty, grown = result["empty"][name], result["grown"][name]
            cells += ["%.0f (p99 %.0f ms)" % (empty["rps"] * scale, empty["p99_ms"]),
                      "**%.2f** (p99 %.0f ms)" % (grown["rps"] / empty["rps"], grown["p99_ms"])]
        print("| %d | %s |" % (number, " | ".join(cells)))
    for name, (seconds, output, reclaim_seconds, reclaimed) in retention.items():
        print("retention apply of the oldest month, %s store: %.1f s (%s); then retention reclaim: %.1f s (%s)"
              % (name, seconds, output, reclaim_seconds, reclaimed))
    if converted:
        print("flask migrate of %d unpartitioned interactions: %.1f s (%s)" % ((CONVERSION_ROWS,) + converted))
    print(json.dumps({"rows": rows, "rounds": rounds, "retention": retention, "conversion": converted}))


if __name__ == "__main__":
    main()
