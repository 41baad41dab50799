"""What a workflow raises when a request cannot be served: ``ServiceError``,
with a stable code the web layer maps to an HTTP status (ingest/errors.py).

Free of Flask, like the workflows that raise it.
"""
import uuid

from marshmallow import ValidationError


class ServiceError(Exception):
    def __init__(self, code, message, details=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}


def validation_error(details, message="The request is invalid."):
    return ServiceError("validation_error", message, details)


def not_found(code, details=None):
    """``customer_not_found`` or ``interaction_not_found``."""
    return ServiceError(code, "No such %s." % code.split("_")[0], details)


def load(schema, payload):
    """``payload`` loaded by a marshmallow ``schema``; a validation_error naming each
    wrong field otherwise."""
    try:
        return schema.load(payload)
    except ValidationError as error:
        details = error.messages
        if not isinstance(details, dict):  # the payload itself was not an object
            details = {"_schema": details}
        raise validation_error(details) from None


def uuid_or_none(value):
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None
