"""One JSON error shape for every failure: {"error", "message", "details"}.

Views raise ApiError (or the service raises ServiceError); the handlers here
turn those, Werkzeug's HTTP errors and anything unexpected into that shape.
"""
import logging

from flask import jsonify
from peewee import InterfaceError, OperationalError
from playhouse.pool import MaxConnectionsExceeded
from werkzeug.exceptions import HTTPException

from ingest import schemas
from ingest.domain import Code, ServiceError

log = logging.getLogger(__name__)

# ServiceError codes -> HTTP status.
SERVICE_STATUS = {
    Code.VALIDATION_ERROR: 400,
    Code.CUSTOMER_NOT_FOUND: 404,
    Code.INTERACTION_NOT_FOUND: 404,
    Code.CURSOR_EXPIRED: 410,
    Code.STORAGE_ERROR: 503,
    Code.COMMIT_OUTCOME_UNKNOWN: 503,
}


# The Retry-After of a 503 (storing failed, the database is unavailable): a retry
# may succeed at once.
RETRY_SOON = "1"

# Werkzeug's name for a status where ours differs (a body too large, however it
# was found out, is one code).
HTTP_CODES = {413: Code.PAYLOAD_TOO_LARGE}


class ApiError(Exception):
    def __init__(self, status, code, message, details=None, headers=None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}
        self.headers = headers or {}


def error_response(status, code, message, details=None, headers=None):
    response = jsonify(schemas.error.dump({"error": code, "message": message, "details": details or {}}))
    response.status_code = status
    response.headers.update(headers or {})
    return response


def register(app):
    @app.errorhandler(ApiError)
    def _api_error(error):
        return error_response(error.status, error.code, error.message, error.details,
                              error.headers)

    @app.errorhandler(ServiceError)
    def _service_error(error):
        status = SERVICE_STATUS.get(error.code, 500)
        headers = {"Retry-After": RETRY_SOON} if status == 503 else None
        return error_response(status, error.code, error.message, error.details, headers)

    @app.errorhandler(OperationalError)
    @app.errorhandler(InterfaceError)
    @app.errorhandler(MaxConnectionsExceeded)
    def _database_unavailable(error):
        log.warning("database unavailable: %s", error)
        return error_response(503, Code.DATABASE_UNAVAILABLE,
                              "The database is unavailable; retry shortly.", headers={"Retry-After": RETRY_SOON})

    @app.errorhandler(HTTPException)
    def _http_error(error):
        code = HTTP_CODES.get(error.code) or (error.name or "error").lower().replace(" ", "_")
        return error_response(error.code, code, error.description)

    @app.errorhandler(Exception)
    def _unexpected(error):
        log.exception("unhandled error")
        return error_response(500, Code.INTERNAL_ERROR, "An unexpected error occurred.")
