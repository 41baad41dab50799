"""Authentication: the cache of live keys and the request check (DESIGN §5).
Keys are created and revoked in ingest/accounts.py.

Live keys are cached per process for KEY_CACHE_SECONDS, so a request or a feed
socket authenticates without a database round trip, and 1,000 sockets
reconnecting with the same key cost one query. The price: a revoked key keeps
working for up to KEY_CACHE_SECONDS on HTTP; open feed sockets are checked
again every KEY_CACHE_SECONDS, so theirs close within twice that.
"""
import functools
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from flask import current_app, g, request

from ingest.accounts import hash_key
from ingest.errors import ApiError, too_many_requests
from ingest.logs import bind_context
from models import ApiKey, connection

KEY_CACHE_SECONDS = 5
KEY_CACHE_ENTRIES = 10_000
LOOKUP_WAIT = 30  # seconds a request waits for another thread's lookup of the same key


@dataclass(frozen=True)
class Principal:
    """Who a live key speaks for."""
    organization_id: str
    scopes: frozenset
    key_hash: str


class KeyCache:
    """Live keys by hash, each remembered for KEY_CACHE_SECONDS (unknown keys too).

    Concurrent lookups of the same uncached key share one query.
    """

    def __init__(self, ttl=KEY_CACHE_SECONDS):
        self._ttl = ttl
        self._entries = {}  # hash -> (Principal or None, expires at)
        self._lookups = {}  # hash -> Future of the query under way
        self._lock = threading.Lock()

    def principal(self, key_hash):
        """The Principal of a live key's hash, or None."""
        entry = self._entries.get(key_hash)
        if entry is not None and entry[1] > time.monotonic():
            return entry[0]
        with self._lock:
            lookup = self._lookups.get(key_hash)
            leader = lookup is None
            if leader:
                lookup = self._lookups[key_hash] = Future()
        if not leader:
            return lookup.result(timeout=LOOKUP_WAIT)
        try:
            principal = self._load([key_hash]).get(key_hash)
            lookup.set_result(principal)
            return principal
        except BaseException as error:
            lookup.set_exception(error)
            raise
        finally:
            with self._lock:
                del self._lookups[key_hash]

    def live(self, key_hashes):
        """Which of ``key_hashes`` are still live, asking the database (one query) for
        those not checked within KEY_CACHE_SECONDS."""
        now = time.monotonic()
        stale = [h for h in key_hashes if self._entries.get(h, (None, 0))[1] <= now]
        if stale:
            self._load(stale)
        return {h for h in key_hashes if self._entries.get(h, (None,))[0] is not None}

    def _load(self, key_hashes):
        with connection():
            rows = (ApiKey.select(ApiKey.organization, ApiKey.scopes, ApiKey.key_hash)
                    .where(ApiKey.key_hash.in_(key_hashes) & ~ApiKey.revoked)
                    .tuples())
            found = {key_hash: Principal(str(org), frozenset(scopes.split(",")), key_hash)
                     for org, scopes, key_hash in rows}
        expires = time.monotonic() + self._ttl
        if len(self._entries) + len(key_hashes) > KEY_CACHE_ENTRIES:
            self._entries = {}  # bounded: random keys from a client never pile up
        for key_hash in key_hashes:
            self._entries[key_hash] = (found.get(key_hash), expires)
        return found


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
    key_hash = hash_key(key or key_from_request())
    principal = current_app.extensions["keys"].principal(key_hash) if key_hash else None
    if principal is None:
        raise ApiError(401, "unauthorized", "A valid API key is required.",
                       headers={"WWW-Authenticate": 'Bearer realm="ingest"'})
    if scope not in principal.scopes:
        raise ApiError(403, "forbidden", "This key lacks the '%s' scope." % scope)
    g.organization_id = principal.organization_id
    bind_context(organization_id=principal.organization_id)
    _check_rate(principal)
    return principal


def _check_rate(principal):
    """429 once the key has spent its RATE_LIMIT budget (DESIGN §13)."""
    rate_limit = current_app.extensions["rate_limit"]
    if rate_limit is None:
        return
    wait = rate_limit.retry_after(principal.key_hash)
    if wait is not None:
        raise too_many_requests("rate_limited", "This key is over its rate limit (%s); retry after "
                                "%d s." % (rate_limit.spec, wait), wait, {"limit": rate_limit.spec})


def require(scope):
    """Decorator: the view needs a key with ``scope``."""
    def decorator(view):
        @functools.wraps(view)
        def wrapped(*args, **kwargs):
            authenticate(scope)
            return view(*args, **kwargs)
        return wrapped
    return decorator
