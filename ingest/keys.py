"""API keys at request time: the per-process cache of keys, the check of a key
(for requests and feed sockets alike) and the watch that closes the feed sockets of
revoked keys (DESIGN §5). Keys are created and revoked in ingest/accounts.py.

Keys are cached per process for KEY_CACHE_SECONDS, so a request or a feed
socket authenticates without a database round trip, and 1,000 sockets
reconnecting with the same key cost one query. The price: a revoked key keeps
working for up to KEY_CACHE_SECONDS on HTTP; open feed sockets are checked
again every KEY_CACHE_SECONDS, so theirs close within twice that.

With a replica (DATABASE_READ_URL), keys are looked up there, and those it does
not know are looked up on the primary before being refused: a key created a
moment ago works at once. A key revoked a moment ago may live on for the
replica's lag, on top of KEY_CACHE_SECONDS.

Failed authentications are limited per client address (AUTH_FAILURE_LIMIT):
each failure spends one from the address's budget, and once it is spent a key
not already cached is refused before any database lookup (a cached live key
still goes through).
"""
import collections
import hashlib
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from ingest import replica
from ingest.sockets import Close
from ingest.threads import Threads
from models import ApiKey

log = logging.getLogger(__name__)

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
