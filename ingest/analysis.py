"""Sentiment analysis of stored interactions with VADER (DESIGN §7).

``analyze(ids)`` is idempotent: it touches only interactions still pending
(or failed, when retried), so running it twice changes nothing.
"""
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


def analyze(ids):
    """Analyse the interactions ``ids`` that still await it; returns their results.

    Each result is ``{"id", "organization_id", "analysis_status", "sentiment"}``.
    """
    rows = list(Interaction
                .select(Interaction.id, Interaction.organization, Interaction.content)
                .where(Interaction.id.in_(list(ids))
                       & Interaction.analysis_status.in_(("pending", "failed"))))
    results = [_result(row) for row in rows]
    now = utcnow()
    with db.atomic():
        for result in results:
            sentiment = result["sentiment"] or {}
            (Interaction
             .update(analysis_status=result["analysis_status"],
                     sentiment_label=sentiment.get("label"),
                     sentiment_score=sentiment.get("score"),
                     analysis_error=None, analyzed_at=now)
             .where(Interaction.id == result["id"])
             .execute())
    return results


def _result(row):
    base = {"id": row.id, "organization_id": row.organization_id}
    if not (row.content or "").strip():
        return {**base, "analysis_status": "skipped", "sentiment": None}
    compound = analyzer().polarity_scores(row.content)["compound"]
    return {**base, "analysis_status": "done",
            "sentiment": {"label": label_for(compound), "score": compound}}


def mark_failed(ids, error):
    """Record that analysing ``ids`` failed for good, keeping the error."""
    return (Interaction
            .update(analysis_status="failed", analysis_error=str(error)[:2000], analyzed_at=utcnow())
            .where(Interaction.id.in_(list(ids)) & (Interaction.analysis_status == "pending"))
            .execute())
