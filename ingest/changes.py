"""The change feed (DESIGN §16): every committed change of an organization has a
position in that organization's stream, and a reader that asks for what follows
a position it has seen never misses a change that commits later.

Positions come from the organization's ``change_stream`` row, which every
writer (ingest, analysis, erasure) updates in the transaction that makes the
change. The row stays locked until that transaction ends, so the next writer of
the organization takes its positions only after the previous one committed:
an organization's changes become visible in position order, and a reader that
saw position N can never later find a smaller one appear (docs/design.md §16
has the argument). SQLite has one writer at a time anyway.

A change row holds only what the change is about (an interaction or a
customer); its ``data`` is read from the interaction when the change is read,
exactly as the socket event carried it. A change whose interaction is gone
since (erased, or deleted by retention) is skipped: the feed never shows what
no longer exists. Cursors are opaque: a position and a check tied to the
organization, so another organization's or a forged one is refused.
"""
import base64
import binascii
import datetime
import functools
import hashlib
import json
import struct
import uuid
from enum import IntEnum, StrEnum

from peewee import fn

from ingest import replica
from models import FAILED, PENDING, POSTGRES, SQLITE, Change, ChangeStream, db, sentiment, utcnow, uuid_text


class Kind(IntEnum):
    """The kinds of change, as the change table stores them. An analysis that failed
    for good is a kind of its own: the interaction's row shows only its latest
    analysis, and a failure can be followed by a success (`flask analysis retry`),
    which must not rewrite what the failure said."""
    CREATED = 1
    ANALYZED = 2
    CUSTOMER_DELETED = 3
    ANALYSIS_FAILED = 4


class EventType(StrEnum):
    """A change's ``type`` on the wire: in its socket event and in /api/changes."""
    CREATED = "interaction.created"
    ANALYZED = "interaction.analyzed"
    CUSTOMER_DELETED = "customer.deleted"


TYPES = {Kind.CREATED: EventType.CREATED, Kind.ANALYZED: EventType.ANALYZED,
         Kind.CUSTOMER_DELETED: EventType.CUSTOMER_DELETED, Kind.ANALYSIS_FAILED: EventType.ANALYZED}
MAX_PAGE = 1000
_CHECK_BYTES = 8


class BadCursor(ValueError):
    """Not a cursor of this organization's stream."""


class ExpiredCursor(Exception):
    """A cursor older than what is kept; ``oldest`` is the oldest one still good."""

    def __init__(self, oldest):
        super().__init__("the changes after this cursor are no longer kept")
        self.oldest = oldest


# Cursors ---------------------------------------------------------------------

@functools.lru_cache(maxsize=4096)
def cursors(organization_id):
    """A function giving the opaque cursor of a position in the organization's
    stream: its 8 bytes and the first bytes of SHA-256(organization, position). The
    hash of the organization is taken once, for the many cursors of a page or of a
    committed group, and kept for the organization's next ones."""
    prefix = hashlib.sha256(uuid.UUID(str(organization_id)).bytes)

    def cursor_of(position):
        packed = struct.pack(">Q", position)
        check = prefix.copy()
        check.update(packed)
        return base64.urlsafe_b64encode(packed + check.digest()[:_CHECK_BYTES]).rstrip(b"=").decode()

    return cursor_of


def cursor(organization_id, position):
    """The opaque cursor of ``position`` in the organization's stream."""
    return cursors(organization_id)(position)


def position_of(organization_id, text):
    """The position a cursor of this organization stands for; BadCursor otherwise."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError, TypeError):
        raise BadCursor(text) from None
    if len(raw) != 8 + _CHECK_BYTES:
        raise BadCursor(text)
    position = struct.unpack(">Q", raw[:8])[0]
    if cursor(organization_id, position) != text:
        raise BadCursor(text)
    return position


def event(kind, organization_id, position, data):
    """A change as the socket sends it and /api/changes lists it."""
    return {"type": TYPES[kind], "cursor": cursor(organization_id, position), "data": data}


# Writing (inside the writer's transaction) -------------------------------------

# Positions for ``n`` changes of an organization: its stream row advanced by n and
# locked until the transaction ends. Returns the last position taken.
TAKE = ("INSERT INTO change_stream (organization_id, position, oldest) VALUES (%s, %s, 1) "
        "ON CONFLICT (organization_id) DO UPDATE SET position = change_stream.position + excluded.position "
        "RETURNING position")


def take(organization_id, count):
    """Take ``count`` positions of the organization's stream; returns the first."""
    params = [ChangeStream.organization.db_value(organization_id), count]
    last = db.execute_sql(db.dialect.sql(TAKE), params).fetchone()[0]
    return last - count + 1


def lock(organization_ids):
    """Lock the organizations' streams now, in a stable order (PostgreSQL): a
    writer that will take positions after locking rows of its own takes this lock
    first, as the erasure does, so that the two never wait for each other in turn."""
    if db.dialect.row_locks and organization_ids:
        db.execute_sql("SELECT 1 FROM change_stream WHERE organization_id = ANY(%s::uuid[]) "
                       "ORDER BY organization_id FOR UPDATE",
                       [sorted(str(organization_id) for organization_id in organization_ids)])


def record(rows):
    """Insert ``rows`` of (organization_id, position, kind, subject, subject_at) as
    changes; ``subject_at`` is the received_at of the interaction it is about, or None."""
    if rows:
        db.execute_sql(*RECORD[db.dialect](rows, utcnow()))


def _record_sqlite(rows, now):
    to_db = Change.subject.db_value
    return record_sql(len(rows)), [
        value for organization_id, position, kind, subject, subject_at in rows
        for value in (to_db(organization_id), position, kind, to_db(subject), now, subject_at)]


@functools.lru_cache(maxsize=256)
def record_sql(rows):
    """SQLite: the INSERT of ``rows`` changes, written out: building it with peewee's
    insert_many for every group cost more than running it (docs/BENCHMARKS.md)."""
    return ('INSERT INTO "change" (organization_id, position, kind, subject, recorded_at, subject_at) VALUES '
            + ", ".join(["(?, ?, ?, ?, ?, ?)"] * rows))


def _record_postgres(rows, now):
    return RECORD_POSTGRES, [now, json.dumps([
        {"o": str(organization_id), "p": position, "k": kind, "s": str(subject),
         "a": None if subject_at is None else subject_at.isoformat()}
        for organization_id, position, kind, subject, subject_at in rows])]


# PostgreSQL: the same text for any number of rows, which come as one JSON parameter.
# psycopg converts a statement's placeholders in Python, and caches that only for
# statements of at most 50 parameters and 4 KiB: a placeholder per value (6 a row)
# was converted again on every call of more than 8 rows.
RECORD_POSTGRES = ('INSERT INTO "change" (organization_id, position, kind, subject, recorded_at, subject_at) '
                   "SELECT o, p, k, s, %s, a FROM json_to_recordset(%s::json) "
                   "AS v(o uuid, p bigint, k smallint, s uuid, a timestamp)")
RECORD = {POSTGRES: _record_postgres, SQLITE: _record_sqlite}


def append(kind, subjects):
    """Give ``subjects`` ((organization_id, subject, subject_at), in their order within
    each organization) the next positions of their organizations' streams, and record
    them as changes of ``kind``, in the caller's transaction; returns {subject: position}.
    (The PostgreSQL ingest does the same inside its one statement: store.INSERT_AND_COUNT.)"""
    by_organization = {}
    for organization_id, subject, subject_at in subjects:
        by_organization.setdefault(organization_id, []).append((subject, subject_at))
    positions, rows = {}, []
    for organization_id in sorted(by_organization, key=str):
        ours = by_organization[organization_id]
        first = take(organization_id, len(ours))
        for position, (subject, subject_at) in enumerate(ours, first):
            positions[subject] = position
            rows.append((organization_id, position, kind, subject, subject_at))
    record(rows)
    return positions


# Retention ---------------------------------------------------------------------

def prune(before, organization_id=None):
    """Put the changes recorded before ``before`` (naive UTC), of one organization or
    of all, out of reach: each stream's oldest position moves past them, so that a
    cursor among them is answered 410, never skipped silently. Returns how many were
    put out of reach; ``reclaim`` deletes their rows later."""
    organizations = ([organization_id] if organization_id else
                     [org for (org,) in ChangeStream.select(ChangeStream.organization).tuples()])
    return sum(_prune(organization, before) for organization in organizations)


def _prune(organization_id, before):
    """Out of reach: the changes before the first one (from the oldest kept on)
    recorded at ``before`` or later. The walk reads the primary key from the oldest
    kept and stops there: what it reads is about what it prunes, not the stream."""
    ours = Change.organization_id == organization_id
    oldest = stream(organization_id)[1]
    first_kept = (Change.select(Change.position)
                  .where(ours & (Change.position >= oldest) & (Change.recorded_at >= before))
                  .order_by(Change.position).limit(1).scalar())
    last = (first_kept - 1 if first_kept is not None else
            Change.select(fn.MAX(Change.position)).where(ours).scalar())
    if last is None or last < oldest:
        return 0
    (ChangeStream.update(oldest=last + 1)
     .where((ChangeStream.organization == organization_id) & (ChangeStream.oldest < last + 1)).execute())
    return last + 1 - oldest


def reclaim(limit, chunk):
    """Delete the rows of changes out of reach (below their stream's oldest position),
    ``chunk`` a transaction, up to ``limit`` (None: all); returns how many."""
    deleted = 0
    for organization_id, oldest in ChangeStream.select(ChangeStream.organization, ChangeStream.oldest).tuples():
        ours = Change.organization_id == organization_id
        while limit is None or deleted < limit:
            gone = Change.delete().where(ours & Change.position.in_(
                Change.select(Change.position).where(ours & (Change.position < oldest))
                .order_by(Change.position).limit(chunk))).execute()
            deleted += gone
            if gone < chunk:
                break
    return deleted


# Reading -----------------------------------------------------------------------

# A page of changes joined to their interactions. The page is chosen first (a range
# of the primary key), so that only its rows are joined, whatever the planner knows
# of the tables. Raw SQL and raw rows: for a page of 1,000 the query builder and the
# model's conversions cost more than the query itself (docs/BENCHMARKS.md).
_PAGE_COLUMNS = ('SELECT c.position, c.kind, c.subject, i.id, i.customer_id, i.message_id, i.timestamp, '
                 'i.received_at, i.channel, i.event_type, i.content, i.metadata, i.analysis_status, '
                 'i.sentiment_label, i.sentiment_score '
                 'FROM (SELECT position, kind, subject, subject_at FROM "change" '
                 'WHERE organization_id = %s AND position > %s ORDER BY position LIMIT %s) AS c ')
# PostgreSQL: each change looks its interaction up by primary key in the one partition
# its subject_at names (a lateral subquery runs per row, and its LIMIT keeps the planner
# from turning it into a join that reads every partition).
PAGE_POSTGRES = (_PAGE_COLUMNS + 'LEFT JOIN LATERAL (SELECT * FROM "interaction" AS i WHERE i.id = c.subject '
                 'AND i.received_at = c.subject_at LIMIT 1) AS i ON true ORDER BY c.position')
PAGE_SQLITE = (_PAGE_COLUMNS + 'LEFT JOIN "interaction" AS i ON i.id = c.subject AND i.received_at = c.subject_at '
               'ORDER BY c.position')
PAGE = {POSTGRES: PAGE_POSTGRES, SQLITE: PAGE_SQLITE}
STREAM = "SELECT position, oldest FROM change_stream WHERE organization_id = %s"


def _sql(query, *params, database=db):
    """Rows of a query written with %s placeholders, on either database (the primary,
    unless ``database`` is the replica)."""
    return database.execute_sql(db.dialect.sql(query), params).fetchall()


def positions(organization_ids):
    """{organization: the last position given out} for ``organization_ids`` (text)."""
    return {str(organization): position for organization, position in
            ChangeStream.select(ChangeStream.organization, ChangeStream.position)
            .where(ChangeStream.organization.in_(list(organization_ids))).tuples()}


def stream(organization_id, database=db):
    """(last position given out, oldest kept) of the organization's stream."""
    rows = _sql(STREAM, ChangeStream.organization.db_value(organization_id), database=database)
    return tuple(rows[0]) if rows else (0, 1)


def read(organization_id, after=None, limit=MAX_PAGE):
    """The changes after position ``after`` (None: from the oldest kept), oldest first,
    at most ``limit``: ``(events, last position read)``. ExpiredCursor if changes after
    ``after`` are no longer kept.

    Read from the replica when there is one (ingest/replica.py), all of a page on
    one database. The replica shows a prefix of the stream, never a stream with a
    hole: positions are taken under the stream row's lock and a writer takes
    them only once the previous one committed (see the module's docstring), so
    position N's commit record precedes N+1's in the primary's WAL; the replica
    replays the WAL in that order and each of its snapshots shows exactly the
    transactions whose commit it replayed. So a replica's page is what the
    primary's was a moment ago: every position up to its last one, none skipped
    (a position missing below it is a change whose interaction is gone, on the
    primary too).

    What a replica cannot say is that nothing follows: a page that shows nothing
    may only mean it is behind, and a socket catching up goes live on an empty page
    (ingest/fanout.py, CatchUp), which would skip what the replica had not replayed yet.
    So a page with nothing to show is read from the primary: "nothing after N"
    is only ever the primary's answer, and a cursor ahead of the replica (a
    socket that saw it live) gets what follows from the primary, not an error
    nor a rewind. A reader at the tail thus costs the primary what it did
    without a replica; every page with something in it comes from the replica.

    ``stream`` and ``positions`` stay on the primary: they are what a new socket
    starts from and what tells the feed that a publish was lost, questions about
    what the primary committed, one row each."""
    return replica.read(lambda database: _read(database, organization_id, after, limit),
                        enough=lambda page: bool(page[0]))


def _read(database, organization_id, after, limit):
    """``read`` on ``database``. The rows are read before the oldest position kept:
    retention raises it before it deletes (``prune``), so rows deleted under this
    read show as an expired cursor, never as changes silently skipped."""
    start = stream(organization_id, database)[1] - 1 if after is None else after
    rows = _sql(PAGE[db.dialect], Change.organization_id.db_value(organization_id), start, limit, database=database)
    oldest = stream(organization_id, database)[1]
    if start < oldest - 1:
        if after is not None:
            raise ExpiredCursor(cursor(organization_id, oldest - 1))
        return _read(database, organization_id, None, limit)  # pruned while it read: from the new oldest
    events = [event(row[1], organization_id, row[0], data) for row in rows for data in (_data(row),)
              if data is not None]
    return events, rows[-1][0] if rows else start


def _data(row):
    """The event's data of a change row joined to its interaction (see PAGE_POSTGRES); None
    when the interaction is gone."""
    _, kind, subject, interaction_id, customer_id, message_id, timestamp, received_at, channel, \
        event_type, content, metadata, status, label, score = row
    if kind == Kind.CUSTOMER_DELETED:
        return {"id": uuid_text(subject)}
    if interaction_id is None:
        return None
    if kind == Kind.ANALYZED:
        return analyzed_data(uuid_text(interaction_id), uuid_text(customer_id), status, label, score)
    if kind == Kind.ANALYSIS_FAILED:
        return analyzed_data(uuid_text(interaction_id), uuid_text(customer_id), FAILED, None, None)
    return created_data(uuid_text(interaction_id), uuid_text(customer_id), message_id, timestamp, received_at,
                        channel, event_type, content, json.loads(metadata))


def created_data(interaction_id, customer_id, message_id, timestamp, received_at, channel, event_type,
                 content, metadata):
    """The data of an ``interaction.created`` event: the interaction as the read API
    shows it (schemas.InteractionOut), as it was stored, not yet analysed. The writer
    publishes it and the change feed reads it back; test_properties holds both to
    the read API's dump."""
    return {"id": interaction_id, "customerId": customer_id, "messageId": message_id,
            "timestamp": _instant(timestamp), "receivedAt": _instant(received_at), "channel": channel,
            "eventType": event_type, "content": content, "metadata": metadata,
            "analysisStatus": PENDING, "sentiment": None, "analysisError": None, "analyzedAt": None}


def _instant(value):
    """A timestamp column as the wire has it (schemas.UtcDateTime): SQLite keeps
    ISO 8601 text, PostgreSQL gives a naive datetime; both are UTC."""
    if isinstance(value, str):
        value = datetime.datetime.fromisoformat(value)
    return value.isoformat() + "+00:00"


def created_event(item):
    """The ``interaction.created`` event of a stored interaction (a NewInteraction with
    its position), as its writer publishes it."""
    return event(Kind.CREATED, item.organization_id, item.position, created_data(
        str(item.id), str(item.customer_id), item.message_id, item.timestamp, item.received_at,
        item.channel, item.event_type, item.content, item.metadata))


def analyzed_event(result):
    """The ``interaction.analyzed`` event of an analysis result written
    (analysis.store_results's)."""
    return event(Kind.ANALYZED, result["organization_id"], result["position"], analyzed_data(
        result["id"], result["customer_id"], result["analysis_status"], result["label"], result["score"]))


def analyzed_data(interaction_id, customer_id, status, label, score):
    """The data of an ``interaction.analyzed`` event."""
    return {"id": str(interaction_id), "customerId": str(customer_id), "analysisStatus": status,
            "sentiment": sentiment(label, score)}
