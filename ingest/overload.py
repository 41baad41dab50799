"""Overload protection (DESIGN §13): per-key rate limits and the analysis backlog bound.

Both only decide; the HTTP layer answers 429 with Retry-After before anything
is stored, so a batch is refused whole. The request budgets and the backlog are
checked before the body is read, the events budgets once it is read and its
events counted (ingest/api.py). Neither costs the request path a database
query: the backlog is sampled by a background thread at most once a second.

RATE_LIMIT is one budget or several, separated by ";" or ",", each counting a
key's requests or its events (the items a request carries: a single ingest or
Segment call 1, a batch its number of items):

    N/UNIT [burst M]          requests, e.g. "200/s burst 1000"
    N events/UNIT [burst M]   events, e.g. "5000 events/s burst 20000"

UNIT is s, m, h or d (or sec/second, min/minute, hour, day). Each budget is
spent independently: a request must fit every budget of its kind.

Rate limits use the `limits` library (the core of flask-limiter) with its
sliding-window counter, in Redis when the service runs on several processes, in
memory otherwise. ``"200/s burst 1000"`` becomes 1,000 per 5-second window: the
sustained rate and the burst of a token bucket of 1,000 tokens refilled at
200/s. If Redis cannot be reached, requests are let through (the limiter
protects the service; it must not take it down) and a warning is logged, at
most once per FAIL_OPEN_SECONDS.

A Redis round trip per request would slow single ingest noticeably
(bench/overhead.py, docs/BENCHMARKS.md), so a process takes a key's budget from
the store in leases of 1 % of it (at least 1, and at least what the request costs) and spends them locally for up to
LEASE_SECONDS: the limit is never exceeded (a lease is counted in the store
when taken, atomically with the check), and a lease left unspent only makes it
stricter, by at most 1 % of the budget per process. A request that one of
several budgets refuses has still spent its cost in those checked before it:
stricter again, never over.
"""
import logging
import math
import re
import threading
import time
import uuid

from limits import RateLimitItemPerSecond
from limits.errors import StorageError
from limits.storage import storage_from_string
from limits.strategies import SlidingWindowCounterRateLimiter

from models import PENDING, connection, db

log = logging.getLogger(__name__)

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
