"""The database: a proxy bound at start-up, the models, connection handling.

One code path for SQLite and PostgreSQL. Timestamps are stored as naive UTC;
JSON documents (traits, metadata) as text we serialise ourselves, so a value
reads back byte for byte the same on both databases.
"""
import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import threading
import uuid
from urllib.parse import urlparse

from peewee import (
    BigIntegerField,
    BooleanField,
    CharField,
    CompositeKey,
    DatabaseProxy,
    DateTimeField,
    DoubleField,
    ForeignKeyField,
    IntegerField,
    Model,
    SmallIntegerField,
    SqliteDatabase,
    TextField,
    UUIDField,
)
from playhouse.db_url import parse as parse_db_url
from playhouse.migrations import Runner
from playhouse.pool import PooledPostgresqlDatabase

db = DatabaseProxy()


# Random UUIDs (version 4), as uuid.uuid4 makes them, without a system call each:
# uuid.uuid4 reads 16 bytes from os.urandom every time, a system call per
# interaction and per request id. Here the bytes come from os.urandom 4 KiB at a
# time. A forked process starts with an empty buffer, so no two processes ever
# hand out the same bytes.
_BUFFER_BYTES = 4096
_state = {"buffer": b"", "offset": 0}
_lock = threading.Lock()


def _forget():
    _state["buffer"], _state["offset"] = b"", 0


os.register_at_fork(after_in_child=_forget)


def random_uuid():
    """A random UUID (version 4), as uuid.uuid4 makes one, from the buffer above."""
    with _lock:
        offset = _state["offset"]
        if offset + 16 > len(_state["buffer"]):
            _state["buffer"], offset = os.urandom(_BUFFER_BYTES), 0
        _state["offset"] = offset + 16
        return uuid.UUID(bytes=_state["buffer"][offset:offset + 16], version=4)


def sentiment(label, score):
    """An interaction's sentiment as the API and the events show it: ``{"label",
    "score"}`` once analysed (its two columns), else None."""
    return None if label is None else {"label": label, "score": score}


def utcnow():
    """The current time as naive UTC, the form every timestamp is stored in."""
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


# Seconds a thread waits for a free pooled connection before giving up (503).
POOL_WAIT = 5


def make_database(url, pool_size=10, **connect_params):
    """Build the peewee database for a DATABASE_URL (sqlite:/// or postgresql://).

    PostgreSQL connections come from a pool of at most ``pool_size`` per process
    (DB_POOL_SIZE); a thread that finds it empty waits up to POOL_WAIT seconds.
    ``connect_params`` go to the driver (the URL's own query parameters win).
    """
    scheme = urlparse(url).scheme
    if scheme == "sqlite":
        database = QueuedWritersSqliteDatabase(
            parse_db_url(url)["database"],
            # WAL lets readers run beside the writer; IMMEDIATE takes the write
            # lock at BEGIN so a transaction never fails half-way on upgrade;
            # the 30 s busy timeout lets writers that do not queue (below) wait.
            pragmas={"journal_mode": "wal", "synchronous": "normal", "foreign_keys": 1},
            lock_type="IMMEDIATE",
            timeout=30,
            returning_clause=True,
        )
        database.dialect = SQLITE
        return database
    if scheme in ("postgres", "postgresql"):
        params = {**connect_params, **parse_db_url(url)}
        database = PooledPostgresqlDatabase(params.pop("database"), max_connections=pool_size,
                                            stale_timeout=300, timeout=POOL_WAIT, **params)
        database.dialect = POSTGRES
        return database
    raise ValueError("DATABASE_URL must be sqlite:/// or postgresql://, not %r" % url)


class QueuedWritersSqliteDatabase(SqliteDatabase):
    """SQLite shared by several processes, whose write transactions queue on a lock
    file (flock) before BEGIN IMMEDIATE.

    SQLite's own busy handler polls for the write lock with growing sleeps and
    favours no one: with two gunicorn workers committing many groups a second,
    some commits waited far longer than the others (docs/BENCHMARKS.md). A
    blocked flock is woken the moment the lock is free. Each thread has its own lock
    file descriptor: flock excludes open files, not processes.
    """

    def __init__(self, database, **kwargs):
        super().__init__(database, **kwargs)
        self._lock_path = None if database in ("", ":memory:") else database + "-writers.lock"
        self._lock_files = threading.local()

    def begin(self, lock_type=None):
        lock = self._writer_lock()
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            super().begin(lock_type)
        except BaseException:
            self._unlock()
            raise

    def commit(self):
        try:
            super().commit()
        finally:
            self._unlock()

    def rollback(self):
        try:
            super().rollback()
        finally:
            self._unlock()

    def _writer_lock(self):
        if self._lock_path is None:
            return None
        lock = getattr(self._lock_files, "file", None)
        if lock is None or getattr(self._lock_files, "pid", None) != os.getpid():
            lock = self._lock_files.file = open(self._lock_path, "a")
            self._lock_files.pid = os.getpid()
        return lock

    def _unlock(self):
        lock = getattr(self._lock_files, "file", None)
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_UN)


def close_all(database):
    """Close ``database``'s connections: all of a pool's, or this thread's."""
    if isinstance(database, PooledPostgresqlDatabase):
        database.close_all()
    else:
        database.close()


@dataclasses.dataclass(frozen=True)
class Dialect:
    """What differs between the two databases, asked in one place: the bound
    database's ``db.dialect`` (make_database sets it).

    Statements that differ are kept in pairs keyed by dialect (``{POSTGRES: ...,
    SQLITE: ...}[db.dialect]``); the rest asks what the database can do."""
    name: str
    param: str  # the driver's placeholder
    # Rows, and named locks, are locked one by one (FOR UPDATE, advisory locks);
    # SQLite locks the whole database at BEGIN IMMEDIATE, so it needs neither.
    row_locks: bool
    # interaction is range-partitioned, its messageIds kept in message_key (§17).
    partitions: bool

    def sql(self, text):
        """``text`` written with %s placeholders, in this driver's."""
        return text if self.param == "%s" else text.replace("%s", self.param)

    def locked(self, query):
        """A peewee SELECT that locks its rows FOR UPDATE where rows are locked."""
        return query.for_update() if self.row_locks else query


POSTGRES = Dialect("postgres", "%s", row_locks=True, partitions=True)
SQLITE = Dialect("sqlite", "?", row_locks=False, partitions=False)


def uuid_text(stored):
    """A UUID column's value, read with raw SQL, as canonical text: SQLite keeps 32
    hex digits; PostgreSQL gives a UUID, or its text where the query casts it."""
    if isinstance(stored, str) and len(stored) == 32:
        return "%s-%s-%s-%s-%s" % (stored[:8], stored[8:12], stored[12:16], stored[16:20], stored[20:])
    return str(stored)


@contextlib.contextmanager
def one_at_a_time(lock_name):
    """Hold the session advisory lock ``lock_name`` for the block, across its
    transactions (one retention run, one conversion at a time); SQLite: nothing is
    needed, its writers take turns."""
    if not db.dialect.row_locks:
        yield
        return
    db.execute_sql("SELECT pg_advisory_lock(hashtext(%s))", [lock_name])
    try:
        yield
    finally:
        db.execute_sql("SELECT pg_advisory_unlock(hashtext(%s))", [lock_name])


def release_connection():
    """Give this thread's connection back (to the pool) before a long wait."""
    if not db.is_closed() and db.transaction_depth() == 0:
        db.close()


@contextlib.contextmanager
def connection(database=db):
    """A connection of ``database`` for a short piece of work: this thread's open
    one, or one opened (taken from the pool) for the duration and given back after."""
    if not database.is_closed():
        yield
        return
    with database.connection_context():
        yield


class JSONTextField(TextField):
    """A JSON document kept as our own serialisation, identical on every database."""

    def db_value(self, value):
        if value is None:
            return None
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)

    def python_value(self, value):
        return None if value is None else json.loads(value)


class BaseModel(Model):
    class Meta:
        database = db
        legacy_table_names = False


class Organization(BaseModel):
    id = UUIDField(primary_key=True, default=uuid.uuid4)
    name = CharField(max_length=200)
    created_at = DateTimeField(default=utcnow)


class ApiKey(BaseModel):
    """An API key; only its SHA-256 is kept. ``prefix`` identifies it to humans."""
    organization = ForeignKeyField(Organization, backref="api_keys", on_delete="CASCADE")
    prefix = CharField(max_length=32, index=True)
    key_hash = CharField(max_length=64, unique=True)
    scopes = CharField(max_length=64)
    created_at = DateTimeField(default=utcnow)
    revoked = BooleanField(default=False)


class Customer(BaseModel):
    id = UUIDField(primary_key=True, default=uuid.uuid4)
    organization = ForeignKeyField(Organization, backref="customers", on_delete="CASCADE")
    external_id = CharField(max_length=255, null=True)
    name = CharField(max_length=255, null=True)
    email = CharField(max_length=320, null=True)
    traits = JSONTextField(default=dict)
    created_at = DateTimeField(default=utcnow)
    last_seen_at = DateTimeField(null=True)
    interaction_count = IntegerField(default=0)

    class Meta:
        indexes = ((("organization", "external_id"), True),)


# An interaction's analysis_status (DESIGN §7): PENDING until analysed, then
# DONE (with a sentiment), SKIPPED (no text to read) or FAILED (with analysis_error).
PENDING, DONE, SKIPPED, FAILED = "pending", "done", "skipped", "failed"


class Interaction(BaseModel):
    id = UUIDField(primary_key=True, default=uuid.uuid4)
    # No index of their own: each leads a composite index below (migration 0003).
    organization = ForeignKeyField(Organization, on_delete="CASCADE", index=False)
    customer = ForeignKeyField(Customer, backref="interactions", on_delete="CASCADE", index=False)
    message_id = CharField(max_length=128, null=True)
    timestamp = DateTimeField()
    received_at = DateTimeField(default=utcnow)
    channel = CharField(max_length=16)
    event_type = CharField(max_length=100)
    content = TextField(null=True)
    metadata = JSONTextField(default=dict)
    analysis_status = CharField(max_length=8, default=PENDING)
    sentiment_label = CharField(max_length=8, null=True)
    sentiment_score = DoubleField(null=True)
    analysis_error = TextField(null=True)
    analyzed_at = DateTimeField(null=True)

    @property
    def sentiment(self):
        return sentiment(self.sentiment_label, self.sentiment_score)

    class Meta:
        indexes = (
            (("organization", "message_id"), True),
            # GET /api/interactions: newest first, keyset on (timestamp, id).
            (("organization", "timestamp", "id"), False),
            (("customer", "timestamp", "id"), False),
            # The analysis sweep and `analysis retry`.
            (("analysis_status", "received_at"), False),
        )


# The analysis backlog's fair shares (ingest/auth.py, Backlog): pending rows only, by organization.
Interaction.add_index(Interaction.organization, name="interaction_pending_organization",
                      where=Interaction.analysis_status == PENDING)


class Erasure(BaseModel):
    """An erased customer's external id (its SHA-256 only) and when (DESIGN §15)."""
    organization = ForeignKeyField(Organization, on_delete="CASCADE")
    external_id_hash = CharField(max_length=64)
    erased_at = DateTimeField()

    class Meta:
        indexes = ((("organization", "external_id_hash"), True),)


class ChangeStream(BaseModel):
    """An organization's change feed (DESIGN §16): the last position given out, and
    the oldest position still kept. Writers take positions by updating this row in
    their transaction, so an organization's changes commit in position order."""
    organization = ForeignKeyField(Organization, primary_key=True, on_delete="CASCADE")
    position = BigIntegerField(default=0)
    oldest = BigIntegerField(default=1)


class Change(BaseModel):
    """One committed change of an organization: its position, its kind (ingest/changes.py)
    and the interaction or customer it is about."""
    organization_id = UUIDField()
    position = BigIntegerField()
    kind = SmallIntegerField()
    subject = UUIDField()
    recorded_at = DateTimeField(default=utcnow)
    subject_at = DateTimeField(null=True)  # the received_at of the interaction it is about (its partition)

    class Meta:
        primary_key = CompositeKey("organization_id", "position")


class MessageKey(BaseModel):
    """PostgreSQL only (migration 0006): which interaction holds each messageId of an
    organization. interaction is partitioned there, and a unique index on it would have
    to include received_at; SQLite keeps the unique index on interaction (docs/design.md
    §17). Written in ingest's statement (ingest/store.py), as raw SQL."""
    organization_id = UUIDField()
    message_id = CharField(max_length=128)
    interaction_id = UUIDField()
    received_at = DateTimeField(index=True)  # a dropped partition's keys go by this range

    class Meta:
        primary_key = CompositeKey("organization_id", "message_id")


class StorageHorizon(BaseModel):
    """PostgreSQL only (migration 0006): one row, id 1, once retention dropped a
    partition: nothing received before ``kept_from`` is kept, so a message key older
    than that points at nothing (ingest/store.py takes it over)."""
    id = IntegerField(primary_key=True)
    kept_from = DateTimeField()


def migrate(partition_interval="month", convert_up_to=None):
    """Create or upgrade the schema with the scripts in migrations/ (idempotent);
    on PostgreSQL, partition ``interaction`` if it holds at most ``convert_up_to``
    rows (default: partitions.INLINE_ROWS; more waits for `flask migrate`) and
    create its partitions ahead (ingest/partitions.py).

    Returns the names of the migrations applied now.
    """
    from ingest import partitions

    directory = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations")
    with db.connection_context():
        applied = Runner(db.obj, directory).up()
        partitions.upgrade(partition_interval, limit=partitions.INLINE_ROWS if convert_up_to is None
                           else convert_up_to)
    return applied
