"""HTTP endpoints (DESIGN §5): thin views over the service.

Each view authenticates, reads the JSON body, calls the service, dumps the
result. Errors are raised and shaped by ingest.errors.
"""
import functools

from flask import Blueprint, current_app, g, request

from ingest import openapi as openapi_spec, segment
from ingest.auth import authenticate, key_from_request, require
from ingest.body import read_json
from ingest.errors import ApiError, too_many_requests
from ingest.schemas import customer_out, interaction_out
from models import db

api = Blueprint("api", __name__, url_prefix="/api")
segment_api = Blueprint("segment", __name__, url_prefix="/v1")
health = Blueprint("health", __name__)


def service():
    return current_app.extensions["ingest"]


@api.post("/customers")
@require("ingest")
def create_customer():
    customer, created = service().create_customer(g.organization_id, read_json())
    return customer_out.dump(customer), 201 if created else 200


@api.get("/customers/<customer_id>")
@require("read")
def get_customer(customer_id):
    return customer_out.dump(service().get_customer(g.organization_id, customer_id))


@api.delete("/customers/<customer_id>")
@require("ingest")
def erase_customer(customer_id):
    service().erase_customer(g.organization_id, customer_id)
    return "", 204


@api.get("/customers")
@require("read")
def find_customers():
    customers = service().find_customers(g.organization_id, request.args.to_dict())
    return {"items": customer_out.dump(customers, many=True)}


def check_backlog():
    """429 while the analysis backlog is over ANALYSIS_BACKLOG_MAX (DESIGN §13)."""
    wait = current_app.extensions["backlog"].retry_after()
    if wait is not None:
        raise too_many_requests("analysis_backlog_full", "Too many interactions are waiting for "
                                "analysis; retry after %d s." % wait, wait)


def bounded(view):
    """Decorator: an ingest view, refused whole while the backlog is over its bound."""
    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        check_backlog()
        return view(*args, **kwargs)
    return wrapped


def dry_run():
    """``?dryRun=true`` (DESIGN §5): validate exactly as a real call, store nothing."""
    value = request.args.get("dryRun", "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise ApiError(400, "validation_error", "The request is invalid.",
                       {"dryRun": ["Must be true or false."]})
    return value in ("true", "1")


def marked(body, dry):
    return {**body, "dryRun": True} if dry else body


@api.post("/data/ingest")
@require("ingest")
@bounded
def ingest():
    dry = dry_run()
    interaction_id, duplicate = service().ingest(g.organization_id, read_json(), dry_run=dry)
    if dry:
        return {"id": None, "duplicate": duplicate, "dryRun": True}, 200
    return {"id": str(interaction_id), "duplicate": duplicate}, 200 if duplicate else 201


@api.post("/data/ingest/batch")
@require("ingest")
@bounded
def ingest_batch():
    dry = dry_run()
    result = service().ingest_batch(g.organization_id, read_json(), dry_run=dry)
    return marked({
        "total": result.total, "successful": result.successful, "failed": result.failed,
        "duplicates": result.duplicates,
        "ids": [None if i is None else str(i) for i in result.ids],
        "errors": result.errors,
    }, dry)


@api.get("/interactions")
@require("read")
def list_interactions():
    items, next_cursor = service().list_interactions(g.organization_id, request.args.to_dict())
    return {"items": interaction_out.dump(items, many=True), "nextCursor": next_cursor}


@api.get("/interactions/<interaction_id>")
@require("read")
def get_interaction(interaction_id):
    return interaction_out.dump(service().get_interaction(g.organization_id, interaction_id))


@segment_api.post("/batch")
@segment_api.post("/<any(track, identify, page):kind>")
def segment_events(kind=None):
    """Segment's HTTP tracking API: exactly 200 {"success": true} unless the client
    should act (400 bad envelope, 401/403 key, 429 and 503 retry)."""
    key = key_from_request()
    if key:
        authenticate("ingest", key)
    payload = read_json()
    if not key:
        authenticate("ingest", payload.get("writeKey") if isinstance(payload, dict) else None)
    check_backlog()
    dry = dry_run()
    problems, retry = segment.ingest(service(), g.organization_id, payload, kind, dry_run=dry)
    if retry:
        raise ApiError(503, "storage_error", "Storing failed; retry the batch.",
                       {"errors": problems}, headers={"Retry-After": "1"})
    return marked({"success": True, "errors": problems} if problems else {"success": True}, dry), 200


@api.get("/openapi.json")
def openapi():
    return openapi_spec.spec_dict()


@health.get("/healthz")
def healthz():
    return {"status": "ok"}


@health.get("/readyz")
def readyz():
    checks = {"database": _check(lambda: db.execute_sql("SELECT 1")),
              "queue": _check(current_app.extensions["queue_size"])}
    ready = all(value == "ok" for value in checks.values())
    return {"status": "ready" if ready else "unavailable", "checks": checks}, 200 if ready else 503


def _check(probe):
    try:
        probe()
    except Exception as error:  # any failure means not ready; say which
        return "error: %s" % type(error).__name__
    return "ok"
