"""Background threads, started once per process.

A forked process (a gunicorn worker) inherits no thread, so each of ours is
started lazily, on first use in a process, and again in a child after a fork.
"""
import os
import threading


class PerProcess:
    """``start(*args)`` starts a daemon thread running ``target(*args)`` for each
    ``(name, target)`` the first time it is called in a process, after ``setup()``
    if given; later calls cost one comparison."""

    def __init__(self, *threads, setup=None):
        self._threads = threads
        self._setup = setup
        self._pid = None
        self._lock = threading.Lock()

    def start(self, *args):
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            if self._setup is not None:
                self._setup()
            for name, target in self._threads:
                threading.Thread(target=target, args=args, name=name, daemon=True).start()
            self._pid = os.getpid()

    @property
    def running(self):
        """Whether they were started in this process."""
        return self._pid == os.getpid()
