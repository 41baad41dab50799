"""Time partitions of ``interaction`` on PostgreSQL (DESIGN §17).

``interaction`` is range-partitioned by ``received_at``, the time the service
stored the row (never the client's clock, so a write lands in the current
partition unless the service's own clock or an import says otherwise). A
partition covers a day, an ISO week or a month (PARTITION_INTERVAL); the service
creates them ahead of time (``ensure``: a periodic task and `flask partitions
ensure`). A row outside every partition goes to ``interaction_default`` rather
than fail; ``ensure`` moves such rows into the partition it creates for them, and
``status`` and /metrics report how many the default holds.

Expiring whole partitions is retention's fast path (ingest/lifecycle.py); the
message keys of a dropped partition are reclaimed later (``reclaim_keys``). SQLite
keeps one table: ``is_partitioned()`` is false there and the rest is not called.
"""
import datetime
import logging
import re
from dataclasses import dataclass

from models import db, one_at_a_time, utcnow

log = logging.getLogger(__name__)

TABLE = "interaction"
DEFAULT = "interaction_default"
AHEAD = 3  # periods created ahead of the current one
_BOUND = re.compile(r"FROM \('([^']+)'\) TO \('([^']+)'\)")


@dataclass(frozen=True)
class Partition:
    name: str
    start: datetime.datetime  # inclusive, naive UTC
    end: datetime.datetime  # exclusive


def period_start(moment, interval):
    """The start of the period of ``interval`` that holds ``moment``."""
    day = datetime.datetime(moment.year, moment.month, moment.day)
    if interval == "day":
        return day
    if interval == "week":
        return day - datetime.timedelta(days=day.weekday())
    if interval == "month":
        return day.replace(day=1)
    raise ValueError("no such interval: %r" % interval)


def next_start(start, interval):
    if interval == "day":
        return start + datetime.timedelta(days=1)
    if interval == "week":
        return start + datetime.timedelta(days=7)
    return (start.replace(day=28) + datetime.timedelta(days=4)).replace(day=1)


def is_partitioned():
    """Whether ``interaction`` is a partitioned table (PostgreSQL, once migrated)."""
    if not db.dialect.partitions:
        return False
    row = db.execute_sql("SELECT relkind FROM pg_class WHERE oid = to_regclass(%s)", [TABLE]).fetchone()
    return row is not None and row[0] == "p"


def partitions(table=TABLE):
    """The range partitions of ``table``, oldest first (the default one is not among them)."""
    rows = db.execute_sql(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits AS i "
        "JOIN pg_class AS c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass(%s)", [table]).fetchall()
    found = []
    for name, bound in rows:
        match = _BOUND.search(bound)
        if match:
            found.append(Partition(name, *(datetime.datetime.fromisoformat(value) for value in match.groups())))
    return sorted(found, key=lambda partition: partition.start)


def ensure(interval, ahead, now, table=TABLE):
    """Create the partitions of the periods from the one holding ``now`` to ``ahead``
    periods after it, where none covers them yet (a period that overlaps partitions
    of another interval gets only what they leave uncovered). Rows that the default
    partition holds for a new partition's range are moved into it. Returns
    ``[(partition, rows moved into it)]`` for the partitions created."""
    start = period_start(now, interval)
    wanted = []
    for _ in range(ahead + 1):
        end = next_start(start, interval)
        wanted.append((start, end))
        start = end
    created = []  # (partition, rows moved into it from the default)
    with db.atomic():
        db.execute_sql("SELECT pg_advisory_xact_lock(hashtext('ingest partitions'))")  # one creator at a time
        existing = [(p.start, p.end) for p in partitions(table)]
        for start, end in wanted:
            for piece_start, piece_end in _uncovered(start, end, existing):
                created.append(_create(table, piece_start, piece_end))
                existing.append((piece_start, piece_end))
    return created


def _uncovered(start, end, existing):
    """The parts of [start, end) that no range of ``existing`` covers."""
    pieces = [(start, end)]
    for taken_start, taken_end in existing:
        pieces = [part for piece_start, piece_end in pieces for part in (
            (piece_start, min(piece_end, taken_start)), (max(piece_start, taken_end), piece_end))
            if part[0] < part[1]]
    return pieces


def _create(table, start, end):
    """One partition for [start, end), made apart and then attached, so that the
    default partition's rows in that range can move into it first (a plain CREATE
    ... PARTITION OF would fail on them)."""
    name = "%s_p%s" % (table, start.strftime("%Y%m%d%H") if start.hour else start.strftime("%Y%m%d"))
    bounds = [start, end]
    db.execute_sql('CREATE TABLE "%s" (LIKE "%s" INCLUDING DEFAULTS INCLUDING CONSTRAINTS)' % (name, table))
    default = table + "_default"
    moved = db.execute_sql(
        'WITH moved AS (DELETE FROM "%s" WHERE received_at >= %%s AND received_at < %%s RETURNING *) '
        'INSERT INTO "%s" SELECT * FROM moved' % (default, name), bounds).rowcount
    db.execute_sql("ALTER TABLE \"%s\" ATTACH PARTITION \"%s\" FOR VALUES FROM ('%s') TO ('%s')" % (
        table, name, start.isoformat(" "), end.isoformat(" ")))  # DDL takes no parameters
    return Partition(name, start, end), moved


# Converting an unpartitioned interaction table --------------------------------
#
# The partitioned table is built beside the old one under NEW's name, the rows are
# copied in chunks in (received_at, id) order, each chunk committing with the last key
# it copied (so a killed run resumes after it), and a trigger on the old table applies
# to the copy every write to a row at or below that key. New rows have the newest
# received_at: later chunks copy them. The last chunk and the swap of names run in one
# transaction that holds the old table's lock; the old table is dropped with it.

NEW = "interaction_partitioned"
PROGRESS = "partition_conversion"
KEY_INDEX = "interaction_conversion_key"
INLINE_ROWS = 100_000  # converted by every migrate(); more waits for `flask migrate`
COPY_ROWS = 20_000  # rows the conversion copies a transaction

NEW_TABLE = (
    'CREATE TABLE {new} (LIKE interaction INCLUDING DEFAULTS) PARTITION BY RANGE (received_at)',
    'ALTER TABLE {new} ADD CONSTRAINT {new}_pkey PRIMARY KEY (id, received_at)',
    'ALTER TABLE {new} ADD CONSTRAINT {new}_customer_id_fkey FOREIGN KEY (customer_id) '
    'REFERENCES customer (id) ON DELETE CASCADE',
    'ALTER TABLE {new} ADD CONSTRAINT {new}_organization_id_fkey FOREIGN KEY (organization_id) '
    'REFERENCES organization (id) ON DELETE CASCADE',
    'CREATE INDEX {new}_organization_id_timestamp_id ON {new} (organization_id, "timestamp", id)',
    'CREATE INDEX {new}_customer_id_timestamp_id ON {new} (customer_id, "timestamp", id)',
    'CREATE INDEX {new}_analysis_status_received_at ON {new} (analysis_status, received_at)',
    "CREATE INDEX {new}_pending_organization ON {new} (organization_id) WHERE analysis_status = 'pending'",
    'CREATE TABLE {new}_default PARTITION OF {new} DEFAULT',
    'CREATE TABLE {progress} (id int PRIMARY KEY, received_at timestamp NOT NULL, row_id uuid NOT NULL)',
    "INSERT INTO {progress} VALUES (1, '-infinity', '00000000-0000-0000-0000-000000000000')",
)

# Writes to rows already copied reach the copy. The progress row is read FOR SHARE: a
# chunk that is being copied holds it FOR UPDATE, so a write to one of its rows waits
# for the chunk to commit, then finds the row copied.
MIRROR = """
CREATE FUNCTION interaction_conversion_mirror() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE copied record;
BEGIN
  SELECT received_at, row_id INTO copied FROM {progress} WHERE id = 1 FOR SHARE;
  IF TG_OP IN ('UPDATE', 'DELETE') AND (OLD.received_at, OLD.id) <= (copied.received_at, copied.row_id) THEN
    DELETE FROM {new} WHERE id = OLD.id AND received_at = OLD.received_at;
  END IF;
  IF TG_OP IN ('UPDATE', 'INSERT') AND (NEW.received_at, NEW.id) <= (copied.received_at, copied.row_id) THEN
    INSERT INTO {new} SELECT NEW.*;
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER interaction_conversion_mirror AFTER INSERT OR UPDATE OR DELETE ON interaction
FOR EACH ROW EXECUTE FUNCTION interaction_conversion_mirror();
"""

COPY_CHUNK = """
WITH copied AS (
  INSERT INTO {new} SELECT * FROM interaction
  WHERE (received_at, id) > (SELECT received_at, row_id FROM {progress} WHERE id = 1)
  ORDER BY received_at, id LIMIT %s RETURNING received_at, id)
UPDATE {progress} SET (received_at, row_id) = (
  SELECT received_at, id FROM copied ORDER BY received_at DESC, id DESC LIMIT 1)
WHERE id = 1 AND EXISTS (SELECT 1 FROM copied)
RETURNING (SELECT COUNT(*) FROM copied)
"""


def _sql(template):
    return template.format(new=NEW, progress=PROGRESS)


def conversion_state():
    """'sqlite', 'partitioned', 'started' (a conversion is under way) or 'unpartitioned'."""
    if not db.dialect.partitions:
        return "sqlite"
    if is_partitioned():
        return "partitioned"
    exists = db.execute_sql("SELECT to_regclass(%s) IS NOT NULL", [NEW]).fetchone()[0]
    return "started" if exists else "unpartitioned"


def remaining_estimate():
    """About how many rows the old table holds (the planner's estimate: no scan)."""
    row = db.execute_sql("SELECT reltuples FROM pg_class WHERE oid = to_regclass('interaction')").fetchone()
    return max(0, int(row[0])) if row else 0


def convert(interval, ahead, now, chunk=COPY_ROWS, limit=None, progress=None):
    """Turn ``interaction`` into the partitioned table, resuming a conversion a
    killed run left. ``limit``: do nothing when the old table holds more rows than
    that (they wait for `flask migrate`). ``progress(rows copied)`` is called after
    each chunk. Returns the rows copied by this call, or None if nothing was to do."""
    if not db.dialect.partitions:
        return None
    with one_at_a_time("ingest conversion"):  # two processes upgrading at once convert in turn
        state = conversion_state()
        if state in ("sqlite", "partitioned") or limit is not None and (
                state == "started" or _rows_over(limit)):
            return None
        if state == "unpartitioned":
            _start(interval, ahead, now)
        return _copy(chunk, progress)


def _key_index():
    """The index the chunks walk, built without blocking writes (again, if a killed run
    left it invalid)."""
    valid = db.execute_sql("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)",
                           [KEY_INDEX]).fetchone()
    if valid is not None and not valid[0]:
        db.execute_sql("DROP INDEX CONCURRENTLY %s" % KEY_INDEX)
    db.execute_sql("CREATE INDEX CONCURRENTLY IF NOT EXISTS %s ON interaction (received_at, id)" % KEY_INDEX)


def _copy(chunk, progress):
    _key_index()
    copied = 0
    while True:
        with db.atomic():
            db.execute_sql("SELECT 1 FROM %s WHERE id = 1 FOR UPDATE" % PROGRESS)
            done = db.execute_sql(_sql(COPY_CHUNK), [chunk]).fetchone()
        done = done[0] if done else 0
        copied += done
        if progress:
            progress(done)
        if done < chunk:
            break
    copied += _swap()
    return copied


def _rows_over(limit):
    return db.execute_sql("SELECT COUNT(*) > %s FROM (SELECT 1 FROM interaction LIMIT %s) AS rows",
                          [limit, limit + 1]).fetchone()[0]


def _start(interval, ahead, now):
    """The new table, its partitions from the oldest row's period on, the progress
    row and the mirroring trigger, in one transaction."""
    with db.atomic():
        for statement in NEW_TABLE:
            db.execute_sql(_sql(statement))
        oldest = db.execute_sql("SELECT MIN(received_at) FROM interaction").fetchone()[0] or now
        cover(interval, oldest, now, ahead, NEW)
        db.execute_sql(_sql(MIRROR))


def cover(interval, since, now, ahead, table=TABLE):
    """``ensure`` for every period from ``since``'s to ``ahead`` after ``now``'s (for
    history about to be imported, or converted)."""
    periods, start = 0, next_start(period_start(since, interval), interval)
    while start <= now:
        start = next_start(start, interval)
        periods += 1
    return ensure(interval, periods + ahead, since, table)


def _swap():
    """Copy what is left with the old table locked, then give the new one its names
    and drop the old; returns the rows copied here."""
    with db.atomic():
        db.execute_sql("LOCK TABLE interaction IN ACCESS EXCLUSIVE MODE")
        left = db.execute_sql(_sql(COPY_CHUNK), [2 ** 62]).fetchone()
        db.execute_sql("DROP TABLE interaction")
        db.execute_sql("DROP FUNCTION interaction_conversion_mirror()")
        db.execute_sql("DROP TABLE %s" % PROGRESS)
        for kind, old_name in db.execute_sql(
                "SELECT 'TABLE', relname FROM pg_class WHERE relname LIKE %s AND relkind IN ('r', 'p') "
                "UNION ALL SELECT 'INDEX', relname FROM pg_class WHERE relname LIKE %s AND relkind IN ('i', 'I')",
                [NEW + "%", NEW + "%"]).fetchall():
            db.execute_sql('ALTER %s "%s" RENAME TO "%s"' % (kind, old_name, TABLE + old_name[len(NEW):]))
        for table, constraint in db.execute_sql(
                "SELECT conrelid::regclass::text, conname FROM pg_constraint WHERE conname LIKE %s "
                "AND contype = 'f'", [NEW + "%"]).fetchall():
            db.execute_sql('ALTER TABLE %s RENAME CONSTRAINT "%s" TO "%s"' % (
                table, constraint, TABLE + constraint[len(NEW):]))
    return left[0] if left else 0


def upgrade(interval, ahead=AHEAD, limit=INLINE_ROWS):
    """What every start-up of the schema does on PostgreSQL: convert a small
    unpartitioned table (a fresh one is empty) and create the partitions ahead."""
    if db.dialect.partitions:
        convert(interval, ahead, utcnow(), limit=limit)
        ensure_ahead(interval, ahead)


def ensure_ahead(interval, ahead=AHEAD):
    """``ensure`` from now, if the table is partitioned (else a warning); returns
    what it created."""
    if is_partitioned():
        return ensure(interval, ahead, utcnow())
    log.warning("interaction is not partitioned yet: run `flask migrate` (DESIGN §17)")
    return []


def report(now):
    """What `flask partitions status` and /metrics tell: None when not partitioned,
    else {"partitions": [Partition], "default_rows": rows in the default partition
    (counted up to a million), "covered_until": the end of the newest partition}."""
    if not is_partitioned():
        return None
    found = partitions()
    default = db.execute_sql('SELECT COUNT(*) FROM (SELECT 1 FROM "%s" LIMIT 1000000) AS rows'
                             % DEFAULT).fetchone()[0]
    return {"partitions": found, "default_rows": default,
            "covered_until": found[-1].end if found else now}


# Retention's fast path (ingest/lifecycle.py) ------------------------------------

def expired(before):
    """The partitions whose every row was received before ``before``."""
    return [partition for partition in partitions() if partition.end <= before]


def rows_per_customer(partition):
    """{customer id: rows} of a partition."""
    return dict(db.execute_sql('SELECT customer_id, COUNT(*) FROM "%s" GROUP BY customer_id'
                               % partition.name).fetchall())


def drop(partition):
    """Detach and drop a partition, in the caller's transaction (which must hold
    ``interaction``'s ACCESS EXCLUSIVE lock, as the detach takes it)."""
    db.execute_sql('ALTER TABLE %s DETACH PARTITION "%s"' % (TABLE, partition.name))
    db.execute_sql('DROP TABLE "%s"' % partition.name)


def keep_from(moment):
    """Record that nothing received before ``moment`` is kept any more (in the
    transaction that drops the partition), so its message keys are taken over."""
    db.execute_sql("INSERT INTO storage_horizon (id, kept_from) VALUES (1, %s) ON CONFLICT (id) DO UPDATE "
                   "SET kept_from = GREATEST(storage_horizon.kept_from, excluded.kept_from)", [moment])


def reclaim_keys(limit, chunk):
    """Delete the ``message_key`` rows of dropped partitions (received before the
    storage horizon), ``chunk`` a transaction, up to ``limit`` (None: all); returns
    how many. Until then such a key is taken over by the next interaction with its
    messageId (ingest/store.py), so this only reclaims space."""
    horizon = db.execute_sql("SELECT kept_from FROM storage_horizon").fetchone()
    if horizon is None:
        return 0
    deleted = 0
    while limit is None or deleted < limit:
        gone = db.execute_sql("DELETE FROM message_key WHERE ctid = ANY(ARRAY(SELECT ctid FROM message_key "
                              "WHERE received_at < %s LIMIT %s))", [horizon[0], chunk]).rowcount
        deleted += gone
        if gone < chunk:
            break
    return deleted
