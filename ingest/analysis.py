"""Sentiment analysis of stored interactions with VADER (DESIGN §7).

``analyze(ids)`` touches only interactions still ``pending``, so running it
twice, or for ids another task already did, changes nothing. Results are
written with one prepared UPDATE for the whole list.
"""
import datetime
import logging

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from models import Interaction, db, utcnow

log = logging.getLogger(__name__)

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


def sentiment_of(content):
    """``(status, label, score)`` for a text: ``skipped`` when there is nothing to read."""
    if not (content or "").strip():
        return "skipped", None, None
    compound = analyzer().polarity_scores(content)["compound"]
    return "done", label_for(compound), compound


def analyze(ids):
    """Analyse the interactions ``ids`` still pending; returns one result dict each.

    A result is ``{"id", "organization_id", "analysis_status", "sentiment"}``.
    """
    # By primary key only: a filter on the status lets PostgreSQL pick the status
    # index and scan every pending row, which grows with the backlog.
    rows = [row[:3] for row in Interaction
            .select(Interaction.id, Interaction.organization, Interaction.content,
                    Interaction.analysis_status)
            .where(Interaction.id.in_(list(ids)))
            .tuples()
            if row[3] == "pending"]
    if not rows:
        return []
    outcomes = {row_id: sentiment_of(content) for row_id, _, content in rows}
    _store(outcomes)
    return [{"id": row_id, "organization_id": org_id, "analysis_status": outcomes[row_id][0],
             "sentiment": None if outcomes[row_id][1] is None
             else {"label": outcomes[row_id][1], "score": outcomes[row_id][2]}}
            for row_id, org_id, _ in rows]


def _store(outcomes):
    """Write all outcomes with one prepared UPDATE run for every row (executemany).

    Rows another task analysed meanwhile are left alone. (Building one query
    object per row, or a CASE over all rows, costs more in SQL generation than
    the analysis itself.)
    """
    sql = ("UPDATE interaction SET analysis_status = {p}, sentiment_label = {p}, "
           "sentiment_score = {p}, analysis_error = NULL, analyzed_at = {p} "
           "WHERE id = {p} AND analysis_status = 'pending'").format(p=db.param)
    now = utcnow()
    rows = [(status, label, score, now, Interaction.id.db_value(row_id))
            for row_id, (status, label, score) in outcomes.items()]
    with db.atomic():
        db.cursor().executemany(sql, rows)


def mark_failed(ids, error):
    """Record that analysing ``ids`` failed for good, keeping the error."""
    with db.atomic():
        return (Interaction
                .update(analysis_status="failed", analysis_error=str(error)[:2000],
                        analyzed_at=utcnow())
                .where(Interaction.id.in_(list(ids)) & (Interaction.analysis_status == "pending"))
                .execute())


def stale_pending(older_than_seconds, limit=10_000):
    """Ids of interactions pending for longer than ``older_than_seconds`` (for the sweep)."""
    cutoff = utcnow() - datetime.timedelta(seconds=older_than_seconds)
    return [row[0] for row in Interaction.select(Interaction.id)
            .where((Interaction.analysis_status == "pending") & (Interaction.received_at < cutoff))
            .order_by(Interaction.received_at).limit(limit).tuples()]


def requeue_failed():
    """Set failed analyses back to pending; returns their ids."""
    with db.atomic():
        ids = [row[0] for row in Interaction.select(Interaction.id)
               .where(Interaction.analysis_status == "failed").tuples()]
        if ids:
            (Interaction.update(analysis_status="pending", analysis_error=None)
             .where(Interaction.id.in_(ids)).execute())
    return ids
