"""HTTP endpoints (DESIGN §5): thin views over the workflows.

Each view authenticates, reads the JSON body, calls the workflow (ingest/service.py
for writes, ingest/reads.py, ingest/lifecycle.py, ingest/segment.py), and dumps the
result through the schema that the OpenAPI description publishes for it
(ingest/schemas.py). Errors are raised and shaped by ingest.errors.
"""

from flask import Blueprint, g, request

from ingest import lifecycle, reads, schemas, segment
from ingest import openapi as openapi_spec
from ingest.accounts import Scope
from ingest.auth import admit, charge_events, key_from_request, require
from ingest.domain import Code, validation_error
from ingest.errors import RETRY_SOON, ApiError
from ingest.web import read_json
from models import db

api = Blueprint("api", __name__, url_prefix="/api")
segment_api = Blueprint("segment", __name__, url_prefix="/v1")
health = Blueprint("health", __name__)


# The views that take ``?dryRun=true`` (DESIGN §5); every other view of /api and
# /v1 refuses the parameter rather than ignore it and do the real thing.
DRY_RUN_VIEWS = ("api.ingest_one", "api.ingest_batch", "segment.segment_events")


@api.before_request
@segment_api.before_request
def refuse_unsupported_dry_run():
    if "dryRun" in request.args and request.endpoint not in DRY_RUN_VIEWS:
        raise validation_error({"dryRun": ["This endpoint has no dry run; nothing was done."]})


@api.post("/customers")
@require(Scope.INGEST)
def create_customer():
    customer, created = lifecycle.create_customer(g.organization_id, read_json())
    return schemas.customer_out.dump(customer), 201 if created else 200


@api.get("/customers/<customer_id>")
@require(Scope.READ)
def get_customer(customer_id):
    return schemas.customer_out.dump(reads.get_customer(g.organization_id, customer_id))


@api.delete("/customers/<customer_id>")
@require(Scope.INGEST)
def erase_customer(customer_id):
    g.runtime.service.erase_customer(g.organization_id, customer_id)
    return "", 204


@api.get("/customers")
@require(Scope.READ)
def find_customers():
    customers = reads.find_customers(g.organization_id, request.args.to_dict())
    return schemas.customer_list.dump({"items": customers})


def dry_run():
    """``?dryRun=true`` (DESIGN §5): validate exactly as a real call, store nothing."""
    value = request.args.get("dryRun", "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise validation_error({"dryRun": ["Must be true or false."]})
    return value in ("true", "1")


@api.post("/data/ingest")
@require(Scope.INGEST, backlog=True)
def ingest_one():
    dry = dry_run()
    payload = read_json()
    charge_events(payload)
    interaction_id, duplicate = g.runtime.service.ingest_one(g.organization_id, payload, dry_run=dry)
    body = schemas.ingest_result.dump({"id": interaction_id, "duplicate": duplicate, "dry_run": dry})
    return body, 200 if duplicate or dry else 201


@api.post("/data/ingest/batch")
@require(Scope.INGEST, backlog=True)
def ingest_batch():
    dry = dry_run()
    payload = read_json()
    charge_events(payload, "interactions")
    return schemas.batch_result.dump(g.runtime.service.ingest_batch(g.organization_id, payload, dry_run=dry))


@api.get("/interactions")
@require(Scope.READ)
def list_interactions():
    items, next_cursor = reads.list_interactions(g.organization_id, request.args.to_dict())
    return schemas.interaction_page.dump({"items": items, "next_cursor": next_cursor})


@api.get("/changes")
@require(Scope.READ)
def list_changes():
    items, next_cursor = reads.list_changes(g.organization_id, request.args.to_dict())
    return {"items": items, "nextCursor": next_cursor}  # built as schemas.ChangePage says


@api.get("/interactions/<interaction_id>")
@require(Scope.READ)
def get_interaction(interaction_id):
    return schemas.interaction_out.dump(reads.get_interaction(g.organization_id, interaction_id))


@segment_api.post("/batch")
@segment_api.post("/<any(track, identify, page):kind>")
def segment_events(kind=None):
    """Segment's HTTP tracking API: exactly 200 {"success": true} unless the client
    should act (400 bad envelope, 401/403 key, 429 and 503 retry)."""
    key = key_from_request()
    if key:
        admit(Scope.INGEST, key, backlog=True)
    payload = read_json()
    if not key:
        admit(Scope.INGEST, payload.get("writeKey") if isinstance(payload, dict) else None, backlog=True)
    dry = dry_run()
    charge_events(payload, "batch" if kind is None else None)
    problems, retry = segment.accept(g.runtime.service, g.organization_id, payload, kind, dry_run=dry)
    if retry:
        raise ApiError(503, Code.STORAGE_ERROR, "Storing failed; retry the batch.",
                       {"errors": segment.problem_out.dump(problems, many=True)},
                       headers={"Retry-After": RETRY_SOON})
    result = {"success": True, "dry_run": dry, **({"errors": problems} if problems else {})}
    return segment.result_out.dump(result), 200


@api.get("/openapi.json")
def openapi():
    return openapi_spec.spec_dict()


@health.get("/healthz")
def healthz():
    return schemas.health.dump({"status": "ok"})


@health.get("/readyz")
def readyz():
    """Ready: the database and the queue answer. The replica is reported, never
    required: reads go to the primary while it is down."""
    process = g.runtime
    checks = {"database": _check(lambda: db.execute_sql("SELECT 1")),
              "queue": _check(process.pending_count)}
    ready = all(value == "ok" for value in checks.values())
    body = {"status": "ready" if ready else "unavailable", "checks": checks}
    if process.replica is not None:
        body["replica"] = _replica(process.replica)
    return schemas.health.dump(body), 200 if ready else 503


def _replica(replica):
    lag = replica.lag()
    return {"status": "down: reads go to the primary" if replica.falling_back else "ok",
            "lag_seconds": lag, "fallback": replica.falling_back}


def _check(probe):
    try:
        probe()
    except Exception as error:  # any failure means not ready; say which
        return "error: %s" % type(error).__name__
    return "ok"
