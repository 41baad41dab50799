"""Set-based writes: interactions and their customers' counters in one transaction.

DESIGN §6 and §12: one multi-row INSERT for a group of interactions, one
atomic UPDATE per customer, no per-row round trips. ``messageId`` idempotency
is enforced by the unique index on (organization, message_id): rows that
conflict are skipped by ``ON CONFLICT DO NOTHING`` and reported as duplicates
of the row already there, which is race-safe across processes.
"""
import logging
import time
from collections import defaultdict
import datetime
import uuid
from dataclasses import dataclass, field

from peewee import Case, OperationalError

from models import Customer, Interaction, db, utcnow

log = logging.getLogger(__name__)

CREATED = "created"
DUPLICATE = "duplicate"
# A write that fails with a transient error (SQLite busy past its timeout, a
# PostgreSQL deadlock or dropped connection) is tried this many times in all.
ATTEMPTS = 3


@dataclass
class NewInteraction:
    """A validated interaction, enriched with its organization, ready to store."""
    organization_id: uuid.UUID
    customer_id: uuid.UUID
    timestamp: datetime.datetime
    channel: str
    event_type: str
    content: str | None = None
    metadata: dict = field(default_factory=dict)
    message_id: str | None = None
    id: uuid.UUID = field(default_factory=uuid.uuid4)
    received_at: datetime.datetime = field(default_factory=utcnow)

    # How a stored row reads before its analysis (for serialisation).
    analysis_status = "pending"
    sentiment_label = sentiment_score = analysis_error = analyzed_at = None

    @property
    def key(self):
        """The idempotency key: (organization, messageId)."""
        return (self.organization_id, self.message_id)

    def row(self):
        return {
            "id": self.id, "organization": self.organization_id, "customer": self.customer_id,
            "message_id": self.message_id, "timestamp": self.timestamp,
            "received_at": self.received_at, "channel": self.channel,
            "event_type": self.event_type, "content": self.content,
            "metadata": self.metadata, "analysis_status": self.analysis_status,
        }


def write_group(jobs):
    """Store every job of ``jobs`` (lists of NewInteraction) in one transaction.

    Returns, per job, a list of ``(CREATED|DUPLICATE, interaction_id)`` in item
    order; a duplicate carries the id of the interaction stored first. Raises
    if the transaction fails, and then nothing of it is stored.
    """
    for attempt in range(1, ATTEMPTS + 1):
        try:
            with db.atomic():
                return _write(jobs)
        except OperationalError:
            if attempt == ATTEMPTS:
                raise
            log.warning("transient storage error, retrying", exc_info=True,
                        extra={"attempt": attempt})
            db.close()
            time.sleep(0.05 * 2 ** attempt)


def _write(jobs):
    items = [item for job in jobs for item in job]
    candidates, seen = [], set()  # the first item of each (organization, messageId)
    for item in items:
        if item.message_id is None or item.key not in seen:
            seen.add(item.key)
            candidates.append(item)

    inserted = _insert(candidates)
    stored = _stored_ids([item for item in candidates if item.id not in inserted])
    stored.update((item.key, item.id) for item in candidates
                  if item.id in inserted and item.message_id is not None)
    outcome = [(CREATED, item.id) if item.id in inserted else (DUPLICATE, stored[item.key])
               for item in items]
    _update_customers([item for item in items if item.id in inserted])

    results, start = [], 0
    for job in jobs:
        results.append(outcome[start:start + len(job)])
        start += len(job)
    return results


def _insert(items):
    """Insert ``items``; return the ids actually inserted (the others conflicted)."""
    if not items:
        return set()
    # A stable order of the unique keys keeps concurrent writers of the same
    # messageIds from deadlocking on each other on PostgreSQL.
    items = sorted(items, key=lambda i: (str(i.organization_id), i.message_id or ""))
    query = (Interaction.insert_many([i.row() for i in items])
             .on_conflict(conflict_target=[Interaction.organization, Interaction.message_id],
                          action="nothing")
             .returning(Interaction.id)
             .tuples())
    return {row[0] for row in query.execute()}


def _stored_ids(items):
    """Map (organization, message_id) to the id already stored, for conflicting items."""
    if not items:
        return {}
    query = (Interaction
             .select(Interaction.organization, Interaction.message_id, Interaction.id)
             .where(Interaction.organization.in_({i.organization_id for i in items})
                    & Interaction.message_id.in_({i.message_id for i in items}))
             .tuples())
    return {(org, message_id): id_ for org, message_id, id_ in query}


def _update_customers(items):
    """One atomic UPDATE per customer: count += n, last_seen_at = max(it, newest)."""
    per_customer = defaultdict(list)
    for item in items:
        per_customer[item.customer_id].append(item.timestamp)
    last_seen = Customer.last_seen_at
    # Sorted so that concurrent transactions lock customers in the same order.
    for customer_id in sorted(per_customer, key=str):
        stamps = per_customer[customer_id]
        newest = last_seen.to_value(max(stamps))
        (Customer
         .update(interaction_count=Customer.interaction_count + len(stamps),
                 last_seen_at=Case(None, [(last_seen.is_null() | (last_seen < newest), newest)],
                                   last_seen))
         .where(Customer.id == customer_id)
         .execute())
