"""What a workflow raises when a request cannot be served: ``ServiceError``,
with a stable code the web layer maps to an HTTP status (ingest/errors.py).

Free of Flask, like the workflows that raise it.
"""
import uuid
from enum import StrEnum


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
