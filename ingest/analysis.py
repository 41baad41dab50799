"""Sentiment analysis of stored interactions with VADER (DESIGN §7).

``analyze(ids)`` touches only interactions still ``pending``, so running it
twice, or for ids another task already did, changes nothing. Results are
written set-based: one UPDATE for the whole list.
"""
import datetime
import logging

from peewee import Case
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
    rows = list(Interaction
                .select(Interaction.id, Interaction.organization, Interaction.content)
                .where(Interaction.id.in_(list(ids)) & (Interaction.analysis_status == "pending"))
                .tuples())
    if not rows:
        return []
    outcomes = {row_id: sentiment_of(content) for row_id, _, content in rows}
    _store(outcomes)
    return [{"id": row_id, "organization_id": org_id, "analysis_status": outcomes[row_id][0],
             "sentiment": None if outcomes[row_id][1] is None
             else {"label": outcomes[row_id][1], "score": outcomes[row_id][2]}}
            for row_id, org_id, _ in rows]


def _store(outcomes):
    """One UPDATE for all outcomes; rows analysed meanwhile by another task are left alone."""
    key = Interaction.id

    def per_row(column, position):
        # ELSE the column itself: never taken, but it types the CASE on PostgreSQL
        # even when every value is NULL.
        return Case(key, [(key.to_value(row_id), outcome[position])
                          for row_id, outcome in outcomes.items()], column)

    with db.atomic():
        (Interaction
         .update(analysis_status=per_row(Interaction.analysis_status, 0),
                 sentiment_label=per_row(Interaction.sentiment_label, 1),
                 sentiment_score=per_row(Interaction.sentiment_score, 2),
                 analysis_error=None, analyzed_at=utcnow())
         .where(key.in_(list(outcomes)) & (Interaction.analysis_status == "pending"))
         .execute())


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
