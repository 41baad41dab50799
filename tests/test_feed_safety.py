"""The live feed under the conditions that broke it (DESIGN §8): reconnect storms on
PostgreSQL's default 100 connections, failures inside the handler, a client that
pings while reading slowly, inbound floods, revoked keys, big events, a bus that
drops its connection. Production shape: gunicorn with 2 workers, a huey_consumer,
Redis as the bus, the database of the run (SQLite or PostgreSQL)."""
import json
import os
import signal
import threading
import time
import uuid

import pytest
import redis
import requests
from wsproto.events import CloseConnection, Pong, TextMessage

from ingest import accounts, events
from tests.conftest import require_redis
from tests.dbs import is_postgres_url
from tests.feed_client import FeedClient, RawSocket
from tests.helpers import bearer, interaction, post_batch, stored_over_http
from tests.servers import Gunicorn, rss_kb
from tests.swarm import Swarm


def ingest_many(url, org, customer_id, count, **fields):
    """``count`` single ingests (over one connection); their ids."""
    session = requests.Session()
    return [stored_over_http(url, org["ingestKey"], customer_id, session, **fields) for _ in range(count)]


def test_a_reconnect_storm_is_served_whole_and_again_after_sigterm(module_stack, org, customer_id):
    """1,000 sockets at once (half offering permessage-deflate) all get ready and every
    event; SIGTERM to both workers closes them with 1001, and the storm of their
    reconnections is served whole too."""
    swarm = Swarm(module_stack.url, org["readKey"], 1000)
    try:
        swarm.wait_ready(timeout=90)
        swarm.wait_received(ingest_many(module_stack.url, org, customer_id, 3))
        for pid in module_stack.worker_pids():
            os.kill(pid, signal.SIGTERM)
        swarm.wait_ready(at_least=2, timeout=90)
        assert all(m.close_codes and set(m.close_codes) == {1001} for m in swarm.members), \
            swarm.summary()
        swarm.wait_received(ingest_many(module_stack.url, org, customer_id, 3))
    finally:
        swarm.close()


def test_two_thousand_sockets_are_held_and_served(module_stack, org, customer_id):
    swarm = Swarm(module_stack.url, org["readKey"], 2000, deflate=False)
    try:
        swarm.wait_ready(timeout=120)
        swarm.wait_received(ingest_many(module_stack.url, org, customer_id, 2))
    finally:
        swarm.close()


def test_a_failing_first_message_is_answered_in_websocket_frames_only(module_stack):
    """A first message nested deeper than the JSON parser goes used to make Flask write
    an HTTP 500 onto the upgraded socket; it is a bad auth message like any other."""
    raw = RawSocket(module_stack.url)
    raw.send_text('{"type": "auth", "token": ' + "[" * 1_500 + "]" * 1_500 + "}")
    assert raw.close_code() == 4401


@pytest.mark.processes
def test_database_down_during_auth_closes_with_1013(app, tmp_path):
    """No database at all: the socket is closed with 1013 (try again later), in
    WebSocket frames; nothing else is written on it."""
    unreachable = ("postgresql://postgres@127.0.0.1:1/none" if is_postgres_url(os.environ["DATABASE_URL"])
                   else "sqlite:////nonexistent-dir/ingest.db")
    web = Gunicorn(tmp_path / "web.log", workers=1, env={"DATABASE_URL": unreachable})
    try:
        raw = RawSocket(web.url)
        raw.send_text(json.dumps({"type": "auth", "token": "ik_" + "x" * 43}))
        assert raw.close_code() == 1013
        assert requests.get(web.url + "/readyz").status_code == 503
    finally:
        web.stop()


def test_pings_while_reading_slowly_never_corrupt_a_frame(module_stack, org, customer_id):
    """One thread writes each socket, pongs included: a client that pings while it
    reads slowly gets whole frames, and a pong for every ping."""
    raw = RawSocket(module_stack.url, org["readKey"], rcvbuf=4096)
    content = "é" * 5000  # 10 KB of UTF-8 per event
    sender = threading.Thread(target=ingest_many,
                              args=(module_stack.url, org, customer_id, 60), kwargs={"content": content})
    sender.start()
    pings, pongs, texts = 0, 0, 0
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and (sender.is_alive() or texts < 60):
        raw.ping(b"p%d" % pings)
        pings += 1
        for event in raw.read_events(size=2048, timeout=2):
            assert not isinstance(event, CloseConnection), event
            if isinstance(event, Pong):
                assert event.payload == b"p%d" % pongs
                pongs += 1
            elif isinstance(event, TextMessage):
                assert event.message_finished or len(event.data) < 20_000
                if event.message_finished:
                    texts += 1
        time.sleep(0.005)
    sender.join()
    while pongs < pings:  # the last pongs, behind the last events
        events = raw.read_events(timeout=5)
        assert events, "%d pings, %d pongs" % (pings, pongs)
        for event in events:
            if isinstance(event, Pong):
                assert event.payload == b"p%d" % pongs
                pongs += 1
    assert texts >= 60


def worker_rss(stack):
    return {pid: rss_kb(pid) for pid in stack.worker_pids()}


def test_an_inbound_flood_is_bounded_and_closed(module_stack, org):
    """Nothing is expected from a client after auth: a flood of messages (compressed
    ones, when the client offers permessage-deflate) neither grows the worker's
    memory nor keeps the socket open."""
    before = worker_rss(module_stack)
    raw = RawSocket(module_stack.url, org["readKey"], deflate=True)
    assert not raw.deflate_accepted  # refused: nothing to inflate
    payload = "0" * 60_000
    raw.sock.settimeout(10)
    started = time.monotonic()
    try:
        while time.monotonic() - started < 5:
            raw.send_text(payload)
    except OSError:
        pass  # closed by the server, as it should be
    growth = max(rss_kb(pid) - kb for pid, kb in before.items())
    code = raw.close_code()
    print("\ninbound flood of 60 KB messages: closed %d, worker RSS growth %d KiB" % (code, growth))
    assert growth < 50_000, "a worker grew by %d KiB" % growth
    assert code in (1008, 1009)


def test_big_events_leave_no_frame_memory_behind(module_stack, org, customer_id):
    """Events are framed once for all the sockets of an organization and freed once
    sent: round after round of ~30 KB events through an open socket, the workers'
    memory stays where the first rounds left it (a frame cache used to keep the
    last 4,096 per worker)."""
    watcher = FeedClient(module_stack.url, org["readKey"])
    assert watcher.next()["type"] == "ready"

    def big_round(tag):
        items = [interaction(customer_id, content="%s-%d " % (tag, n) + "y" * 9_980,
                             metadata={"blob": "z" * 16_000}) for n in range(25)]
        for _ in range(40):  # 25 a batch keeps each body under MAX_CONTENT_LENGTH
            response = post_batch(module_stack.url, org["ingestKey"], items)
            assert response.json()["successful"] == 25
        accounted = 0  # events received, or dropped for this slow reader and said so
        while accounted < 1000:
            message = watcher.next(timeout=20)
            assert message is not None, "only %d of 1000 events accounted for" % accounted
            if message["type"] in ("interaction.created", "dropped"):
                accounted += message.get("count", 1)

    for tag in ("warm-up", "warm-up-2"):  # request threads, their connections and caches
        big_round(tag)
    before = worker_rss(module_stack)
    for tag in ("third", "fourth"):
        big_round(tag)
    watcher.close()
    growth = max(rss_kb(pid) - kb for pid, kb in before.items())
    print("\n2,000 more ~26 KB events through a socket: worker RSS growth %d KiB" % growth)
    # The frame cache (4,096 frames) made the worker that serves the socket keep
    # these 2,000 too: ~52 MB. Allocator arenas warming up on more of its 256
    # threads were seen to add up to 27 MB without any cache, hence the margin.
    assert growth < 40_000, "a worker grew by %d KiB over 2,000 more events" % growth


def test_a_revoked_key_closes_its_open_sockets_with_4401(module_stack, app, org):
    watcher = FeedClient(module_stack.url, org["readKey"])
    assert watcher.next()["type"] == "ready"
    with app.app_context():
        assert accounts.revoke_key(org["readKey"]) == 1
    started = time.monotonic()
    assert watcher.close_code(timeout=60)[0] == 4401
    print("\nrevoked key's socket closed after %.1f s" % (time.monotonic() - started))


@pytest.mark.redis
def test_a_publish_whose_connection_redis_closed_is_sent_again(monkeypatch):
    """redis-py retries a command, not taking a pooled connection that Redis closed
    meanwhile; such a publish is sent once more, not reported as a gap."""
    bus = events.RedisBus(require_redis())
    sent, append = [], bus._append

    def closed_once(entries):  # the fault: the connection taken from the pool was closed
        sent.append(entries)
        if len(sent) == 1:
            raise redis.ConnectionError("Connection closed by server.")
        append(entries)

    monkeypatch.setattr(bus, "_append", closed_once)
    organization_id = str(uuid.uuid4())
    event = {"type": "interaction.created", "data": {"id": "i-1"}}
    bus.publish({organization_id: [(1, event)]})
    stream = redis.Redis.from_url(require_redis()).xrange(events.STREAM_PREFIX + organization_id)
    text = json.dumps(event, separators=(",", ":")).encode()
    assert [fields[events.EVENTS_FIELD] for _, fields in stream] == [text]
    assert len(sent) == 2


def test_a_dropped_bus_connection_loses_no_event(module_stack, org, customer_id):
    """Killing every connection to the bus (as Redis does to a client over its
    output-buffer limit) loses nothing: listeners resume where they were."""
    watcher = FeedClient(module_stack.url, org["readKey"])
    assert watcher.next()["type"] == "ready"
    bus = redis.Redis.from_url(require_redis())
    ours, db = bus.client_id(), str(bus.connection_pool.connection_kwargs["db"])
    ids = []
    for _ in range(5):
        for client in bus.client_list():
            if client["db"] == db and int(client["id"]) != ours:
                bus.client_kill_filter(_id=client["id"])
        ids += ingest_many(module_stack.url, org, customer_id, 3)
    seen = set()
    try:
        watcher.until(lambda m: m["type"] == "interaction.created"
                      and (seen.add(m["data"]["id"]) or seen >= set(ids)), timeout=20)
    except AssertionError:
        warnings = [line for line in module_stack.log_lines() if line.get("level") != "info"]
        raise AssertionError("%d of %d events arrived; the server said: %s" % (
            len(seen & set(ids)), len(ids), warnings[-3:])) from None
    watcher.close()


def test_every_response_carries_the_security_headers(client, org):
    for response in (client.get("/healthz"), client.get("/feed"), client.get("/api/openapi.json"),
                     client.get("/api/customers/x", headers=bearer(org["readKey"])),
                     client.post("/api/data/ingest", data="x", headers=bearer(org["ingestKey"]))):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
