"""The domain's types and outcomes, free of Flask and of SQL: what a workflow takes
(a validated ``NewInteraction``), what becomes of it (CREATED, DUPLICATE,
UNKNOWN_CUSTOMER; a batch's ``BatchOutcome``), and what it raises when a request
cannot be served (``ServiceError``, with a stable ``Code`` the web layer maps to an
HTTP status in ingest/errors.py).
"""
import datetime
import uuid
from dataclasses import dataclass, field
from enum import StrEnum

from models import PENDING, random_uuid, utcnow

# What became of an interaction submitted for storage.
CREATED = "created"
DUPLICATE = "duplicate"  # its (organization, messageId) was stored before: the first one's id
UNKNOWN_CUSTOMER = "unknown_customer"  # not a customer of its organization: nothing stored


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
    id: uuid.UUID = field(default_factory=random_uuid)
    received_at: datetime.datetime = field(default_factory=utcnow)
    position: int | None = None  # in its organization's change stream, once stored

    # How a stored row reads before its analysis (for serialisation).
    analysis_status = PENDING
    sentiment = sentiment_label = sentiment_score = analysis_error = analyzed_at = None

    @property
    def key(self):
        """The idempotency key: (organization, messageId)."""
        return (self.organization_id, self.message_id)


@dataclass
class BatchOutcome:
    """What became of each item of a batch (dumped as schemas.BatchResult)."""
    total: int
    ids: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    duplicates: int = 0
    dry_run: bool = False

    @property
    def failed(self):
        return len(self.errors)

    @property
    def successful(self):
        return self.total - self.failed - self.duplicates


class Code(StrEnum):
    """The ``error`` of every error response (ingest/errors.py maps them to statuses)."""
    VALIDATION_ERROR = "validation_error"
    CUSTOMER_NOT_FOUND = "customer_not_found"
    INTERACTION_NOT_FOUND = "interaction_not_found"
    CURSOR_EXPIRED = "cursor_expired"
    STORAGE_ERROR = "storage_error"
    COMMIT_OUTCOME_UNKNOWN = "commit_outcome_unknown"
    DATABASE_UNAVAILABLE = "database_unavailable"
    INTERNAL_ERROR = "internal_error"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    INVALID_JSON = "invalid_json"
    INVALID_GZIP = "invalid_gzip"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    RATE_LIMITED = "rate_limited"
    AUTH_RATE_LIMITED = "auth_rate_limited"
    ANALYSIS_BACKLOG_FULL = "analysis_backlog_full"
    CUSTOMER_ERASED = "customer_erased"  # a Segment event's problem (DESIGN §15), inside a 200


class ServiceError(Exception):
    def __init__(self, code, message, details=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}


def validation_error(details, message="The request is invalid."):
    return ServiceError(Code.VALIDATION_ERROR, message, details)


def not_found(code, details=None):
    """``customer_not_found`` or ``interaction_not_found``."""
    return ServiceError(code, "No such %s." % code.split("_")[0], details)


def uuid_or_none(value):
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None
