"""A process's ordered delivery of one organization's changes (ingest/fanout.py, OrgFeed), as a
property: whatever order the bus brings changes in, with duplicates and losses,
and whenever the store is read, the changes delivered are in position order, each
once, and include every change the store still has; and, in process, a feed that
starts far behind the store catches up at the store's pace."""
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from ingest import changes, runtime
from ingest.fanout import HOLE_SECONDS, STORE_PAGE, OrgFeed
from tests.feed_client import LocalSocket
from tests.helpers import bearer, interaction


@st.composite
def histories(draw):
    """Committed positions 1..n, those since erased (the store skips them), and what
    arrives from the bus: a shuffled subset, some twice, cut into batches, with reads
    of the store at some points."""
    n = draw(st.integers(1, 60))
    erased = draw(st.sets(st.integers(1, n)))
    arrived = draw(st.lists(st.integers(1, n), max_size=2 * n))
    cuts = draw(st.lists(st.booleans(), min_size=len(arrived), max_size=len(arrived)))
    page = draw(st.integers(1, 20))
    return n, erased, arrived, cuts, page


def read_store(n, erased, after, page):
    """What changes.read gives: the kept changes after ``after``, up to ``page`` rows
    scanned, and the last position scanned."""
    scanned = list(range(after + 1, min(after + page, n) + 1))
    return [(p, "m%d" % p) for p in scanned if p not in erased], scanned[-1] if scanned else after


@settings(max_examples=300, deadline=None)
@given(history=histories())
def test_whatever_the_bus_does_changes_are_delivered_in_order_once_and_none_kept_is_missed(history):
    n, erased, arrived, cuts, page = history
    feed, delivered, now = OrgFeed(), [], 0.0
    feed.start(0)
    for position, fill_now in zip(arrived, cuts, strict=True):
        now += 0.05
        delivered += feed.take([(position, "m%d" % position)], now)
        if fill_now or feed.wants_fill(now):
            delivered += feed.fill(*read_store(n, erased, feed.position, page), now)
    while feed.position < n:  # the tail check finds the store ahead: read until caught up
        delivered += feed.fill(*read_store(n, erased, feed.position, page), now)
    positions = [position for position, _ in delivered]
    assert positions == sorted(set(positions))
    assert set(range(1, n + 1)) - erased <= set(positions)
    assert all(message == "m%d" % position for position, message in delivered)
    assert not feed.held and feed.hole_since is None


def test_a_hole_waits_briefly_for_a_late_change_before_the_store_is_read():
    feed = OrgFeed()
    feed.start(10)
    assert feed.take([(12, "b")], now=1.0) == []
    assert not feed.wants_fill(1.0 + HOLE_SECONDS / 2)
    assert feed.take([(11, "a")], now=1.1) == [(11, "a"), (12, "b")]
    assert feed.take([(14, "d")], now=2.0) == []
    assert feed.wants_fill(2.0 + HOLE_SECONDS)


def test_a_feed_that_starts_far_behind_the_store_catches_up_at_the_stores_pace(app, client, org, customer_id):
    """A feed starts where its first socket does, which may be a position read up to
    START_SECONDS before (CatchUp.start_position): under load, thousands of changes
    behind. It reads them from the store a page at a time, the next page as soon as
    one is delivered; it read one page a tick (a second), and a socket of a test
    waited 25 s for 5,000 changes. Twenty pages behind, they all arrive within 5 s
    (at a page a tick, 20 s)."""
    behind = 20 * STORE_PAGE
    for _ in range(behind // 1000):
        response = client.post("/api/data/ingest/batch", headers=bearer(org["ingestKey"]),
                               json={"interactions": [interaction(customer_id) for _ in range(1000)]})
        assert response.status_code == 200 and response.get_json()["successful"] == 1000
    browser = LocalSocket(runtime.of(app).bus, org["organizationId"], org["readKey"], start=0)
    response = client.post("/api/data/ingest", headers=bearer(org["ingestKey"]), json=interaction(customer_id))
    assert response.status_code == 201
    deadline, positions = time.monotonic() + 5, []
    while len(positions) <= behind:
        message = browser.next(timeout=max(0.01, deadline - time.monotonic()))
        positions.append(changes.position_of(org["organizationId"], message["cursor"]))
    assert positions == list(range(1, behind + 2))
