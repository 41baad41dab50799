"""The OpenAPI 3 description of the API, generated from the marshmallow schemas
(apispec with its marshmallow plugin) and served at GET /api/openapi.json."""
import functools

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin

from ingest import segment
from ingest.accounts import Scope
from ingest.schemas import (
    LIVE_MESSAGES,
    BatchResult,
    ChangePage,
    ChangeQuery,
    CustomerIn,
    CustomerList,
    CustomerOut,
    CustomerQuery,
    Error,
    Health,
    IngestResult,
    InteractionIn,
    InteractionOut,
    InteractionPage,
    InteractionQuery,
)

JSON = "application/json"
ERRORS = {
    400: "Invalid request: `details` names each wrong field or parameter (`dryRun` too, on an "
         "endpoint that has no dry run: it is refused there, never ignored).",
    401: "Missing, invalid or revoked API key.",
    403: "The key lacks the scope.",
    404: "No such resource in the key's organization.",
    413: "Body larger than MAX_CONTENT_LENGTH (also once decompressed).",
    410: "`cursor_expired`: the changes after this cursor are no longer kept; `details.oldestCursor` "
         "is the oldest cursor still good.",
    415: "Not JSON, or an unsupported Content-Encoding.",
    429: "Refused, nothing stored (a batch is refused whole): the key is over a budget of its "
         "rate limit, in requests or in events (`rate_limited`); the client's address failed "
         "authentication too often (`auth_rate_limited`); or, on ingest, too many interactions "
         "wait for analysis and the key's organization holds more than its share of them "
         "(`analysis_backlog_full`). Retry after Retry-After seconds.",
    503: "Not stored (`storage_error`: retry, see Retry-After), or the database did not answer "
         "in time (`commit_outcome_unknown`: it may have been stored; retry with the same "
         "messageId), or the database is unavailable.",
}


def _response(schema, description):
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _errors(*codes):
    return {str(code): _response(Error, ERRORS[code]) for code in codes}


def _body(schema, description=""):
    return {"required": True, "description": description, "content": {JSON: {"schema": schema}}}


def _operation(summary, scope, responses, errors, body=None, parameters=None):
    if scope:
        errors = (*errors, 429)  # every keyed request counts against its key's rate limit
    operation = {"summary": summary, "responses": {**responses, **_errors(*errors)}}
    if scope:
        operation["security"] = [{"bearer": []}, {"basic": []}]
        operation["description"] = "Needs a key with the `%s` scope." % scope
    if body:
        operation["requestBody"] = body
    if parameters:
        operation["parameters"] = parameters
    return operation


DRY_RUN = {"in": "query", "name": "dryRun", "required": False, "schema": {"type": "boolean"},
           "description": "Validate exactly as a real call and answer the same shape "
                          "(ids null, `dryRun: true`); store, count, queue and publish nothing."}


def _id(name):
    return {"in": "path", "name": name, "required": True, "schema": {"type": "string"}}


PATHS = {
    "/api/customers": {
        "post": _operation("Create a customer (an existing externalId returns it)", Scope.INGEST, {
            "201": _response(CustomerOut, "Created."),
            "200": _response(CustomerOut, "A customer with this externalId already existed.")},
            (400, 401, 403, 413, 415), body=_body(CustomerIn)),
        "get": _operation("Find customers by external id", Scope.READ, {
            "200": _response(CustomerList, "Matching customers (zero or one).")},
            (400, 401, 403), parameters=[{"in": "query", "schema": CustomerQuery}]),
    },
    "/api/customers/{customer_id}": {
        "get": _operation("Get a customer with its counters", Scope.READ, {
            "200": _response(CustomerOut, "The customer.")}, (400, 401, 403, 404),
            parameters=[_id("customer_id")]),
        "delete": _operation("Erase a customer and every interaction of it (DESIGN §15)", Scope.INGEST, {
            "204": {"description": "Erased; open feed sockets got `customer.deleted`."}}, (400, 401, 403, 404),
            parameters=[_id("customer_id")]),
    },
    "/api/data/ingest": {
        "post": _operation("Ingest one interaction", Scope.INGEST, {
            "201": _response(IngestResult, "Stored."),
            "200": _response(IngestResult, "A duplicate messageId: the original's id; or a dry run.")},
            (400, 401, 403, 404, 413, 415, 503), body=_body(InteractionIn), parameters=[DRY_RUN]),
    },
    "/api/data/ingest/batch": {
        "post": _operation("Ingest a batch of interactions", Scope.INGEST, {
            "200": _response(BatchResult, "Per-item outcome: ids and errors by index.")},
            (400, 401, 403, 413, 415), body=_body({
                "type": "object", "required": ["interactions"], "additionalProperties": False,
                "properties": {"interactions": {"type": "array", "minItems": 1,
                                                "items": InteractionIn}}}),
            parameters=[DRY_RUN]),
    },
    "/api/interactions": {
        "get": _operation("List interactions, newest first (keyset pagination)", Scope.READ, {
            "200": _response(InteractionPage, "A page; follow nextCursor for the next.")},
            (400, 401, 403), parameters=[{"in": "query", "schema": InteractionQuery}]),
    },
    "/api/changes": {
        "get": _operation("The organization's changes after a cursor, oldest first (DESIGN §16)", Scope.READ, {
            "200": _response(ChangePage, "A page; ask after nextCursor for what follows.")},
            (400, 401, 403, 410), parameters=[{"in": "query", "schema": ChangeQuery}]),
    },
    "/api/interactions/{interaction_id}": {
        "get": _operation("Get an interaction with its analysis", Scope.READ, {
            "200": _response(InteractionOut, "The interaction.")}, (400, 401, 403, 404),
            parameters=[_id("interaction_id")]),
    },
    "/v1/batch": {
        "post": _operation("Segment-compatible batch (write key as Basic user or writeKey)",
                           Scope.INGEST, {"200": _response(segment.SegmentResult, "Accepted; per-event problems.")},
                           (400, 401, 403, 413, 415, 503), body=_body(segment.SegmentBatch),
                           parameters=[DRY_RUN]),
    },
    **{"/v1/%s" % kind: {
        "post": _operation("Segment-compatible %s call" % kind, Scope.INGEST, {
            "200": _response(segment.SegmentResult, "Accepted; per-event problems.")},
            (400, 401, 403, 413, 415, 503), body=_body(segment.SegmentEvent), parameters=[DRY_RUN])}
       for kind in ("track", "identify", "page")},
    "/healthz": {"get": _operation("The process is up", None, {
        "200": _response(Health, "Up.")}, ())},
    "/readyz": {"get": _operation("Database and queue reachable (and the read replica reported)", None, {
        "200": _response(Health, "Ready."), "503": _response(Health, "Not ready.")}, ())},
    "/metrics": {"get": _operation("Prometheus metrics of every process (text format)", None, {
        "200": {"description": "Prometheus text exposition format 0.0.4.",
                "content": {"text/plain": {"schema": {"type": "string"}}}}}, ())},
}


LIVE_FEED = (
    "Live feed: a WebSocket at /api/feed/ws. The client sends {\"type\": \"auth\", \"token\": KEY} "
    "(a key with the read scope), and {\"after\": CURSOR} in it to resume. The server answers ReadyNotice, "
    "then sends the organization's changes in order, each once (CreatedEvent, AnalyzedEvent, DeletedEvent: "
    "the same items as GET /api/changes), and DroppedNotice when it fell behind. Close codes: 4400 "
    "after is not a cursor of the organization, 4401 bad or revoked key, 4403 no read scope, 4410 cursor "
    "expired, 1013 try again later.")


@functools.lru_cache(maxsize=None)
def spec_dict():
    spec = APISpec(title="Interaction ingest API", version="1.0.0", openapi_version="3.0.3",
                   plugins=[MarshmallowPlugin()], info={"description": LIVE_FEED})
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer",
                                               "description": "Authorization: Bearer KEY"})
    spec.components.security_scheme("basic", {"type": "http", "scheme": "basic",
                                              "description": "The key as user name, no password."})
    for path, operations in PATHS.items():  # the plugin registers each schema it meets
        spec.path(path=path, operations=operations)
    for schema in LIVE_MESSAGES.values():
        spec.components.schema(schema.__name__, schema=schema)
    return spec.to_dict()

