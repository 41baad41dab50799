"""Live events (DESIGN §8): a per-process hub of subscriptions, and the bus
that joins the processes.

``bus.publish(organization_id, events)`` is all the workflow and the tasks
know. ``memory://`` hands events to this process's hub; ``redis://`` publishes
them on a Redis channel that a listener thread in every web process relays to
its own hub, so an event from any worker or consumer reaches every socket.

Publishing never blocks on a subscriber: each subscription has a bounded
queue drained by its own socket handler; when it is full, events are dropped
for that subscription only and counted, and the socket is told.
"""
import functools
import json
import logging
import os
import queue
import threading
import time
import weakref

import redis

log = logging.getLogger(__name__)

_hubs = weakref.WeakSet()

CHANNEL = "ingest:events"
QUEUE_SIZE = 1000  # events waiting for one socket; beyond it they are dropped


class Subscription:
    """One socket's bounded outbox of serialised events."""

    def __init__(self, organization_id, size=QUEUE_SIZE):
        self.organization_id = organization_id
        self.closed = False
        self._queue = queue.Queue(size)
        self._dropped = 0
        self._lock = threading.Lock()

    def close(self):
        """End the subscription: its socket handler wakes up and closes the socket."""
        self.closed = True
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass  # the handler is busy sending; it sees ``closed`` after this batch

    def offer(self, message):
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            with self._lock:
                self._dropped += 1

    def take(self, timeout):
        """Messages ready to send (waiting up to ``timeout`` for the first), with a
        ``dropped`` notice first if events were dropped since the last call."""
        try:
            messages = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            messages = []
        while len(messages) < 100:
            try:
                messages.append(self._queue.get_nowait())
            except queue.Empty:
                break
        messages = [message for message in messages if message is not None]
        with self._lock:
            dropped, self._dropped = self._dropped, 0
        if dropped:
            messages.insert(0, json.dumps({"type": "dropped", "count": dropped}))
        return messages


class Hub:
    """This process's subscriptions, by organization."""

    def __init__(self):
        self._by_org = {}
        self._lock = threading.Lock()
        _hubs.add(self)

    def close_all(self):
        with self._lock:
            subscriptions = [s for subscribers in self._by_org.values() for s in subscribers]
        for subscription in subscriptions:
            subscription.close()

    def subscribe(self, organization_id):
        subscription = Subscription(str(organization_id))
        with self._lock:
            self._by_org.setdefault(subscription.organization_id, set()).add(subscription)
        return subscription

    def unsubscribe(self, subscription):
        with self._lock:
            subscribers = self._by_org.get(subscription.organization_id, set())
            subscribers.discard(subscription)
            if not subscribers:
                self._by_org.pop(subscription.organization_id, None)

    def dispatch(self, organization_id, events):
        with self._lock:
            subscribers = list(self._by_org.get(str(organization_id), ()))
        if not subscribers:
            return
        messages = [json.dumps(event, default=str) for event in events]
        for subscriber in subscribers:
            for message in messages:
                subscriber.offer(message)


class MemoryBus:
    """One process: publishing is dispatching to the local hub."""

    def __init__(self):
        self.hub = Hub()

    def publish(self, organization_id, events):
        self.hub.dispatch(organization_id, events)

    def subscribe(self, organization_id):
        return self.hub.subscribe(organization_id)

    def unsubscribe(self, subscription):
        self.hub.unsubscribe(subscription)


class RedisBus(MemoryBus):
    """Redis pub/sub between processes. The listener thread starts with the first
    subscriber of a process (consumers, which only publish, never start it) and
    reconnects by itself after Redis comes back."""

    def __init__(self, url):
        super().__init__()
        self._url = url
        self._redis = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._listener_pid = None
        self._lock = threading.Lock()

    def publish(self, organization_id, events):
        self._redis.publish(CHANNEL, json.dumps(
            {"organizationId": str(organization_id), "events": events}, default=str))

    def subscribe(self, organization_id):
        self._ensure_listener()
        return super().subscribe(organization_id)

    def _ensure_listener(self):
        with self._lock:
            if self._listener_pid != os.getpid():
                threading.Thread(target=self._listen, name="events-listener", daemon=True).start()
                self._listener_pid = os.getpid()

    def _listen(self):
        delay = 0.1
        while True:
            try:
                pubsub = redis.Redis.from_url(self._url, socket_connect_timeout=2).pubsub(
                    ignore_subscribe_messages=True)
                pubsub.subscribe(CHANNEL)
                delay = 0.1
                for message in pubsub.listen():
                    payload = json.loads(message["data"])
                    self.hub.dispatch(payload["organizationId"], payload["events"])
            except Exception:
                log.warning("event listener lost Redis; reconnecting", exc_info=True)
                time.sleep(delay)
                delay = min(delay * 2, 5)


def close_subscriptions():
    """Close every socket subscription of this process (a worker shutting down),
    so each socket is closed at once and its browser reconnects elsewhere."""
    for hub in list(_hubs):
        hub.close_all()


@functools.lru_cache(maxsize=None)
def bus_for(url):
    """This process's bus for EVENTS_URL: the web app and the tasks share it."""
    if url.startswith("memory://"):
        return MemoryBus()
    if url.startswith(("redis://", "rediss://")):
        return RedisBus(url)
    raise ValueError("EVENTS_URL must be memory:// or redis://, not %r" % url)
