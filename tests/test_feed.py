"""The live feed's WebSocket (DESIGN §8) against gunicorn with 2 workers, a
`huey_consumer` process and Redis as the event bus: events from either worker
and from the consumer reach sockets on both workers; organizations are
isolated; erasures reach every socket; the close codes; a socket that stops reading never slows ingest.

One stack serves the module (each test has its own organization), but for the
test that takes Redis away."""
import os
import signal
import statistics
import threading
import time

import pytest
import requests
import simple_websocket
from wsproto.events import TextMessage

from ingest import changes
from ingest.fanout import text_frame
from tests.feed_client import FeedClient, RawSocket, connected_pair
from tests.helpers import (
    bearer,
    interaction,
    make_customer,
    make_organization,
    post_batch,
    post_interaction,
    stored_over_http,
)
from tests.servers import Gunicorn, RedisServer, free_port, wait_until


def sockets_on_both_workers(web, key, org_id):
    """A socket of the organization on each of the stack's two workers. The kernel may
    hand every connection to one worker (it did, 100 in a row), so the second socket
    connects straight to gunicorn while the first one's worker is stopped (SIGSTOP):
    only the other one can accept it."""
    def workers():
        return [line["pid"] for line in web.log_lines()
                if line.get("message") == "feed socket connected" and line.get("organization_id") == org_id]

    first = FeedClient(web.url, key)
    assert first.next()["type"] == "ready"
    stopped = wait_until(lambda: workers() and workers()[0], message="the first socket's worker")
    os.kill(stopped, signal.SIGSTOP)
    try:
        second = FeedClient(web.web.url, key)
        assert second.next()["type"] == "ready"
    finally:
        os.kill(stopped, signal.SIGCONT)
    wait_until(lambda: len(set(workers())) == 2, message="the two sockets on two workers")
    return [first, second]


def test_events_reach_every_socket_on_every_worker(module_stack, org, customer_id):
    clients = sockets_on_both_workers(module_stack, org["readKey"], org["organizationId"])
    ids = []
    for n in range(6):  # a fresh connection each: spread over both workers
        response = post_interaction(module_stack.url, org["ingestKey"], customer_id,
                                    content="I love number %d" % n)
        ids.append(response.json()["id"])
    for client in clients:
        created, analyzed = set(), set()

        def complete(message):
            kind = message["type"]
            (created if kind == "interaction.created" else analyzed).add(message["data"]["id"])
            return created >= set(ids) and analyzed >= set(ids)
        messages = client.until(complete, timeout=20)
        first = next(m for m in messages if m["type"] == "interaction.created")
        assert first["data"]["customerId"] == customer_id and first["data"]["channel"] == "chat"
        sentiment = next(m for m in messages if m["type"] == "interaction.analyzed")["data"]
        assert sentiment["analysisStatus"] == "done" and sentiment["sentiment"]["label"] == "positive"
        client.close()


def test_erasure_reaches_every_socket_of_the_organization(module_stack, org, customer_id):
    clients = sockets_on_both_workers(module_stack, org["readKey"], org["organizationId"])
    assert requests.delete(module_stack.url + "/api/customers/" + customer_id,
                           headers=bearer(org["ingestKey"])).status_code == 204
    for client in clients:
        notice = client.until(lambda m: m["type"] == "customer.deleted")[-1]
        assert notice["data"] == {"id": customer_id}
        client.close()


def test_no_event_about_a_customer_arrives_after_its_deletion_notice(module_stack, app, org,
                                                                    customer_id):
    """Rounds of: 6 clients ingest for a customer while it is erased. Whatever a
    socket on either worker was sent about the customer came before customer.deleted
    (the publish after a commit used to overtake the erasure's notice)."""
    clients = sockets_on_both_workers(module_stack, org["readKey"], org["organizationId"])
    for _ in range(10):
        erased = make_customer(app, org)
        stop = []

        def send():
            session = requests.Session()
            while not stop:
                post_interaction(module_stack.url, org["ingestKey"], erased, session)
        senders = [threading.Thread(target=send) for _ in range(6)]
        for sender in senders:
            sender.start()
        time.sleep(0.2)  # ingest under way
        assert requests.delete(module_stack.url + "/api/customers/" + erased,
                               headers=bearer(org["ingestKey"])).status_code == 204
        time.sleep(0.2)  # ingest goes on (404s) while the last publishes land
        stop.append(True)
        for sender in senders:
            sender.join()
        marker = post_interaction(module_stack.url, org["ingestKey"], customer_id).json()["id"]
        for client in clients:
            messages = client.until(lambda m: m["type"] == "interaction.created"
                                    and m["data"]["id"] == marker, timeout=20)
            about = [m["type"] for m in messages if m["data"].get("customerId") == erased
                     or m["data"] == {"id": erased}]
            assert "customer.deleted" in about
            assert about[-1] == "customer.deleted", about[about.index("customer.deleted"):]
    for client in clients:
        client.close()


def test_a_socket_sees_only_its_organization(module_stack, app, org, customer_id):
    other = make_organization(app, "Other")
    other_customer = make_customer(app, other)
    watcher = FeedClient(module_stack.url, other["readKey"])
    ready = watcher.next()
    assert (ready["type"], ready["organizationId"]) == ("ready", other["organizationId"])
    post_interaction(module_stack.url, org["ingestKey"], customer_id, content="secret of Acme")
    marker = post_interaction(module_stack.url, other["ingestKey"], other_customer,
                              content="ours").json()["id"]
    messages = watcher.until(lambda m: m["type"] == "interaction.created")
    assert [m["data"]["id"] for m in messages] == [marker]
    watcher.close()


def test_close_codes(module_stack, org):
    assert FeedClient(module_stack.url, "ik_not_a_key").close_code()[0] == 4401
    assert FeedClient(module_stack.url, org["ingestKey"]).close_code()[0] == 4403
    for first_message in ("not json", '{"type": "auth", "token": "\\ud800"}', '{"type": "auth", "token": 7}'):
        garbled = FeedClient(module_stack.url)
        garbled.ws.send(first_message)
        assert garbled.close_code()[0] == 4401


def test_a_socket_that_authenticates_late_or_never_is_closed(module_stack, org):
    silent, late = FeedClient(module_stack.url), FeedClient(module_stack.url)
    started = time.monotonic()
    code, reason = silent.close_code(timeout=15)
    assert code == 4401 and "timed out" in reason
    assert 9 <= time.monotonic() - started <= 14
    assert late.close_code(timeout=5)[0] == 4401
    with pytest.raises(simple_websocket.ConnectionClosed):
        late.send({"type": "auth", "token": org["readKey"]})  # too late: already closed


def batch_seconds(url, key, customer_id, batches=10):
    """How long each of ``batches`` batches of 500 interactions took to be stored."""
    took = []
    for _ in range(batches):
        items = [interaction(customer_id) for _ in range(500)]
        started = time.monotonic()
        response = post_batch(url, key, items)
        took.append(time.monotonic() - started)
        assert response.status_code == 200 and response.json()["successful"] == 500
    return took


def test_a_socket_that_stops_reading_never_slows_ingest(module_stack, org, customer_id):
    """Straight to gunicorn: through nginx the stall is first absorbed by nginx's
    socket buffers (all 5,000 events fit), and nothing is dropped.

    What it guards against is ingest waiting on the socket (publishing that writes
    to it, or waits for a loop that does): each batch would then take until the
    socket is cut (STALL_SECONDS). The control is a socket that reads, so both runs
    pay the worker's framing of every event and only the stall differs. It is
    measured before and after the stalled run, which is held to twice the slower
    of the two: a drift over the test (the machine, the tables growing) counts
    against neither side, and medians are not moved by a few slow batches."""

    def with_a_reading_socket():
        reading = FeedClient(module_stack.web.url, org["readKey"])
        assert reading.next()["type"] == "ready"
        took = statistics.median(batch_seconds(module_stack.url, org["ingestKey"], customer_id))
        reading.close()
        return took

    before = with_a_reading_socket()
    stalled = RawSocket(module_stack.web.url, org["readKey"])
    with_stalled = statistics.median(batch_seconds(module_stack.url, org["ingestKey"], customer_id))
    live = FeedClient(module_stack.url, org["readKey"])  # a healthy socket is still served
    assert live.next()["type"] == "ready"
    live.close()
    assert '"count"' in stalled.resume_until_dropped()
    stalled.sock.close()
    after = with_a_reading_socket()
    print("\nmedian batch of 500: %.3f s with a stalled socket; %.3f and %.3f s with a reading one, "
          "before and after" % (with_stalled, before, after))
    assert with_stalled < 2 * max(before, after)


@pytest.mark.processes
@pytest.mark.redis
def test_losing_redis_never_breaks_ingest_nor_the_feed_and_restarts_close_sockets(app, org, customer_id,
                                                                               tmp_path):
    bus = RedisServer(free_port()).start()
    web = Gunicorn(tmp_path / "web.log", workers=1, env={
        "EVENTS_URL": bus.url, "QUEUE_URL": "sqlite:///%s" % (tmp_path / "queue.db")})
    try:
        watcher = FeedClient(web.url, org["readKey"])
        assert watcher.next()["type"] == "ready"

        def send():
            return stored_over_http(web.url, org["ingestKey"], customer_id)

        first = send()
        watcher.until(lambda m: m.get("data", {}).get("id") == first)
        bus.stop()
        started = time.monotonic()
        during = [send() for _ in range(5)]  # the bus is down: stored all the same, and quickly
        assert time.monotonic() - started < 5
        # ...and delivered all the same, in order, read from the store (they used to be a gap)
        seen = watcher.until(lambda m: m.get("data", {}).get("id") == during[-1], timeout=15)
        assert [m["data"]["id"] for m in seen if m["type"] == "interaction.created"] == during
        bus.start()

        def delivered_again():
            marker = send()
            try:
                watcher.until(lambda m: m.get("data", {}).get("id") == marker, timeout=0.5)
                return True
            except AssertionError:
                return False
        wait_until(delivered_again, timeout=30, message="the bus to reconnect")
        web.process.terminate()  # a restart: sockets are closed at once, "going away"
        assert watcher.close_code(timeout=5)[0] == 1001
    finally:
        web.stop()
        bus.stop()


def test_text_frames_decode_as_websocket_text_messages():
    """Each length encoding of RFC 6455 (7-bit, 16-bit, 64-bit), read by wsproto."""
    _, client = connected_pair()
    messages = ["x" * 10, "é" * 200, '{"k": "%s"}' % ("y" * 70_000)]
    client.receive_data(b"".join(text_frame(m) for m in messages))
    received = [e.data for e in client.events() if isinstance(e, TextMessage)]
    assert received == messages


def test_a_socket_resumes_5000_changes_back_with_no_gap_and_no_duplicate(module_stack, app, org, customer_id):
    """A socket that authenticates with a cursor 5,000+ changes back is sent every
    change after it from the store, then live ones, while ingest goes on: exactly
    the sequence /api/changes lists, each change once, in position order."""
    start = changes.cursor(org["organizationId"], 0)
    for _ in range(50):
        assert post_batch(module_stack.url, org["ingestKey"],
                          [interaction(customer_id) for _ in range(100)]).status_code == 200
    stop = threading.Event()

    def keep_ingesting():
        session = requests.Session()
        while not stop.is_set():
            post_interaction(module_stack.url, org["ingestKey"], customer_id, session)
    sender = threading.Thread(target=keep_ingesting)
    sender.start()
    client = FeedClient(module_stack.url)
    try:
        client.send({"type": "auth", "token": org["readKey"], "after": start})
        assert client.next()["type"] == "ready"
        received = []
        while len(received) < 5200:
            message = client.next(timeout=20)
            assert message is not None, "%d changes received" % len(received)
            assert message["type"] != "dropped" or received, message
            if "cursor" in message:
                received.append(message)
    finally:
        stop.set()
        sender.join()
        client.close()
    positions = [changes.position_of(org["organizationId"], m["cursor"]) for m in received]
    assert positions == sorted(set(positions))  # in order, none twice
    listed, after = [], start
    while len(listed) < len(received):
        page = requests.get(module_stack.url + "/api/changes", params={"after": after, "limit": 1000},
                            headers=bearer(org["readKey"])).json()
        listed += page["items"]
        after = page["nextCursor"]
    assert [m["cursor"] for m in received] == [m["cursor"] for m in listed[:len(received)]]  # no gap
    assert [m["data"] for m in received if m["type"] == "interaction.created"] == \
        [m["data"] for m in listed[:len(received)] if m["type"] == "interaction.created"]
