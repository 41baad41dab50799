"""Sentiment analysis of stored interactions with VADER (DESIGN §7).

The task (tasks.analyze) calls ``score`` (one SELECT, then VADER) and hands the
results to its process's ``ResultWriter``, whose thread stores them (``store_results``: one
UPDATE for the whole list) and publishes ``interaction.analyzed``: the next
task's scoring overlaps the last one's write. (A task some of whose items
raised writes the others' results on its own thread, before its retry.) Both touch only interactions still
``pending``, so running a task twice, or for ids another task already did,
changes nothing. ``score_and_store`` does both in the caller's thread.
"""
import collections
import datetime
import functools
import json
import logging
import queue
import re
import time
from collections import defaultdict

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from ingest import changes, metrics
from ingest.events import publish_safely
from ingest.threads import Threads
from models import (
    DONE,
    FAILED,
    PENDING,
    POSTGRES,
    SKIPPED,
    SQLITE,
    Interaction,
    connection,
    db,
    release_connection,
    utcnow,
    uuid_text,
)

log = logging.getLogger(__name__)

# An id column's value as raw SQL reads it (hex text on SQLite, text on PostgreSQL), as a UUID.
to_uuid = Interaction.id.python_value

_analyzer = None


def analyzer():
    """One VADER analyzer per process (loading its lexicon takes ~0.1 s)."""
    global _analyzer
    if _analyzer is None:
        _analyzer = SentimentIntensityAnalyzer()
    return _analyzer


def label_for(compound):
    if compound >= 0.05:
        return "positive"
    if compound <= -0.05:
        return "negative"
    return "neutral"


# What VADER reads of a text: its cost grows with the square of the words it
# sees, and each emoji becomes several words, so a long text is read only up to
# these bounds (docs/BENCHMARKS.md); the sentiment is the opening's.
READ_CHARACTERS = 2000
READ_EMOJI = 200


def readable(content):
    """The part of ``content`` that VADER reads."""
    text = content[:READ_CHARACTERS]
    if len(text) > READ_EMOJI:
        for seen, emoji in enumerate(_emoji_pattern().finditer(text), 1):
            if seen > READ_EMOJI:
                return text[:emoji.start()]
    return text


@functools.lru_cache(maxsize=1)
def _emoji_pattern():
    """The characters VADER reads as emoji (one by one, as it does)."""
    return re.compile("[%s]" % "".join(re.escape(e) for e in analyzer().emojis if len(e) == 1))


def sentiment_of(content):
    """``(status, label, score)`` for a text: ``skipped`` when there is nothing to read."""
    if not (content or "").strip():
        return SKIPPED, None, None
    compound = analyzer().polarity_scores(readable(content))["compound"]
    return DONE, label_for(compound), compound


def score_and_store(ids):
    """Analyse the interactions ``ids`` still pending; returns one result dict
    for each one analysed (those that raised stay pending)."""
    scored, _, _ = score(ids)
    return store_results(scored)


def score(ids, budget=None):
    """Read the interactions ``ids`` still pending and score them (no write yet),
    for at most ``budget`` seconds.

    Returns ``(scored, failed, unread)``: ``[(id, organization_id, (status,
    label, score), received_at)]``; ``{id: exception}`` for those whose analysis raised, so
    that one bad item never costs the others their result; and the ids left
    when the budget ran out.
    """
    scored, failed, unread = [], {}, []
    deadline = None if budget is None else time.monotonic() + budget
    for row_id, org_id, content, status, received_at in _pending_rows(ids):
        if status != PENDING:
            continue
        if deadline is not None and time.monotonic() > deadline:
            unread.append(uuid_text(row_id))
            continue
        try:
            scored.append((row_id, org_id, sentiment_of(content), received_at))
        except Exception as error:
            failed[uuid_text(row_id)] = error
    return scored, failed, unread


def store_results(scored, error=None):
    """Write scores (and ``error``, if any) with one statement, leaving alone rows
    that another task analysed meanwhile, and record an ``interaction.analyzed``
    change for each row written (of its own kind for a failure), in one transaction
    whose organizations' streams are locked first (so an erasure, which takes them
    before it deletes rows, never waits on this one in turn). Returns a result
    ``{"id", "organization_id", "customer_id", "analysis_status", "label", "score",
    "position"}`` for each row written (the ids as text, as events carry them)."""
    if not scored:
        return []
    sql, params = store_statement(scored, error)
    organizations = {org_id for _, org_id, _, _ in scored}
    with db.atomic():
        changes.lock(organizations)
        written = {row_id: (customer_id, received_at)
                   for row_id, customer_id, received_at in db.execute_sql(sql, params).fetchall()}
        positions = changes.append(changes.Kind.ANALYZED if error is None else changes.Kind.ANALYSIS_FAILED, [
            (org_id, to_uuid(row_id), written[row_id][1]) for row_id, org_id, _, _ in scored if row_id in written])
    results = [{"id": uuid_text(row_id), "organization_id": org_id, "customer_id": uuid_text(written[row_id][0]),
                "analysis_status": status, "position": positions[to_uuid(row_id)],
                "label": label, "score": value}
               for row_id, org_id, (status, label, value), _ in scored if row_id in written]
    for status, count in collections.Counter(r["analysis_status"] for r in results).items():
        metrics.ANALYSES.labels(status).inc(count)
    return results


def store_statement(scored, error):
    """(sql, params) of ``store_results``'s UPDATE."""
    return STORE[db.dialect](scored, error)


def _store_postgres(scored, error):
    """The received_at range: only the rows' partitions are read."""
    stamps = [received_at for _, _, _, received_at in scored]
    return STORE_POSTGRES, [error, utcnow(), json.dumps(
        [{"id": row_id, "received_at": received_at.isoformat(), "status": status, "label": label, "score": value}
         for row_id, _, (status, label, value), received_at in scored]), min(stamps), max(stamps)]


def _store_sqlite(scored, error):
    return _store_sqlite_sql(len(scored)), [error, utcnow(), *(
        value for row_id, _, result, _ in scored for value in (row_id, *result))]


def _pending_rows(ids):
    """(id, organization_id, content, analysis_status, received_at) of ``ids``, by
    primary key only: a filter on the status lets PostgreSQL pick the status index
    and scan every pending row, which grows with the backlog. Ids stay as the
    database gives them (they go back to it); organizations become their canonical
    text."""
    ids = [Interaction.id.db_value(i) for i in ids]
    sql, params = PENDING_ROWS[db.dialect](ids)
    organizations = {}
    return [(row_id, organizations.get(org_id) or organizations.setdefault(
                 org_id, uuid_text(org_id)), content, status, received_at)
            for row_id, org_id, content, status, received_at in db.execute_sql(sql, params)]


# PostgreSQL takes a task's ids, and stores its results, as one JSON parameter:
# psycopg adapts a Python list to an array in Python, item by item, where
# json.dumps is C.
PENDING_POSTGRES = ("SELECT id::text, organization_id::text, content, analysis_status, received_at "
                    "FROM interaction WHERE id = ANY(ARRAY(SELECT json_array_elements_text(%s::json)::uuid))")
PENDING_SQLITE = ("SELECT id, organization_id, content, analysis_status, received_at FROM interaction "
                  "WHERE id IN (%s)")
PENDING_ROWS = {POSTGRES: lambda ids: (PENDING_POSTGRES, [json.dumps(ids)]),
                SQLITE: lambda ids: (PENDING_SQLITE % ", ".join(["?"] * len(ids)), ids)}


# "|| ''" keeps PostgreSQL from reading every pending row through the status
# index (and joining them): the rows come by primary key.
_STORE_WHERE = "WHERE interaction.id = v.id AND interaction.analysis_status || '' = '%s' " % PENDING
_STORE_PARTITION = ("AND interaction.received_at = v.received_at "
                    "AND interaction.received_at BETWEEN %s AND %s ")
# PostgreSQL: the same text for any number of rows.
STORE_POSTGRES = (
    "UPDATE interaction SET analysis_status = v.status, sentiment_label = v.label, "
    "sentiment_score = v.score, analysis_error = %s, analyzed_at = %s "
    "FROM json_to_recordset(%s::json) "
    "AS v(id uuid, received_at timestamp, status text, label text, score float8) "
    + _STORE_WHERE + _STORE_PARTITION
    + "RETURNING interaction.id::text, interaction.customer_id::text, interaction.received_at")


@functools.lru_cache(maxsize=128)
def _store_sqlite_sql(rows):
    return ("UPDATE interaction SET analysis_status = v.status, sentiment_label = v.label, "
            "sentiment_score = v.score, analysis_error = ?, analyzed_at = ? "
            "FROM (SELECT column1 AS id, column2 AS status, column3 AS label, column4 AS score "
            "FROM (VALUES " + ", ".join(["(?, ?, ?, ?)"] * rows) + ")) AS v " + _STORE_WHERE +
            "RETURNING interaction.id, interaction.customer_id, interaction.received_at")


STORE = {POSTGRES: _store_postgres, SQLITE: _store_sqlite}


def mark_failed(ids, error):
    """Record that analysing ``ids`` failed for good, keeping the error: written as
    ``store_results`` writes scores, with an ``interaction.analyzed`` change (status failed)
    for each row still pending. Returns ``store_results``'s results."""
    return store_results([(row_id, org_id, (FAILED, None, None), received_at)
                  for row_id, org_id, _, status, received_at in _pending_rows(ids) if status == PENDING],
                 error=str(error)[:2000])


def stale_pending(older_than_seconds, limit=10_000):
    """Ids of interactions pending for longer than ``older_than_seconds`` (for the sweep)."""
    cutoff = utcnow() - datetime.timedelta(seconds=older_than_seconds)
    return [row[0] for row in Interaction.select(Interaction.id)
            .where((Interaction.analysis_status == PENDING) & (Interaction.received_at < cutoff))
            .order_by(Interaction.received_at).limit(limit).tuples()]


def requeue_failed():
    """Set failed analyses back to pending; returns their ids."""
    with db.atomic():
        ids = [row[0] for row in Interaction.select(Interaction.id)
               .where(Interaction.analysis_status == FAILED).tuples()]
        if ids:
            (Interaction.update(analysis_status=PENDING, analysis_error=None)
             .where(Interaction.id.in_(ids)).execute())
    return ids


class ResultWriter:
    """Stores and publishes analysis results from a thread of its own, so that a
    consumer thread goes on to its next task (its SELECT and VADER) while the
    database writes the last one's: their time overlaps instead of adding up.

    At most BACKLOG tasks' results wait; a consumer thread that finds it full
    waits too. Results whose write fails leave their interactions pending, and
    the sweep queues them again. ``publish`` is the event bus's.
    """

    BACKLOG = 4

    def __init__(self, publish):
        self._publish = publish
        self._queue = queue.Queue(self.BACKLOG)
        self._threads = Threads(("analysis-results", self._run), wake=lambda: self._queue.put(None))

    def start(self):
        self._threads.start()

    def stop(self):
        """Write what was submitted, then end the thread."""
        self._threads.stop()

    def submit(self, scored):
        """Write ``scored`` soon, from the writer thread."""
        if scored:
            self._queue.put(scored)

    def write(self, scored):
        """Write ``scored`` now, from this thread."""
        if scored:
            publish_analyzed(self._publish, store_results(scored))

    def failed(self, ids, error):
        """Mark ``ids`` failed for good (``error``) and publish that, from this thread."""
        with connection():
            publish_analyzed(self._publish, mark_failed(ids, error))

    def drain(self, timeout=10):
        """Wait (up to ``timeout``) until every submitted result is written."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def _run(self):
        while (scored := self._queue.get()) is not None:
            try:
                self.write(scored)
            except Exception:
                release_connection()
                log.warning("storing analysis results failed; the sweep will queue them again",
                            exc_info=True, extra={"analysed": len(scored)})
            finally:
                self._queue.task_done()
        self._queue.task_done()


def publish_analyzed(publish, written):
    """Log and publish (with the bus's ``publish``) the ``interaction.analyzed`` events
    of ``store_results``'s results; a failed publish is logged, never raised."""
    log.info("analysed", extra={"analysed": len(written), "interaction_ids": [r["id"] for r in written]})
    by_organization = defaultdict(list)
    for result in written:
        by_organization[result["organization_id"]].append((result["position"], changes.analyzed_event(result)))
    publish_safely(publish, by_organization, analysed=len(written))
