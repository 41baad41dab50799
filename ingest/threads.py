"""The background threads of one part of the runtime (ingest/runtime.py), started
and stopped together.

Each target is a loop that runs until the part's ``stopping`` event is set: it
either waits on that event (``stopping.wait(seconds)``) or is woken by the part's
``wake`` callable (a sentinel in its queue, a byte on its socket) and then
checks it.
"""
import threading

JOIN_SECONDS = 5


class Threads:
    """Named daemon threads running ``target()`` for each ``(name, target)``."""

    def __init__(self, *targets, wake=None):
        self._targets = targets
        self._wake = wake
        self._threads = []
        self.stopping = threading.Event()

    @property
    def running(self):
        return bool(self._threads) and not self.stopping.is_set()

    def start(self):
        if self._threads:
            raise RuntimeError("already started")
        self._threads = [threading.Thread(target=target, name=name, daemon=True)
                         for name, target in self._targets]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout=JOIN_SECONDS):
        """Tell the loops to end, wake them, and wait for each (up to ``timeout``)."""
        self.stopping.set()
        if self._wake is not None:
            self._wake()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)
