"""Live events: the bus that carries them between processes (DESIGN §8).

``publish(organization_id, event)`` is all the workflow and the tasks know.
``memory://`` delivers within this process only.
"""
import functools
import logging
import threading

log = logging.getLogger(__name__)


class MemoryBus:
    """Delivers each event to this process's subscribers, synchronously."""

    def __init__(self):
        self._subscribers = []
        self._lock = threading.Lock()

    def subscribe(self, callback):
        """``callback(organization_id, event)`` for every event published here."""
        with self._lock:
            self._subscribers.append(callback)

    def publish(self, organization_id, event):
        for callback in list(self._subscribers):
            callback(str(organization_id), event)


@functools.lru_cache(maxsize=None)
def bus_for(url):
    """This process's bus for EVENTS_URL: the web app and the tasks share it."""
    if url.startswith("memory://"):
        return MemoryBus()
    raise ValueError("EVENTS_URL must be memory:// (got %r)" % url)
