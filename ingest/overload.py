"""Overload protection (DESIGN §13): per-key rate limits and the analysis backlog bound.

Both only decide; the HTTP layer answers 429 with Retry-After before it reads
the request's body, so what is refused is never stored, and a batch is refused
whole. Neither costs the request path a database query: the backlog is sampled
by a background thread at most once a second.

Rate limits use the `limits` library (the core of flask-limiter) with its
sliding-window counter, in Redis when the service runs on several processes, in
memory otherwise. ``RATE_LIMIT = "200/s burst 1000"`` becomes 1,000 requests per
5-second window: the sustained rate and the burst of a token bucket of 1,000
tokens refilled at 200/s. If Redis cannot be reached, requests are let through
(the limiter protects the service; it must not take it down) and a warning is
logged, at most once per FAIL_OPEN_SECONDS.

A Redis round trip per request cost single ingest 18-35 % (bench/overhead.py), so
a process takes a key's budget from the store in leases of 1 % of it (at least
1) and spends them locally for up to LEASE_SECONDS: the limit is never exceeded
(a lease is counted in the store when taken), and a lease left unspent only
makes it stricter, by at most 1 % of the budget per process.
"""
import logging
import math
import re
import threading
import time

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
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*(?:burst\s+(\d+))?\s*$",
                   re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}


def parse_rate(spec):
    """``"200/s burst 1000"`` -> a limit of 1,000 per 5 s; ``"50/s"`` -> 50 per 1 s."""
    match = _RATE.match(spec or "")
    if not match or int(match.group(1)) == 0:
        raise ValueError("RATE_LIMIT must look like '200/s burst 1000' (or '600/min'), not %r" % spec)
    per_second = int(match.group(1)) / _UNIT_SECONDS[match.group(2)[0].lower()]
    burst = int(match.group(3) or match.group(1))
    return RateLimitItemPerSecond(burst, max(1, round(burst / per_second)))


class RateLimit:
    """One budget per API key, shared by every process that uses the same storage."""

    def __init__(self, spec, storage_url):
        self.spec = spec
        self.item = parse_rate(spec)
        options = {"socket_timeout": 0.25, "socket_connect_timeout": 0.25} if storage_url.startswith(
            "redis") else {}
        self.limiter = SlidingWindowCounterRateLimiter(
            storage_from_string(storage_url, key_prefix="ingest-rate", wrap_exceptions=True, **options))
        self._failing_until = 0.0
        self.lease = max(1, self.item.amount // LEASE_FRACTION)
        self._leases = {}  # identity -> [requests left, expires at]
        self._lock = threading.Lock()

    def retry_after(self, identity):
        """None when ``identity`` may go on, else the seconds to wait (at least 1)."""
        now = time.monotonic()
        if now < self._failing_until or self._spend_lease(identity, now):
            return None
        try:
            if self.lease > 1 and self.limiter.hit(self.item, identity, cost=self.lease):
                self._take_lease(identity, now)
                return None
            if self.limiter.hit(self.item, identity):  # the last of the budget, one at a time
                return None
            reset = self.limiter.get_window_stats(self.item, identity).reset_time
        except StorageError as error:
            self._failing_until = time.monotonic() + FAIL_OPEN_SECONDS
            log.warning("rate limit storage unavailable; letting requests through",
                        extra={"error": str(error.storage_error)})
            return None
        return min(self.item.get_expiry(), max(1, math.ceil(reset - time.time())))

    def _spend_lease(self, identity, now):
        with self._lock:
            lease = self._leases.get(identity)
            if lease is None or lease[0] == 0 or lease[1] <= now:
                return False
            lease[0] -= 1
            return True

    def _take_lease(self, identity, now):
        with self._lock:
            if len(self._leases) >= LEASED_KEYS:
                self._leases.clear()
            self._leases[identity] = [self.lease - 1, now + LEASE_SECONDS]


class Backlog:
    """Pending analyses, sampled: is the backlog over ``limit``?

    The count stops at ``limit + 1`` so that a sample costs at most that many
    index entries, however large the backlog grew.
    """

    def __init__(self, limit):
        self.limit = limit
        self.pending = 0
        self._sampled_at = float("-inf")
        self._lock = threading.Lock()
        self._sampling = False

    def retry_after(self):
        """None when ingest may go on, else the seconds to wait."""
        self._sample_if_stale()
        return BACKLOG_RETRY_AFTER if self.pending > self.limit else None

    def _sample_if_stale(self):
        if self._sampling or time.monotonic() - self._sampled_at < BACKLOG_SAMPLE_SECONDS:
            return  # the common case, decided without the lock every request would take
        with self._lock:
            if self._sampling or time.monotonic() - self._sampled_at < BACKLOG_SAMPLE_SECONDS:
                return
            self._sampling = True
        threading.Thread(target=self._sample, name="backlog-sample", daemon=True).start()

    def _sample(self):
        try:
            with connection():
                self.pending = db.execute_sql(
                    "SELECT count(*) FROM (SELECT 1 FROM interaction WHERE analysis_status = '%s' "
                    "LIMIT %d) AS bounded" % (PENDING, self.limit + 1)).fetchone()[0]
        except Exception:  # the database is down: requests find out on their own
            log.warning("sampling the analysis backlog failed", exc_info=True)
        finally:
            self._sampled_at = time.monotonic()
            self._sampling = False
