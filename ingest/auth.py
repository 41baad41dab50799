"""Authentication: the cache of keys, the request check and the key's request
and events budgets (DESIGN §5, §13). Keys are created and revoked in
ingest/accounts.py.

Keys are cached per process for KEY_CACHE_SECONDS, so a request or a feed
socket authenticates without a database round trip, and 1,000 sockets
reconnecting with the same key cost one query. The price: a revoked key keeps
working for up to KEY_CACHE_SECONDS on HTTP; open feed sockets are checked
again every KEY_CACHE_SECONDS, so theirs close within twice that.

Failed authentications are limited per client address (AUTH_FAILURE_LIMIT):
each 401 spends one from the address's budget, and once it is spent the
address is answered 429 ``auth_rate_limited``, before any database lookup, for
every key not already cached (a cached live key still goes through). The
address is ``request.remote_addr``: behind nginx that is nginx's own, unless
TRUSTED_PROXIES says how many proxies' X-Forwarded-For to believe (app.py).
"""
import collections
import functools
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from flask import current_app, g, request

from ingest.accounts import hash_key
from ingest.errors import ApiError, too_many_requests
from ingest.logs import bind_context
from ingest.overload import EVENTS, REQUESTS
from ingest.problems import Code, validation_error
from models import ApiKey, connection

KEY_CACHE_SECONDS = 5
KEY_CACHE_ENTRIES = 10_000  # bounded: beyond it, the least recently used key goes
LOOKUP_WAIT = 30  # seconds a request waits for another thread's lookup of the same key


@dataclass(frozen=True)
class Principal:
    """Who a live key speaks for."""
    organization_id: str
    scopes: frozenset
    key_hash: str


class KeyCache:
    """Keys by hash, each remembered for KEY_CACHE_SECONDS (unknown keys too), at
    most ``size`` of them: beyond, the least recently used goes, so the keys in
    use stay however many unknown ones clients try.

    Concurrent lookups of the same uncached key share one query.
    """

    def __init__(self, ttl=KEY_CACHE_SECONDS, size=KEY_CACHE_ENTRIES):
        self._ttl = ttl
        self._size = size
        self._entries = collections.OrderedDict()  # hash -> (Principal or None, expires at), oldest use first
        self._lookups = {}  # hash -> Future of the query under way
        self._lock = threading.Lock()

    def cached(self, key_hash):
        """``(Principal or None, expires at)`` while ``key_hash`` is cached, else None."""
        with self._lock:
            entry = self._entries.get(key_hash)
            if entry is None or entry[1] <= time.monotonic():
                return None
            self._entries.move_to_end(key_hash)
            return entry

    def principal(self, key_hash):
        """The Principal of a live key's hash, or None."""
        entry = self.cached(key_hash)
        if entry is not None:
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
        entries = {key_hash: self.cached(key_hash) for key_hash in key_hashes}
        stale = [key_hash for key_hash, entry in entries.items() if entry is None]
        found = self._load(stale) if stale else {}
        return {key_hash for key_hash, entry in entries.items()
                if key_hash in found or (entry is not None and entry[0] is not None)}

    def _load(self, key_hashes):
        with connection():
            rows = (ApiKey.select(ApiKey.organization, ApiKey.scopes, ApiKey.key_hash)
                    .where(ApiKey.key_hash.in_(key_hashes) & ~ApiKey.revoked)
                    .tuples())
            found = {key_hash: Principal(str(org), frozenset(scopes.split(",")), key_hash)
                     for org, scopes, key_hash in rows}
        expires = time.monotonic() + self._ttl
        with self._lock:
            for key_hash in key_hashes:
                self._entries[key_hash] = (found.get(key_hash), expires)
                self._entries.move_to_end(key_hash)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
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


class AddressRefused(Exception):
    """The client's address spent its AUTH_FAILURE_LIMIT: ``refusal`` is (budget, wait)."""

    def __init__(self, refusal):
        super().__init__("too many failed authentications from this address")
        self.refusal = refusal


def check_key(key_hash, address, keys, failures):
    """The Principal of ``key_hash`` (None: no live key). A key not in the cache is
    looked up only while ``address`` has failed less often than ``failures``
    (AUTH_FAILURE_LIMIT, or None) allows, and a failure is counted; raises
    AddressRefused. For requests and feed sockets alike."""
    entry = keys.cached(key_hash) if key_hash else None
    if entry is not None:
        principal = entry[0]
    else:
        _raise_refused(failures and failures.exhausted(address))
        principal = keys.principal(key_hash) if key_hash else None
    if principal is None:
        _raise_refused(failures and failures.retry_after(address))
    return principal


def _raise_refused(refusal):
    if refusal:
        raise AddressRefused(refusal)


def authenticate(scope, key=None):
    """Check the request's key (or ``key``) for ``scope``; sets g.organization_id."""
    try:
        principal = check_key(hash_key(key or key_from_request()), request.remote_addr or "unknown",
                              current_app.extensions["keys"], current_app.extensions["auth_failures"])
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
    rate_limit = current_app.extensions["rate_limit"]
    largest = rate_limit.largest(EVENTS) if rate_limit is not None else None
    if largest is None:
        return
    if count > largest:
        raise validation_error({field: ["At most %d events per request under this key's rate limit "
                                        "(%s)." % (largest, rate_limit.spec)]})
    _check_rate(EVENTS, count)


def _check_rate(kind, cost):
    """429 once the key has spent its RATE_LIMIT budget of ``kind`` (DESIGN §13)."""
    rate_limit = current_app.extensions["rate_limit"]
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
