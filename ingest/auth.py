"""Admission of a request, in one place: its key and scope (DESIGN §5), its key's
request and events budgets and the analysis backlog bound (§13). Every 429 is
raised here. The parts, in this order: the request's admission (``require``,
``admit``, ``charge_events``); the keys (``KeyCache``, ``check_key``, the
``RevocationWatch`` of feed sockets); the budgets (``RateLimit``) and the
backlog bound (``Backlog``), which only count and decide.

A 401 spends one from the client address's AUTH_FAILURE_LIMIT budget; once it
is spent the address is answered 429 ``auth_rate_limited``. The address is
``request.remote_addr``: behind nginx that is nginx's own, unless
TRUSTED_PROXIES says how many proxies' X-Forwarded-For to believe (app.py).
"""
import collections
import functools
import hashlib
import logging
import math
import re
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass

from flask import g, request
from limits import RateLimitItemPerSecond
from limits.errors import StorageError
from limits.storage import storage_from_string
from limits.strategies import SlidingWindowCounterRateLimiter

from ingest import metrics, replica
from ingest.domain import Code, validation_error
from ingest.errors import ApiError
from ingest.fanout import Close
from ingest.logs import bind_context
from ingest.threads import Threads
from models import PENDING, ApiKey, connection, db

log = logging.getLogger(__name__)

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
    process = g.runtime
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
    rate_limit = g.runtime.rate_limit
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


# ============================================================================
# API keys at request time: the per-process cache of keys, the check of a key
# (for requests and feed sockets alike) and the watch that closes the feed sockets of
# revoked keys (DESIGN §5). Keys are created and revoked in ingest/accounts.py.
#
# Keys are cached per process for KEY_CACHE_SECONDS, so a request or a feed
# socket authenticates without a database round trip, and 1,000 sockets
# reconnecting with the same key cost one query. The price: a revoked key keeps
# working for up to KEY_CACHE_SECONDS on HTTP; open feed sockets are checked
# again every KEY_CACHE_SECONDS, so theirs close within twice that.
#
# With a replica (DATABASE_READ_URL), keys are looked up there, and those it does
# not know are looked up on the primary before being refused: a key created a
# moment ago works at once. A key revoked a moment ago may live on for the
# replica's lag, on top of KEY_CACHE_SECONDS.
#
# Failed authentications are limited per client address (AUTH_FAILURE_LIMIT):
# each failure spends one from the address's budget, and once it is spent a key
# not already cached is refused before any database lookup (a cached live key
# still goes through).

KEY_CACHE_SECONDS = 5
KEY_CACHE_ENTRIES = 10_000  # bounded: beyond it, the least recently used key goes
LOOKUP_WAIT = 30  # seconds a request waits for another thread's lookup of the same key


def hash_key(key):
    """The SHA-256 of a key, or None for anything that cannot be one of ours."""
    if not isinstance(key, str) or not key:
        return None
    try:
        return hashlib.sha256(key.encode("utf-8")).hexdigest()
    except UnicodeEncodeError:  # a lone surrogate
        return None


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
        rows = replica.rows(ApiKey.select(ApiKey.organization, ApiKey.scopes, ApiKey.key_hash)
                            .where(ApiKey.key_hash.in_(key_hashes) & ~ApiKey.revoked)
                            .tuples(),
                            enough=lambda found: len(found) == len(set(key_hashes)))
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


class AddressRefused(Exception):
    """The client's address spent its AUTH_FAILURE_LIMIT: ``refusal`` is (budget, wait)."""

    def __init__(self, refusal):
        super().__init__("too many failed authentications from this address")
        self.refusal = refusal


def check_key(key, address, keys, failures):
    """The Principal of ``key`` (None: no live key). A key not in the cache is
    looked up only while ``address`` has failed less often than ``failures``
    (AUTH_FAILURE_LIMIT, or None) allows, and a failure is counted; raises
    AddressRefused. For requests and feed sockets alike."""
    key_hash = hash_key(key)
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


class RevocationWatch:
    """Every KEY_CACHE_SECONDS, the feed sockets (``fanout``'s) of a key revoked
    meanwhile are closed with 4401: the key cache alone would let them live on."""

    def __init__(self, keys, fanout):
        self._keys = keys
        self._fanout = fanout
        self._threads = Threads(("feed-keys", self._run))

    def start(self):
        self._threads.start()

    def stop(self):
        self._threads.stop()

    def _run(self):
        while not self._threads.stopping.wait(KEY_CACHE_SECONDS):
            in_use = self._fanout.key_hashes()
            if not in_use:
                continue
            try:
                revoked = in_use - self._keys.live(in_use)
            except Exception:  # the database is away; keep the sockets, ask again later
                log.warning("could not check the feed sockets' keys", exc_info=True)
                continue
            if revoked:
                self._fanout.close_keys(revoked, Close.UNAUTHORIZED, "key revoked")


# ============================================================================
# Overload protection (DESIGN §13): per-key rate limits and the analysis backlog bound.
#
# ``RateLimit`` and ``Backlog`` only decide; ``admit`` and ``charge_events`` (above)
# answer 429 with Retry-After before anything is stored, so a batch is refused whole.
# The request budgets and the backlog are checked before the body is read, the events
# budgets once it is read and its events counted. Neither costs the request path a database
# query: the backlog is sampled by a background thread at most once a second.
#
# RATE_LIMIT is one budget or several, separated by ";" or ",", each counting a
# key's requests or its events (the items a request carries: a single ingest or
# Segment call 1, a batch its number of items):
#
#     N/UNIT [burst M]          requests, e.g. "200/s burst 1000"
#     N events/UNIT [burst M]   events, e.g. "5000 events/s burst 20000"
#
# UNIT is s, m, h or d (or sec/second, min/minute, hour, day). Each budget is
# spent independently: a request must fit every budget of its kind.
#
# Rate limits use the `limits` library (the core of flask-limiter) with its
# sliding-window counter, in Redis when the service runs on several processes, in
# memory otherwise. ``"200/s burst 1000"`` becomes 1,000 per 5-second window: the
# sustained rate and the burst of a token bucket of 1,000 tokens refilled at
# 200/s. If Redis cannot be reached, requests are let through (the limiter
# protects the service; it must not take it down) and a warning is logged, at
# most once per FAIL_OPEN_SECONDS.
#
# A Redis round trip per request would slow single ingest noticeably
# (bench/overhead.py, docs/BENCHMARKS.md), so a process takes a key's budget from
# the store in leases of 1 % of it (at least 1, and at least what the request costs) and spends them locally for up to
# LEASE_SECONDS: the limit is never exceeded (a lease is counted in the store
# when taken, atomically with the check), and a lease left unspent only makes it
# stricter, by at most 1 % of the budget per process. A request that one of
# several budgets refuses has still spent its cost in those checked before it:
# stricter again, never over.

FAIL_OPEN_SECONDS = 1.0
LEASE_FRACTION = 100
LEASE_SECONDS = 1.0
LEASED_KEYS = 10_000  # bounded: beyond it, the leases are dropped (a little budget lost)
BACKLOG_SAMPLE_SECONDS = 1.0
BACKLOG_RETRY_AFTER = 10  # seconds: the consumers drain a backlog at thousands a second
BACKLOG_PASSES = 4  # bounds a sample's cost; see Backlog
REQUESTS, EVENTS = "requests", "events"
SYNTAX = ("RATE_LIMIT (and AUTH_FAILURE_LIMIT) must be one or more budgets separated by ';', each "
          "like '200/s burst 1000' (requests) or '5000 events/s burst 20000' (events), per s, m, h "
          "or d; not %r")
_BUDGET = re.compile(r"^\s*(\d+)\s*(events?)?\s*/\s*(s|sec|second|m|min|minute|h|hour|d|day)\s*"
                     r"(?:burst\s+(\d+))?\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class Budget:
    """One budget of a RATE_LIMIT: ``item`` (a `limits` item) of ``kind`` (REQUESTS or
    EVENTS) per identity, taken from the store in leases of ``lease``."""

    def __init__(self, spec, kind, item):
        self.spec = spec
        self.kind = kind
        self.item = item
        self.lease = max(1, item.amount // LEASE_FRACTION)
        self.leases = {}  # identity -> [units left, expires at]


def parse_rate(spec):
    """``"200/s burst 1000; 5000 events/s"`` -> its Budgets: 1,000 requests per 5 s and
    5,000 events per 1 s."""
    budgets = []
    for part in (spec or "").replace(",", ";").split(";"):
        match = _BUDGET.match(part)
        if not match or int(match.group(1)) == 0 or int(match.group(4) or 1) == 0:
            raise ValueError(SYNTAX % spec)
        per_second = int(match.group(1)) / _UNIT_SECONDS[match.group(3)[0].lower()]
        burst = int(match.group(4) or match.group(1))
        item = RateLimitItemPerSecond(burst, max(1, round(burst / per_second)))
        budgets.append(Budget(part.strip(), EVENTS if match.group(2) else REQUESTS, item))
    return budgets


class RateLimit:
    """Budgets per identity (an API key's hash, a client address), shared by every
    process that uses the same storage."""

    def __init__(self, spec, storage_url):
        self.spec = spec
        self.budgets = parse_rate(spec)
        options = {"socket_timeout": 0.25, "socket_connect_timeout": 0.25} if storage_url.startswith(
            "redis") else {}
        self.limiter = SlidingWindowCounterRateLimiter(
            storage_from_string(storage_url, key_prefix="ingest-rate", wrap_exceptions=True, **options))
        self._failing_until = 0.0
        self._lock = threading.Lock()

    def largest(self, kind):
        """The most one request may cost in ``kind`` (None: no budget of that kind)."""
        return min((budget.item.amount for budget in self.budgets if budget.kind == kind), default=None)

    def retry_after(self, identity, kind=REQUESTS, cost=1):
        """None when ``identity`` may spend ``cost`` of ``kind`` (and it is spent), else
        (the Budget that refused, the seconds to wait: at least 1)."""
        return self._refusal(identity, kind, lambda budget, now: self._spend(budget, identity, cost, now))

    def exhausted(self, identity, kind=REQUESTS):
        """Like retry_after, but spends nothing: a refusal once nothing is left in the
        store (a lease this process holds is not counted: stricter by at most it)."""
        return self._refusal(identity, kind, lambda budget, now: self.limiter.test(budget.item, identity, kind))

    def _refusal(self, identity, kind, allows):
        now = time.monotonic()
        if now < self._failing_until:
            return None
        try:
            for budget in self.budgets:
                if budget.kind == kind and not allows(budget, now):
                    reset = self.limiter.get_window_stats(budget.item, identity, kind).reset_time
                    return budget, min(budget.item.get_expiry(), max(1, math.ceil(reset - time.time())))
        except StorageError as error:
            self._failing_until = time.monotonic() + FAIL_OPEN_SECONDS
            log.warning("rate limit storage unavailable; letting requests through",
                        extra={"error": str(error.storage_error)})
        return None

    def _spend(self, budget, identity, cost, now):
        """Take ``cost`` from this process's lease, or from the store: with a new lease
        if none is held (one too small for ``cost`` is kept for smaller requests)."""
        with self._lock:
            lease = budget.leases.get(identity)
            held = lease is not None and lease[0] > 0 and lease[1] > now
            if held and lease[0] >= cost:
                lease[0] -= cost
                return True
        wanted = max(budget.lease, cost)
        if not held and wanted > cost and self.limiter.hit(budget.item, identity, budget.kind, cost=wanted):
            self._take_lease(budget, identity, wanted - cost, now)
            return True
        return self.limiter.hit(budget.item, identity, budget.kind, cost=cost)

    def _take_lease(self, budget, identity, units, now):
        with self._lock:
            if len(budget.leases) >= LEASED_KEYS:
                budget.leases.clear()
            budget.leases[identity] = [units, now + LEASE_SECONDS]


# Pending analyses: their total, counted up to a cap (the analysis_status index),
# and each organization's, counted up to a cap, organizations found one index
# probe each (the partial index of migration 0004; a loose index scan).
_PENDING_TOTAL = ("SELECT count(*) FROM (SELECT 1 FROM interaction WHERE analysis_status = '%s' "
                  "LIMIT %%d) AS capped" % PENDING)
_NEXT_ORGANIZATION = ("SELECT organization_id FROM interaction WHERE analysis_status = '%s'%%s "
                      "ORDER BY organization_id LIMIT 1" % PENDING)
_PENDING_BY_ORGANIZATION = (
    "WITH RECURSIVE backlog(organization_id) AS ("
    "SELECT (" + _NEXT_ORGANIZATION % "" + ") "
    "UNION ALL SELECT (" + _NEXT_ORGANIZATION % " AND organization_id > backlog.organization_id" + ") "
    "FROM backlog WHERE backlog.organization_id IS NOT NULL) "
    "SELECT organization_id, (SELECT count(*) FROM (SELECT 1 FROM interaction AS i "
    "WHERE i.analysis_status = '" + PENDING + "' AND i.organization_id = backlog.organization_id "
    "LIMIT %d) AS capped) FROM backlog WHERE organization_id IS NOT NULL")


class Backlog:
    """Pending analyses, sampled: which organizations are over their share of ``limit``?

    The bound is shared max-min fairly among the organizations with a backlog.
    While the total is over it, an organization is refused when its own pending
    count is over the level L at which the counts, each cut at L, add up to the
    bound: each organization has an equal share, and what one does not use is
    shared among the others. So an organization is refused for its own backlog,
    never for another's, and one within its share goes on ingesting while
    another holds the bound.

    A sample costs at most ``limit + 1`` index entries, as the total stops there;
    only while it is over, the organizations' counts are read, each stopping at
    the share being tested (over_share), in at most 1 + BACKLOG_PASSES queries.
    """

    def __init__(self, limit):
        self.limit = limit
        self.pending = 0
        self.refused = frozenset()  # organization ids (canonical UUID strings)
        self._sampled_at = float("-inf")
        self._lock = threading.Lock()
        self._sampling = False
        self._sampler = None
        self._stopped = False

    def start(self):
        """Samples are taken on demand (``refresh``), each on a thread of its own."""

    def stop(self):
        """Take no more samples, and wait for the one under way."""
        with self._lock:
            self._stopped = True
            sampler = self._sampler
        if sampler is not None:
            sampler.join()

    def retry_after(self, organization_id):
        """None when ``organization_id`` may ingest, else the seconds to wait."""
        self.refresh()
        return BACKLOG_RETRY_AFTER if organization_id in self.refused else None

    def refresh(self):
        """Start a new sample in the background if the last one is stale."""
        if self._sampling or time.monotonic() - self._sampled_at < BACKLOG_SAMPLE_SECONDS:
            return  # the common case, decided without the lock every request would take
        with self._lock:
            if self._stopped or self._sampling or time.monotonic() - self._sampled_at < BACKLOG_SAMPLE_SECONDS:
                return
            self._sampling = True
            self._sampler = threading.Thread(target=self._sample, name="backlog-sample", daemon=True)
            self._sampler.start()

    def _sample(self):
        try:
            with connection():
                pending = db.execute_sql(_PENDING_TOTAL % (self.limit + 1)).fetchone()[0]
                refused = over_share(self.limit, pending_by_organization) if pending > self.limit else frozenset()
            self.pending, self.refused = pending, refused
        except Exception:  # the database is down: requests find out on their own
            log.warning("sampling the analysis backlog failed", exc_info=True)
        finally:
            self._sampled_at = time.monotonic()
            self._sampling = False


def pending_by_organization(cap):
    """{organization id: its pending analyses, counted up to ``cap``} of every
    organization that has any."""
    return {str(uuid.UUID(str(organization))): count
            for organization, count in db.execute_sql(_PENDING_BY_ORGANIZATION % cap).fetchall()}


def over_share(limit, count, passes=BACKLOG_PASSES):
    """The organizations whose backlog is over their max-min fair share of ``limit``.

    ``count(cap)`` gives ``{organization: min(its backlog, cap)}``. Water-filling
    with counts cut just above the share being tested: an organization within the
    equal share of what is left is within its share (the level only rises as
    such ones leave); when none of those left is within, all of them are over.
    Each pass reads at most ``limit`` + organizations entries. Those still
    undecided after ``passes`` are refused: each is over the share of every pass
    (at least limit / organizations), with one of the largest backlogs.
    """
    room, undecided = limit, set(count(1))
    for _ in range(passes):
        if not undecided:
            break
        share = room / len(undecided)
        counts = count(math.floor(share) + 1)
        within = {organization for organization in undecided if counts.get(organization, 0) <= share}
        if not within:
            break
        room -= sum(counts.get(organization, 0) for organization in within)
        undecided -= within
    return frozenset(undecided)
