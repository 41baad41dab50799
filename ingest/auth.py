"""Admission of a request, in one place: its key and scope (DESIGN §5), its key's
request and events budgets and the analysis backlog bound (§13). The keys
themselves are cached and checked in ingest/keys.py; the budgets and the
backlog are counted in ingest/overload.py. Every 429 is raised here.

A 401 spends one from the client address's AUTH_FAILURE_LIMIT budget; once it
is spent the address is answered 429 ``auth_rate_limited``. The address is
``request.remote_addr``: behind nginx that is nginx's own, unless
TRUSTED_PROXIES says how many proxies' X-Forwarded-For to believe (app.py).
"""
import functools

from flask import current_app, g, request

from ingest import metrics, runtime
from ingest.domain import Code, validation_error
from ingest.errors import ApiError
from ingest.keys import AddressRefused, check_key
from ingest.logs import bind_context
from ingest.overload import EVENTS, REQUESTS


def require(scope, backlog=False):
    """Decorator: the view is for keys with ``scope`` (``admit``)."""
    def decorator(view):
        @functools.wraps(view)
        def wrapped(*args, **kwargs):
            admit(scope, backlog=backlog)
            return view(*args, **kwargs)
        return wrapped
    return decorator


def admit(scope, key=None, backlog=False):
    """Let the request in, or raise: its key (``key``, else the request's) must be a
    live one with ``scope`` (401, 403), within its request budget (429), and with
    ``backlog``, its organization within its share of the analysis backlog bound
    (429). Sets g.organization_id; returns the key's Principal."""
    process = runtime.of(current_app)
    try:
        principal = check_key(key or key_from_request(), request.remote_addr or "unknown",
                              process.keys, process.auth_failures)
    except AddressRefused as refused:
        _refuse(refused.refusal, Code.AUTH_RATE_LIMITED, "Too many failed authentications from this address")
    if principal is None:
        raise ApiError(401, Code.UNAUTHORIZED, "A valid API key is required.",
                       headers={"WWW-Authenticate": 'Bearer realm="ingest"'})
    if scope not in principal.scopes:
        raise ApiError(403, Code.FORBIDDEN, "This key lacks the '%s' scope." % scope)
    g.organization_id = principal.organization_id
    g.key_hash = principal.key_hash
    bind_context(organization_id=principal.organization_id)
    if process.rate_limit is not None:
        _refuse(process.rate_limit.retry_after(g.key_hash, REQUESTS, 1), Code.RATE_LIMITED,
                "This key is over its rate limit")
    wait = process.backlog.retry_after(principal.organization_id) if backlog else None
    if wait is not None:
        raise too_many_requests(Code.ANALYSIS_BACKLOG_FULL, "Too many interactions are waiting for analysis, "
                                "and this organization's are over its share of the bound; retry after %d s."
                                % wait, wait)
    return principal


def charge_events(payload, field=None):
    """Charge the key's events budgets (RATE_LIMIT) with the events ``payload``
    carries: the items of its ``field`` for a batch, else 1; before anything is
    stored, so that a batch over the budget is refused whole (429), and one that
    never could fit is a 400 naming ``field``."""
    rate_limit = runtime.of(current_app).rate_limit
    largest = rate_limit.largest(EVENTS) if rate_limit is not None else None
    if largest is None:
        return
    items = payload.get(field) if field and isinstance(payload, dict) else None
    count = len(items) if isinstance(items, list) and items else 1
    if count > largest:
        raise validation_error({field: ["At most %d events per request under this key's rate limit "
                                        "(%s)." % (largest, rate_limit.spec)]})
    _refuse(rate_limit.retry_after(g.key_hash, EVENTS, count), Code.RATE_LIMITED, "This key is over its rate limit")


def too_many_requests(reason, message, retry_after, details=None):
    """A 429 with Retry-After (DESIGN §13), counted by ``reason``."""
    metrics.REFUSED.labels(reason).inc()
    return ApiError(429, reason, message, {"retryAfter": retry_after, **(details or {})},
                    headers={"Retry-After": str(retry_after)})


def _refuse(refusal, reason, what):
    """429 ``reason`` for a RateLimit's ``(budget, wait)``; nothing for None."""
    if refusal is not None:
        budget, wait = refusal
        raise too_many_requests(reason, "%s (%s); retry after %d s." % (what, budget.spec, wait), wait,
                                {"limit": budget.spec})


def key_from_request():
    """The key from `Authorization: Bearer KEY` or HTTP Basic with KEY as user name."""
    credentials = request.authorization
    if credentials is None:
        return None
    if credentials.type == "bearer":
        return credentials.token
    if credentials.type == "basic":
        return credentials.username
    return None
