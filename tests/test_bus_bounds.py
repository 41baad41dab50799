"""The Redis event bus holds a bounded number of bytes (hardening round 3, issue 21
#6): per organization and in total, whatever the size of the events and the number
of organizations; what is trimmed before a listener read it reaches its sockets
all the same, read from the store (DESIGN §16), never as a silent hole. Each test
has a redis-server of its own."""
import json
import os
import signal
import uuid

import pytest
import redis

from ingest import events
from ingest.service import IngestService
from tests.feed_client import FeedClient
from tests.helpers import interaction
from tests.servers import Gunicorn, RedisServer, free_port

MIB = 1024 * 1024


@pytest.fixture
def private_redis():
    server = RedisServer(free_port()).start()
    yield server
    server.stop()


def big_events(count, size):
    return [(n, {"type": "interaction.created", "data": {"id": str(uuid.uuid4()), "content": "x" * size}})
            for n in range(count)]


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
def test_a_listener_that_lagged_past_the_bound_still_delivers_everything(running, app, org, customer_id,
                                                                        private_redis, tmp_path):
    """A web worker frozen (SIGSTOP) while its organization's stream is trimmed past
    where its listener had read: once it runs again, its socket gets every
    interaction stored meanwhile, in order, once each: what the bus lost is read
    from the store (it used to be a gap notice)."""
    web = Gunicorn(tmp_path / "web.log", workers=1, env={"EVENTS_URL": private_redis.url})
    # Stores in this process and publishes as a web worker of that Redis would, with a small bound.
    bus = events.RedisBus(private_redis.url, stream_bytes=64 * 1024)
    service = running(IngestService(lambda ids_by_organization, high_priority: None, bus.publish))
    watcher = FeedClient(web.url, org["readKey"])
    try:
        assert watcher.next()["type"] == "ready"
        first, _ = service.ingest_one(org["organizationId"], interaction(customer_id))
        watcher.until(lambda m: m["type"] == "interaction.created" and m["data"]["id"] == str(first))
        [worker] = web.worker_pids()
        os.kill(worker, signal.SIGSTOP)
        try:
            later = [str(service.ingest_one(org["organizationId"], interaction(customer_id, content="x" * 9000))[0])
                     for _ in range(40)]
            kept = len(redis.Redis.from_url(private_redis.url).xrange(events.STREAM_PREFIX + org["organizationId"]))
        finally:
            os.kill(worker, signal.SIGCONT)
        seen = watcher.until(lambda m: m["type"] == "interaction.created" and m["data"]["id"] == later[-1])
        received = [m["data"]["id"] for m in seen if m["type"] == "interaction.created"]
        assert received == later
        assert kept < len(later)  # the bus had lost most of them
        print(json.dumps({"stored": len(later), "kept by the bus": kept, "received": len(received)}))
    finally:
        watcher.close()
        web.stop()
