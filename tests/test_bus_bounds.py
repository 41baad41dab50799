"""The Redis event bus holds a bounded number of bytes (hardening round 3, issue 21
#6): per organization and in total, whatever the size of the events and the number
of organizations; what is trimmed before a listener read it reaches its sockets as
a gap notice, never as a silent hole. Each test has a redis-server of its own."""
import json
import os
import signal
import uuid

import pytest
import redis

from ingest import events
from tests.feed_client import FeedClient
from tests.helpers import make_organization
from tests.servers import Gunicorn, RedisServer, free_port

MIB = 1024 * 1024


@pytest.fixture
def private_redis():
    server = RedisServer(free_port()).start()
    yield server
    server.stop()


def big_events(count, size):
    return [{"type": "interaction.created", "data": {"id": str(uuid.uuid4()), "content": "x" * size}}
            for _ in range(count)]


def stream_bytes(client, organization_id):
    """Bytes of event text the organization's stream holds."""
    return sum(len(fields.get(events.EVENTS_FIELD, b""))
               for _, fields in client.xrange(events.STREAM_PREFIX + organization_id))


@pytest.mark.redis
@pytest.mark.processes
def test_streams_are_bounded_in_bytes_per_organization_and_in_total(private_redis):
    """200 publishes of ~1 MiB for each of two organizations (the probe grew their
    streams to 211 and 369 MB), then 40 more organizations: each stream stays within
    its bound (plus its newest entry), all of them within the total, and the
    accounts the bound works from match what Redis holds."""
    bus = events.RedisBus(private_redis.url, stream_bytes=4 * MIB, total_bytes=16 * MIB)
    client = redis.Redis.from_url(private_redis.url)
    heavy = [str(uuid.uuid4()) for _ in range(2)]
    for _ in range(200):
        for organization_id in heavy:
            bus.publish({organization_id: big_events(1, MIB)})
    for organization_id in heavy:
        assert stream_bytes(client, organization_id) <= 5 * MIB
    many = [str(uuid.uuid4()) for _ in range(40)]
    for organization_id in many:
        bus.publish({organization_id: big_events(1, MIB)})
    held = {org: stream_bytes(client, org) for org in heavy + many}
    assert sum(held.values()) <= 17 * MIB, held
    assert bus.held_bytes() == sum(held.values())
    assert held[many[-1]] > 0 and all(held[org] == 0 for org in heavy)  # least recent go first
    memory = client.info("memory")["used_memory"]
    print("Redis holds %.1f MiB of events in %.1f MiB" % (sum(held.values()) / MIB, memory / MIB))
    assert memory <= 40 * MIB


@pytest.mark.redis
@pytest.mark.processes
def test_a_listener_that_lagged_past_the_bound_tells_its_sockets(app, private_redis, tmp_path):
    """A web worker frozen (SIGSTOP) while its organization's stream is trimmed past
    where its listener had read: once it runs again, its socket gets a gap notice
    before the events that follow the hole, and then every event that was kept."""
    org = make_organization(app, "Lagging")
    web = Gunicorn(tmp_path / "web.log", workers=1, env={"EVENTS_URL": private_redis.url})
    publisher = events.RedisBus(private_redis.url, stream_bytes=64 * 1024)
    watcher = FeedClient(web.url, org["readKey"])
    try:
        assert watcher.next()["type"] == "ready"
        first = big_events(1, 100)
        publisher.publish({org["organizationId"]: first})
        watcher.until(lambda m: m["type"] == "interaction.created")
        [worker] = web.worker_pids()
        os.kill(worker, signal.SIGSTOP)
        try:
            later = big_events(40, 16 * 1024)
            for event in later:
                publisher.publish({org["organizationId"]: [event]})
        finally:
            os.kill(worker, signal.SIGCONT)
        last = later[-1]["data"]["id"]
        seen = watcher.until(lambda m: m["type"] == "interaction.created" and m["data"]["id"] == last)
        kinds = [m["type"] for m in seen]
        assert "gap" in kinds, kinds
        received = [m["data"]["id"] for m in seen[kinds.index("gap"):] if m["type"] == "interaction.created"]
        ids = [event["data"]["id"] for event in later]
        assert received == ids[len(ids) - len(received):]  # the newest, in order, once each
        assert len(received) < len(ids)
        print(json.dumps({"published": len(ids), "kept and received": len(received)}))
    finally:
        watcher.close()
        web.stop()
