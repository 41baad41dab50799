"""What the fan-out reads from the store (DESIGN §8, §16): where a socket starts,
the changes a socket or a feed missed, and whether a feed is behind.

Every socket is sent its organization's changes in position order, each once
(ingest/feeds.py): the changes after the cursor it resumed from (``after`` in its
auth message), then live ones. A socket that resumes, or whose outbox overflowed
and has drained since, catches up from its feed's recent frames, else from the
store a page at a time while its outbox has room, then joins the live feed. A
feed's hole that lasts HOLE_SECONDS is filled from the store, and so is a feed
whose organization's events the bus lost (``FanOut.resync``, or the store found
ahead of it for a whole CHECK_SECONDS).

``CatchUp`` starts these reads on the fan-out loop's thread and runs them on its
work threads, which alone read the store; each read's result comes back to the
loop thread as a command posted to the loop (``post``), whose handler (``_on_...``)
applies it there. ``start_position`` is called on a work thread, by a socket's
authentication.
"""
import logging
import threading
import time

from ingest import changes
from ingest.sockets import Close, encode, framed
from models import connection

log = logging.getLogger(__name__)

CHECK_SECONDS = 2  # how often the store is asked whether a feed missed its latest changes
START_SECONDS = 1  # how long a read of an organization's last position serves new sockets
MAX_STARTS = 10_000  # organizations whose last position is kept; beyond, all are forgotten
# Changes read from the store at a time, for a socket catching up or a feed's hole: a
# page of the largest events (26 KB) stays a few MB, and a socket takes a page only
# while its outbox has room.
STORE_PAGE = 200


class CatchUp:
    """The store reads of a fan-out whose feeds are ``feeds`` (organization -> OrgFeed),
    run on ``pool``; ``post(command)`` hands a result to the loop thread."""

    def __init__(self, feeds, pool, post):
        self._feeds = feeds
        self._pool = pool
        self._post = post
        self._starts = {}  # organization -> (its last position in the store, when read)
        self._starts_lock = threading.Lock()
        self._next_check = time.monotonic() + CHECK_SECONDS

    def start_position(self, organization_id):
        """The organization's last position in the store, read at most once every
        START_SECONDS per process (an older one only means a socket that asked for
        "from now on" starts a little earlier): where a socket without a cursor
        starts. Called on a work thread, so a reconnect storm costs one query."""
        now = time.monotonic()
        with self._starts_lock:
            known = self._starts.get(organization_id)
        if known is not None and now - known[1] < START_SECONDS:
            return known[0]
        with connection():
            position = changes.stream(organization_id)[0]
        with self._starts_lock:
            if len(self._starts) >= MAX_STARTS:
                self._starts.clear()
            self._starts[organization_id] = (position, now)
        return position

    # The loop thread ------------------------------------------------------------

    def socket(self, feed_socket):
        """Bring an open socket in step with its feed: from recent frames, or a page
        from the store at a time while its outbox has room."""
        feed = self._feeds[feed_socket.organization_id]
        if feed_socket.reading or feed_socket in feed.live:
            return
        if feed_socket.position is None:
            feed_socket.position = feed_socket.starts_after()
        recent = feed.recent_after(feed_socket.position)
        if recent is not None and (not recent or feed_socket.push(None, recent)):
            feed.live.add(feed_socket)
        elif feed_socket.has_room():
            feed_socket.reading = True
            self._work(self._read_page, feed_socket, feed_socket.position,
                       failed=lambda: setattr(feed_socket, "reading", False))

    def fill(self, organization_id, feed):
        """Read the changes the feed misses from the store."""
        feed.filling = True
        self._work(self._read_fill, organization_id, feed.position, failed=lambda: setattr(feed, "filling", False))

    def tend(self, now):
        """Fill the feeds' holes older than HOLE_SECONDS; every CHECK_SECONDS, ask the
        store, for every feed at once, whether changes were committed that never
        arrived (a publish lost at the tail)."""
        for organization_id, feed in self._feeds.items():
            if feed.wants_fill(now):
                self.fill(organization_id, feed)
        if now >= self._next_check:
            self._next_check = now + CHECK_SECONDS
            if self._feeds:
                self._work(self._read_positions, list(self._feeds))

    def _work(self, read, *args, failed=None):
        """Run ``read(*args)`` on a work thread and post the command it returns; if it
        raises, ``failed()`` runs on the loop thread instead."""
        def run():
            try:
                self._post(read(*args))
            except Exception:
                log.warning("feed store read failed; tried again later", exc_info=True)
                self._post((self._on_work_failed, failed))
        self._pool.submit(run)

    # Work threads: each read returns the command that applies its result ----------

    def _read_page(self, feed_socket, after):
        try:
            items, last = _read(feed_socket.organization_id, after)
        except changes.ExpiredCursor as expired:
            return self._on_expired, feed_socket, expired.oldest
        return self._on_page, feed_socket, items, last

    def _read_fill(self, organization_id, after):
        try:
            items, last = _read(organization_id, after)
        except changes.ExpiredCursor as expired:  # retention went past it: go on from what is kept
            items, last = [], changes.position_of(organization_id, expired.oldest)
        return self._on_filled, organization_id, items, last

    def _read_positions(self, organization_ids):
        with connection():
            return self._on_checked, changes.positions(organization_ids)

    # The loop thread: the results -----------------------------------------------

    def _on_page(self, touched, feed_socket, items, last):
        feed_socket.reading = False
        feed = self._feeds.get(feed_socket.organization_id)
        if feed_socket.discarded or feed is None:
            return
        if last == feed_socket.position:  # the store has nothing after it: what follows comes live
            feed.live.add(feed_socket)
        frames = framed(items)
        if frames and not feed_socket.push(None, frames):
            return  # it goes on once its outbox has drained (Sockets.flush)
        feed_socket.position = max(feed_socket.position, last)  # what the store lacks up to last is gone
        self.socket(feed_socket)
        touched.add(feed_socket)

    def _on_expired(self, touched, feed_socket, oldest):
        feed_socket.reading = False
        feed_socket.begin_close(Close.CURSOR_EXPIRED, "cursor expired; oldest: " + oldest, time.monotonic())
        touched.add(feed_socket)

    def _on_filled(self, touched, organization_id, items, last):
        feed = self._feeds.get(organization_id)
        if feed is not None:
            feed.filling = False
            before = feed.position
            touched.update(feed.filled(items, last, time.monotonic()))
            if feed.hole_since is not None and feed.position > before:
                self.fill(organization_id, feed)  # still short of what it holds: the next page now

    def _on_checked(self, touched, positions):
        for organization_id, position in positions.items():
            feed = self._feeds.get(organization_id)
            if feed is None:
                continue
            if feed.ahead is not None and feed.position < feed.ahead and not feed.filling:
                self.fill(organization_id, feed)  # still short of it a check later: lost, not late
            feed.ahead = position if position > feed.position else None

    def _on_work_failed(self, touched, failed):
        if failed is not None:
            failed()


def _read(organization_id, after):
    """A page of the organization's changes after position ``after``: ((position, JSON
    text)), and the last position read; ExpiredCursor if they are no longer kept.
    ``changes.read`` takes a connection of the database it reads (the replica's or
    the primary's) for the read."""
    events, last = changes.read(organization_id, after, STORE_PAGE)
    return [(changes.position_of(organization_id, event["cursor"]), text)
            for event, text in zip(events, encode(events), strict=True)], last
