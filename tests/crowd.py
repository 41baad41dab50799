"""Thousands of client sockets at once, driven from synchronous tests: one asyncio
loop on a background thread runs a coroutine per socket (no thread each) until
``close()``."""
import asyncio
import json
import threading

from tests.servers import wait_until


class Crowd:
    """Runs ``self.member(index)`` for each of ``count`` indexes on the loop. A
    subclass sets what its members share before calling ``super().__init__``."""

    def __init__(self, count):
        self._loop = asyncio.new_event_loop()
        self._stopping = None
        self._thread = threading.Thread(target=self._run, args=(count,), daemon=True)
        self._thread.start()

    def _run(self, count):
        asyncio.set_event_loop(self._loop)
        self._stopping = asyncio.Event()
        self._loop.run_until_complete(asyncio.gather(*(self.member(index) for index in range(count))))

    async def member(self, index):
        raise NotImplementedError

    def stopping(self):
        return self._stopping.is_set()

    async def unless_stopped(self, awaitable):
        """``(True, its result)``, or ``(False, None)`` once ``close()`` was called
        (``awaitable`` is then cancelled)."""
        task = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            done, _ = await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if task not in done:
            task.cancel()
            return False, None
        return True, task.result()

    async def messages(self, ws):
        """The JSON messages socket ``ws`` receives, until ``close()`` is called."""
        while True:
            received, text = await self.unless_stopped(ws.recv())
            if not received:
                return
            yield json.loads(text)

    async def pause(self, seconds):
        """Sleep ``seconds``, or less if ``close()`` is called meanwhile."""
        await self.unless_stopped(asyncio.sleep(seconds))

    def close(self):
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=30)

    def wait(self, condition, timeout, message):
        """Wait for ``condition``; fail after ``timeout`` with ``message`` (or what it
        returns, if it is a function) and the subclass's ``summary()`` of its members."""
        try:
            wait_until(condition, timeout)
        except AssertionError:
            raise AssertionError("%s; %s" % (message() if callable(message) else message, self.summary())) from None
