"""Authentication of a request: its key, its scope, and the key's request and
events budgets (DESIGN §5, §13); the keys themselves are checked in ingest/keys.py.

A 401 spends one from the client address's AUTH_FAILURE_LIMIT budget; once it
is spent the address is answered 429 ``auth_rate_limited``. The address is
``request.remote_addr``: behind nginx that is nginx's own, unless
TRUSTED_PROXIES says how many proxies' X-Forwarded-For to believe (app.py).
"""
import functools

from flask import current_app, g, request

from ingest import runtime
from ingest.accounts import hash_key
from ingest.errors import ApiError, too_many_requests
from ingest.keys import AddressRefused, check_key
from ingest.logs import bind_context
from ingest.overload import EVENTS, REQUESTS
from ingest.problems import Code, validation_error


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


def authenticate(scope, key=None):
    """Check the request's key (or ``key``) for ``scope``; sets g.organization_id."""
    try:
        principal = check_key(hash_key(key or key_from_request()), request.remote_addr or "unknown",
                              runtime.of(current_app).keys, runtime.of(current_app).auth_failures)
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
    _check_rate(REQUESTS, 1)
    return principal


def charge_events(count, field=None):
    """429 when the request's ``count`` events do not fit its key's events budgets
    (RATE_LIMIT); 400 naming ``field`` if they never could."""
    rate_limit = runtime.of(current_app).rate_limit
    largest = rate_limit.largest(EVENTS) if rate_limit is not None else None
    if largest is None:
        return
    if count > largest:
        raise validation_error({field: ["At most %d events per request under this key's rate limit "
                                        "(%s)." % (largest, rate_limit.spec)]})
    _check_rate(EVENTS, count)


def _check_rate(kind, cost):
    """429 once the key has spent its RATE_LIMIT budget of ``kind`` (DESIGN §13)."""
    rate_limit = runtime.of(current_app).rate_limit
    if rate_limit is not None:
        _refuse(rate_limit.retry_after(g.key_hash, kind, cost), Code.RATE_LIMITED, "This key is over its rate limit")


def _refuse(refusal, reason, what):
    """429 ``reason`` for a RateLimit's ``(budget, wait)``; nothing for None."""
    if refusal is not None:
        budget, wait = refusal
        raise too_many_requests(reason, "%s (%s); retry after %d s." % (what, budget.spec, wait), wait,
                                {"limit": budget.spec})


def require(scope):
    """Decorator: the view needs a key with ``scope``."""
    def decorator(view):
        @functools.wraps(view)
        def wrapped(*args, **kwargs):
            authenticate(scope)
            return view(*args, **kwargs)
        return wrapped
    return decorator
