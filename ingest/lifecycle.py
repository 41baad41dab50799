"""A customer's lifecycle: creation (DESIGN §5), erasure of a customer and
retention of interactions (DESIGN §15).

Erasure and retention delete under the same rule as ingest: at every moment seen from outside a
transaction, a customer's ``interaction_count`` and ``last_seen_at`` agree with
its interactions (§4). Each transaction first locks the customers it touches
(PostgreSQL; SQLite has one writer at a time), so an ingest for them either
committed before (and is counted here) or waits and counts itself after.

The erasure of an external id and the creation of a customer for it from a
Segment event are serialized too (``external_ids_locked``), so that whether the
event is older than the erasure is decided with the erasure either committed
or not begun (ingest/segment.py).
"""
import contextlib
import datetime
import functools
import hashlib
import logging
import time
import uuid
from collections import Counter, namedtuple

from peewee import OperationalError

from ingest import changes, partitions, schemas
from ingest.reads import find_customer
from models import POSTGRES, SQLITE, Customer, Erasure, Interaction, Organization, db, one_at_a_time, utcnow

log = logging.getLogger(__name__)

RECLAIM_ROWS = 10_000  # rows out of reach (changes, message keys) deleted per transaction
RETENTION_ROWS = 1000  # interactions deleted per transaction: ingest never waits long


def create_customer(organization_id, payload):
    """Create a customer; returns (customer, created). An existing externalId wins."""
    data = schemas.customer_in.load(payload)
    if data["external_id"] is None:
        return Customer.create(organization=organization_id, **data), True
    existing = find_customer(organization_id, data["external_id"])
    if existing is not None:
        return existing, False
    created = add_customers(organization_id, [data])
    return find_customer(organization_id, data["external_id"]), bool(created)


def add_customers(organization_id, rows):
    """Insert the customers ``rows`` (Customer fields, each with an external id) of
    ``organization_id``; a row whose external id is taken is skipped, so the
    customer that exists wins, however many requests add it at once. Returns the
    external ids of the customers inserted."""
    return [external_id for (external_id,) in Customer.insert_many(
        [{**row, "organization": organization_id} for row in rows])
        .on_conflict(conflict_target=[Customer.organization, Customer.external_id], action="nothing")
        .returning(Customer.external_id).tuples().execute()]


def external_id_hash(external_id):
    return hashlib.sha256(external_id.encode("utf-8")).hexdigest()


def erase_customer(organization_id, customer_id):
    """Delete the customer and every interaction of it, in one transaction.

    Returns the position of its ``customer.deleted`` change, or None when the
    organization has no such customer. The external id is remembered (hashed)
    with the time, so that an older Segment event that arrives late does not
    bring the customer back (ingest/segment.py); it is locked as in
    ``external_ids_locked`` from before the customer is deleted. The
    organization's change stream is taken first, before any row lock, as every
    writer of changes takes it (ingest/changes.py).
    """
    with db.atomic() as transaction:
        position = changes.take(organization_id, 1)
        customers = _locked(Customer.select(Customer.id, Customer.external_id).where(
            (Customer.id == customer_id) & (Customer.organization == organization_id)))
        if not customers:
            transaction.rollback()  # the position is not used
            return None
        customer = customers[0]
        if customer.external_id is not None:
            _lock_external_ids(organization_id, [customer.external_id])
        forget_message_ids(Interaction.customer == customer.id)
        Interaction.delete().where(Interaction.customer == customer.id).execute()
        Customer.delete().where(Customer.id == customer.id).execute()
        if customer.external_id is not None:
            now = utcnow()
            (Erasure.insert(organization=organization_id, erased_at=now,
                            external_id_hash=external_id_hash(customer.external_id))
             .on_conflict(conflict_target=[Erasure.organization, Erasure.external_id_hash],
                          update={Erasure.erased_at: now})
             .execute())
        changes.record([(organization_id, position, changes.Kind.CUSTOMER_DELETED, customer.id, None)])
    return position


def forget_message_ids(which):
    """PostgreSQL: delete the ``message_key`` rows of the interactions ``which``
    selects, which are about to be deleted, so that their messageIds can be
    stored again, as when the unique index held them (ingest/store.py)."""
    if db.dialect.partitions:
        rows = Interaction.select(Interaction.organization, Interaction.message_id).where(
            which & Interaction.message_id.is_null(False)).tuples()
        pairs = [(str(org), message_id) for org, message_id in rows]
        if pairs:
            db.execute_sql("DELETE FROM message_key AS k USING unnest(%s::uuid[], %s::text[]) AS d(o, m) "
                           "WHERE k.organization_id = d.o AND k.message_id = d.m",
                           [[o for o, _ in pairs], [m for _, m in pairs]])


@contextlib.contextmanager
def external_ids_locked(organization_id, external_ids):
    """A transaction in which no customer of these external ids is erased: an
    erasure of one of them committed before it began, or waits for its end.

    SQLite: a transaction takes the database's write lock at BEGIN (BEGIN IMMEDIATE,
    models.py), so every write transaction is serialized with every other."""
    with db.atomic():
        _lock_external_ids(organization_id, external_ids)
        yield


# Lock keys per organization: how many advisory locks a transaction may hold, however
# many new external ids a batch brings (they share PostgreSQL's lock table, sized by
# max_locks_per_transaction); ids of one bucket merely wait for each other.
LOCK_BUCKETS = 64


def _lock_external_ids(organization_id, external_ids):
    """PostgreSQL: take the transaction-scoped advisory locks of ``external_ids``,
    in key order, so that two transactions locking several never deadlock.

    They are taken before any row lock by creation, and by erasure after only the
    customer's row, which a creation never waits for (it reads and inserts
    customers, ON CONFLICT DO NOTHING, and locks none)."""
    if not db.dialect.row_locks:
        return
    keys = list({_lock_key(organization_id, external_id) for external_id in external_ids})
    # pg_advisory_xact_lock is volatile, so it is evaluated row by row above the sort.
    db.execute_sql("SELECT pg_advisory_xact_lock(key) FROM unnest(%s::bigint[]) AS key ORDER BY key",
                   [keys])


def _lock_key(organization_id, external_id):
    bucket = int(external_id_hash(external_id), 16) % LOCK_BUCKETS
    digest = hashlib.sha256(b"%s:%d" % (uuid.UUID(str(organization_id)).bytes, bucket)).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def erased_since(organization_id, external_ids):
    """{external id: when it was last erased} for those of ``external_ids`` that were."""
    hashes = {external_id_hash(external_id): external_id for external_id in external_ids}
    if not hashes:
        return {}
    rows = (Erasure.select(Erasure.external_id_hash, Erasure.erased_at)
            .where((Erasure.organization == organization_id)
                   & Erasure.external_id_hash.in_(list(hashes))).tuples())
    return {hashes[digest]: erased_at for digest, erased_at in rows}


def _locked(query):
    """The rows of ``query``, locked FOR UPDATE on PostgreSQL (in id order, so two
    transactions locking the same customers never deadlock)."""
    return list(db.dialect.locked(query.order_by(Customer.id)))


# Retention ------------------------------------------------------------------

def retention_cutoff(days):
    """The event time before which interactions are ``days`` days old."""
    return utcnow() - datetime.timedelta(days=days)


def count_expired(cutoff, organization_id=None):
    """How many interactions ``apply_retention`` would delete (for --dry-run)."""
    return Interaction.select().where(_expired(cutoff, organization_id)).count()


def apply_retention(cutoff, organization_id=None, chunk=RETENTION_ROWS, progress=None):
    """Delete the interactions whose event time is before ``cutoff`` (naive UTC),
    correcting their customers' counters as they go. On a partitioned table (and
    for all organizations), first drop every partition received wholly before
    ``cutoff`` less the 24 hours an event time may run ahead (so every event time
    in it is before ``cutoff``); then delete the rest oldest first, ``chunk`` per
    transaction. ``progress(rows)`` is called as rows go. Returns a Retention."""
    with one_at_a_time("ingest retention"):  # a partition's rows are counted before it is dropped
        dropped = deleted = 0
        if organization_id is None and partitions.is_partitioned():
            for partition in partitions.expired(cutoff - schemas.MAX_FUTURE):
                gone = _drop_partition(partition)
                dropped, deleted = dropped + 1, deleted + gone
                if progress:
                    progress(gone)
        organizations = ([organization_id] if organization_id else
                         [org for (org,) in Organization.select(Organization.id).tuples()])
        for organization in organizations:
            while True:
                found, count = _retried(functools.partial(_delete_chunk, cutoff, organization, chunk))
                deleted += count
                if progress:
                    progress(count)
                if found < chunk:
                    break
    return Retention(dropped, deleted)


Retention = namedtuple("Retention", "partitions_dropped deleted")


def reclaim(limit=None):
    """Delete what retention put out of reach, up to ``limit`` rows of each kind
    (None: all): {"changes": rows of pruned changes, "message_keys": keys of dropped
    partitions}. Nothing depends on it but the space they take."""
    return {"changes": changes.reclaim(limit, RECLAIM_ROWS),
            "message_keys": partitions.reclaim_keys(limit, RECLAIM_ROWS) if partitions.is_partitioned() else 0}


def _retried(transaction, attempts=3):
    """``transaction()``, run again if it failed transiently: a chunk locks its
    customers in id order, but a concurrent ingest locks them in the order its join
    meets them, and PostgreSQL breaks such a deadlock by failing one of the two."""
    for attempt in range(1, attempts + 1):
        try:
            return transaction()
        except OperationalError:
            if attempt == attempts:
                raise
            log.warning("retention chunk failed, retrying", exc_info=True, extra={"attempt": attempt})
            time.sleep(0.05 * 2 ** attempt)


def _drop_partition(partition):
    """Drop a partition and take its rows off their customers' counters, in one
    transaction; returns its rows. They are counted before the table is locked: of
    the writers that could change that count only an erasure remains (ingest writes
    newer partitions; this run holds the retention lock), and it deletes the customer
    with its rows, so its count is never applied. The ACCESS EXCLUSIVE lock is held
    only for the detach, the drop and the counters."""
    counts = partitions.rows_per_customer(partition)
    with db.atomic():
        db.execute_sql("LOCK TABLE interaction IN ACCESS EXCLUSIVE MODE")
        partitions.drop(partition)
        partitions.keep_from(partition.end)
        if counts:
            _uncount(Counter(counts))
    return sum(counts.values())


def _expired(cutoff, organization_id):
    condition = Interaction.timestamp < cutoff
    return condition if organization_id is None else condition & (
        Interaction.organization == organization_id)


def _delete_chunk(cutoff, organization_id, chunk):
    """One transaction: the ``chunk`` oldest expired interactions of the
    organization, and their customers' counters. Returns how many were found and
    how many deleted (fewer if some were erased meanwhile).

    Deleting oldest first keeps ``last_seen_at`` (the newest) unchanged until a
    customer's last interaction goes; it is recomputed anyway, from what remains."""
    with db.atomic():
        rows = list(Interaction.select(Interaction.id, Interaction.customer, Interaction.received_at)
                    .where(_expired(cutoff, organization_id))
                    .order_by(Interaction.timestamp, Interaction.id).limit(chunk).tuples())
        if not rows:
            return 0, 0
        _locked(Customer.select(Customer.id).where(Customer.id.in_({c for _, c, _ in rows})))
        # The received_at range keeps the lookups by id to the partitions that hold them.
        these = Interaction.id.in_([i for i, _, _ in rows]) & Interaction.received_at.between(
            min(at for _, _, at in rows), max(at for _, _, at in rows))
        forget_message_ids(these)
        gone = Counter(customer for (customer,) in Interaction.delete().where(these)
                       .returning(Interaction.customer).tuples().execute())
        if gone:
            _uncount(gone)
        return len(rows), sum(gone.values())


def _uncount(gone):
    """One UPDATE for all customers: count -= n, last_seen_at = the newest left."""
    customers = list(gone)
    db.execute_sql(*UNCOUNT[db.dialect](customers, gone))


_NEWEST_LEFT = "(SELECT max(i.timestamp) FROM interaction AS i WHERE i.customer_id = customer.id)"
UNCOUNT_POSTGRES = (
    "UPDATE customer SET interaction_count = interaction_count - d.n, last_seen_at = "
    + _NEWEST_LEFT + " FROM unnest(%s::uuid[], %s::int[]) AS d(id, n) WHERE customer.id = d.id")
UNCOUNT_SQLITE = (
    "UPDATE customer SET interaction_count = interaction_count - v.column2, last_seen_at = "
    + _NEWEST_LEFT + " FROM (VALUES %s) AS v WHERE customer.id = v.column1")
UNCOUNT = {  # (sql, params) for ``customers`` and how many each lost
    POSTGRES: lambda customers, gone: (UNCOUNT_POSTGRES, [[Customer.id.db_value(c) for c in customers],
                                                          [gone[c] for c in customers]]),
    SQLITE: lambda customers, gone: (UNCOUNT_SQLITE % ", ".join(["(?, ?)"] * len(customers)),
                                     [value for c in customers for value in (Customer.id.db_value(c), gone[c])]),
}
