"""Set-based writes: interactions and their customers' counters in one transaction.

DESIGN §6 and §12. For a group of jobs (lists of interactions), in one
transaction and a fixed number of statements whatever the group's size:

1. the customers this process does not know yet are looked up, one SELECT, so
   an interaction is only ever stored for a customer of its own organization;
2. one multi-row ``INSERT ... ON CONFLICT (organization_id, message_id) DO
   NOTHING RETURNING id``: rows that conflict are duplicates of the row already
   there, which is race-safe across processes (the unique index decides);
3. one ``UPDATE customer`` for all its customers, counting the rows actually
   inserted: ``count + n``, ``last_seen_at = max(last_seen_at, newest)``;
4. the rows inserted take their positions in their organizations' change
   streams, in item order, and their changes are recorded (ingest/changes.py).

On PostgreSQL 2 to 4 are one statement (a data-modifying CTE): one round trip,
atomic without BEGIN/COMMIT. On SQLite they are two, in one transaction. The
hot statements are written out here rather than built by peewee for each
group: their text depends only on the number of rows, so psycopg prepares them
once, and building them costs nothing.
"""
import datetime
import functools
import json
import logging
import threading
import time
from collections import defaultdict

from peewee import IntegrityError, OperationalError

from ingest import changes
from ingest.domain import CREATED, DUPLICATE, UNKNOWN_CUSTOMER
from models import POSTGRES, SQLITE, Customer, Interaction, db

log = logging.getLogger(__name__)

# A write that fails with a transient error (SQLite busy past its timeout, a
# PostgreSQL deadlock or dropped connection) is tried this many times in all.
ATTEMPTS = 3
KNOWN_CUSTOMER_SECONDS = 60
KNOWN_CUSTOMER_ENTRIES = 100_000


# The columns an INSERT writes, and their values for an item, as both drivers
# take them (the UUIDs as hex, which is how peewee stores them on SQLite and
# what PostgreSQL casts to uuid; JSON as the metadata field serialises it).
COLUMNS = ("id", "organization_id", "customer_id", "message_id", "timestamp", "received_at",
           "channel", "event_type", "content", "metadata", "analysis_status")


def _values(item):
    return (item.id.hex, item.organization_id.hex, item.customer_id.hex, item.message_id,
            item.timestamp, item.received_at, item.channel, item.event_type, item.content,
            Interaction.metadata.db_value(item.metadata), item.analysis_status)


class KnownCustomers:
    """(organization, customer) pairs that exist, remembered for KNOWN_CUSTOMER_SECONDS,
    so that storing an interaction for a known customer costs no query."""

    def __init__(self, ttl=KNOWN_CUSTOMER_SECONDS):
        self._ttl = ttl
        self._expiry = {}
        self._lock = threading.Lock()

    def unknown(self, pairs):
        now = time.monotonic()
        return {pair for pair in pairs if self._expiry.get(pair, 0) <= now}

    def add(self, pairs):
        expires = time.monotonic() + self._ttl
        with self._lock:
            if len(self._expiry) + len(pairs) > KNOWN_CUSTOMER_ENTRIES:
                self._expiry = {}
            self._expiry.update(dict.fromkeys(pairs, expires))

    def forget(self, pair):
        with self._lock:
            self._expiry.pop(pair, None)


def write_group(jobs, known):
    """Store every job of ``jobs`` (lists of NewInteraction) in one transaction.

    Returns, per job, a list of ``(CREATED|DUPLICATE|UNKNOWN_CUSTOMER, id)`` in
    item order: a duplicate carries the id of the interaction stored first, an
    item whose customer is not one of its organization's carries None. Raises
    if the transaction fails, and then nothing of it is stored.
    """
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return WRITE[db.dialect](jobs, known)
        except IntegrityError:
            # Only a foreign key can fail (conflicts are skipped): a customer this
            # process remembered was erased meanwhile. Ask the database again.
            if attempt == ATTEMPTS:
                raise
            for item in (item for job in jobs for item in job):
                known.forget((item.organization_id, item.customer_id))
        except OperationalError:
            if attempt == ATTEMPTS:
                raise
            log.warning("transient storage error, retrying", exc_info=True,
                        extra={"attempt": attempt})
            db.close()
            time.sleep(0.05 * 2 ** attempt)


def _write_postgres(jobs, known):
    return _write(jobs, known, _insert_and_count_postgres)  # one statement: atomic on its own


def _write_sqlite(jobs, known):
    with db.atomic():
        return _write(jobs, known, _insert_and_count_sqlite)


def _write(jobs, known, store):
    items = [item for job in jobs for item in job]
    missing = known.unknown({(item.organization_id, item.customer_id) for item in items})
    strangers = set()
    if missing:
        found = _existing(missing)
        known.add(found)
        strangers = missing - found

    candidates, seen = [], set()  # the first item of each (organization, messageId)
    for item in items:
        if (item.organization_id, item.customer_id) in strangers:
            continue
        if item.message_id is None or item.key not in seen:
            seen.add(item.key)
            candidates.append(item)
    inserted = store(candidates)  # id -> position
    for item in candidates:
        item.position = inserted.get(item.id)
    stored = _stored_ids([item for item in candidates if item.id not in inserted])
    stored.update((item.key, item.id) for item in candidates
                  if item.id in inserted and item.message_id is not None)

    outcome = [(UNKNOWN_CUSTOMER, None) if (item.organization_id, item.customer_id) in strangers
               else (CREATED, item.id) if item.id in inserted else (DUPLICATE, stored[item.key])
               for item in items]
    results, start = [], 0
    for job in jobs:
        results.append(outcome[start:start + len(job)])
        start += len(job)
    return results


def probe(items):
    """What ``write_group`` would answer for ``items`` now, reading only (a dry run):
    ``[(CREATED|DUPLICATE|UNKNOWN_CUSTOMER, None)]``, by the same rules. Customers are
    checked in the database, not in a cache: a dry run is not the hot path, and
    another process may have erased one."""
    pairs = {(item.organization_id, item.customer_id) for item in items}
    strangers = pairs - _existing(pairs) if pairs else set()
    stored = _stored_ids([item for item in items if item.message_id is not None])
    outcome, seen = [], set()
    for item in items:
        if (item.organization_id, item.customer_id) in strangers:
            outcome.append((UNKNOWN_CUSTOMER, None))
        elif item.message_id is not None and (item.key in stored or item.key in seen):
            outcome.append((DUPLICATE, None))
        else:
            seen.add(item.key)
            outcome.append((CREATED, None))
    return outcome


def _existing(pairs):
    """Which of the (organization, customer) ``pairs`` are customers of that organization."""
    rows = (Customer.select(Customer.organization, Customer.id)
            .where(Customer.id.in_([customer for _, customer in pairs])).tuples())
    return {(org, customer) for org, customer in rows} & pairs


@functools.lru_cache(maxsize=256)
def _insert_sql(rows):
    """SQLite: a multi-row INSERT for ``rows`` items."""
    values = "(%s)" % ", ".join(["?"] * len(COLUMNS))
    return ("INSERT INTO interaction (%s) VALUES %s "
            "ON CONFLICT (organization_id, message_id) DO NOTHING RETURNING id"
            % (", ".join(COLUMNS), ", ".join([values] * rows)))


def _in_key_order(items):
    """A stable order of the unique keys keeps concurrent writers of the same
    messageIds from deadlocking on each other on PostgreSQL."""
    if any(item.message_id is not None for item in items):
        return sorted(items, key=lambda i: (i.organization_id.hex, i.message_id or ""))
    return items


def _insert_and_count_sqlite(items):
    """SQLite: insert ``items`` (those that conflict are skipped), then count the
    inserted ones on their customers and record their changes; returns {id
    inserted: its position}."""
    if not items:
        return {}
    params = [value for item in _in_key_order(items) for value in _values(item)]
    cursor = db.execute_sql(_insert_sql(len(items)), params)
    inserted = {Interaction.id.python_value(row[0]) for row in cursor}
    new = [item for item in items if item.id in inserted]
    _update_customers(new)
    return changes.append(changes.Kind.CREATED, [(item.organization_id, item.id, item.received_at) for item in new])


# PostgreSQL: one statement for any number of rows, the rows passed as one JSON
# parameter (its text never changes, so psycopg parses it once and the server
# prepares it). JSON, not one array per column: psycopg adapts a list to an array
# item by item in Python, where json.dumps is C.
# A messageId is stored once through message_key (docs/design.md §17): an item is
# inserted only if its key was new, or was received before what is kept (a dropped
# partition's key, deleted later by retention's reclaim: it is taken over).
# The counts come from the rows actually inserted (RETURNING), so a conflict is
# never counted; last_seen_at only ever moves forward. The rows inserted take
# positions in their organizations' streams in item order (``ord``), the streams
# locked in organization order (changes.TAKE, set-based); the main query reads
# them, so they are taken before the customers' counters are updated.
INSERT_AND_COUNT = (
    "WITH v AS (SELECT * FROM json_to_recordset(%%s::json) "
    "AS v(id uuid, organization_id uuid, customer_id uuid, message_id text, \"timestamp\" timestamp, "
    "received_at timestamp, channel text, event_type text, content text, metadata text, "
    "analysis_status text, ord int)), "
    "keyed AS (INSERT INTO message_key AS k (organization_id, message_id, interaction_id, received_at) "
    "SELECT organization_id, message_id, id, received_at FROM v WHERE message_id IS NOT NULL "
    "ON CONFLICT (organization_id, message_id) DO UPDATE SET interaction_id = excluded.interaction_id, "
    "received_at = excluded.received_at WHERE k.received_at < (SELECT kept_from FROM storage_horizon) "
    "RETURNING interaction_id), "
    "inserted AS (INSERT INTO interaction (%(columns)s) SELECT %(columns)s FROM v "
    "WHERE message_id IS NULL OR id IN (SELECT interaction_id FROM keyed) "
    "RETURNING id, organization_id, customer_id, timestamp, received_at), "
    "counted AS (SELECT customer_id, COUNT(*) AS n, MAX(timestamp) AS newest "
    "FROM inserted GROUP BY customer_id ORDER BY customer_id), "
    "updated AS (UPDATE customer SET interaction_count = interaction_count + counted.n, "
    "last_seen_at = CASE WHEN last_seen_at IS NULL OR last_seen_at < counted.newest "
    "THEN counted.newest ELSE last_seen_at END "
    "FROM counted WHERE customer.id = counted.customer_id), "
    "per_organization AS (SELECT organization_id, COUNT(*) AS n FROM inserted GROUP BY organization_id), "
    "advanced AS (INSERT INTO change_stream AS s (organization_id, position, oldest) "
    "SELECT organization_id, n, 1 FROM per_organization ORDER BY organization_id "
    "ON CONFLICT (organization_id) DO UPDATE SET position = s.position + excluded.position "
    "RETURNING s.organization_id, s.position AS last), "
    "numbered AS (SELECT inserted.id, inserted.organization_id, inserted.received_at, advanced.last "
    "- per_organization.n + row_number() OVER (PARTITION BY inserted.organization_id ORDER BY v.ord) "
    "AS position FROM inserted JOIN v ON v.id = inserted.id "
    "JOIN advanced ON advanced.organization_id = inserted.organization_id "
    "JOIN per_organization ON per_organization.organization_id = inserted.organization_id), "
    "recorded AS (INSERT INTO change (organization_id, position, kind, subject, recorded_at, subject_at) "
    "SELECT organization_id, position, %(kind)d, id, received_at, received_at FROM numbered) "
    "SELECT id, position FROM numbered"
    % {"columns": ", ".join(COLUMNS), "kind": changes.Kind.CREATED})


def _insert_and_count_postgres(items):
    """PostgreSQL: the insert, the counter update and the changes as one statement
    (one round trip, atomic on its own); returns {id inserted: its position}."""
    if not items:
        return {}
    order = {item.id: n for n, item in enumerate(items)}
    rows = json.dumps([{**dict(zip(COLUMNS, _values(item), strict=True)), "ord": order[item.id]}
                       for item in _in_key_order(items)],
                      ensure_ascii=False, default=datetime.datetime.isoformat)
    return dict(db.execute_sql(INSERT_AND_COUNT, [rows]).fetchall())


def _stored_ids(items):
    """Map (organization, message_id) to the id already stored, for conflicting items."""
    return STORED[db.dialect](items) if items else {}


def _stored_postgres(items):
    """From ``message_key``, where each messageId kept has its row."""
    rows = db.execute_sql(
        "SELECT organization_id, message_id, interaction_id FROM message_key "
        "WHERE organization_id = ANY(%s::uuid[]) AND message_id = ANY(%s::text[]) "
        "AND received_at >= COALESCE((SELECT kept_from FROM storage_horizon), '-infinity')",
        [list({str(i.organization_id) for i in items}), list({i.message_id for i in items})]).fetchall()
    return {(org, message_id): id_ for org, message_id, id_ in rows}


def _stored_sqlite(items):
    """From ``interaction``'s unique index."""
    query = (Interaction
             .select(Interaction.organization, Interaction.message_id, Interaction.id)
             .where(Interaction.organization.in_({i.organization_id for i in items})
                    & Interaction.message_id.in_({i.message_id for i in items}))
             .tuples())
    return {(org, message_id): id_ for org, message_id, id_ in query}


@functools.lru_cache(maxsize=256)
def _update_sql(customers):
    return ("UPDATE customer SET interaction_count = interaction_count + v.column2, "
            "last_seen_at = CASE WHEN last_seen_at IS NULL OR last_seen_at < v.column3 "
            "THEN v.column3 ELSE last_seen_at END "
            "FROM (VALUES %s) AS v WHERE customer.id = v.column1"
            % ", ".join(["(?, ?, ?)"] * customers))


def _update_customers(items):
    """SQLite: one UPDATE for all customers: count += n, last_seen_at = max(it, newest)."""
    if not items:
        return
    per_customer = defaultdict(list)
    for item in items:
        per_customer[item.customer_id].append(item.timestamp)
    params = []
    for customer_id, stamps in per_customer.items():
        params += [Customer.id.db_value(customer_id), len(stamps),
                   Customer.last_seen_at.db_value(max(stamps))]
    db.execute_sql(_update_sql(len(per_customer)), params)


# What differs between the databases (models.Dialect): how a group is written, and
# where the ids of messageIds already stored are found.
WRITE = {POSTGRES: _write_postgres, SQLITE: _write_sqlite}
STORED = {POSTGRES: _stored_postgres, SQLITE: _stored_sqlite}
