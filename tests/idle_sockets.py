"""Feed sockets that upgrade and then say nothing, as an attacker without a key
opens them: each is re-opened as soon as the server closes it, until stopped.
One asyncio loop on a background thread holds thousands of them."""
import asyncio
import threading


class IdleSockets:
    def __init__(self, base_url, count, refused_pause=0.5):
        """``refused_pause``: how long a socket waits before trying again after the
        server (or a proxy) refused its upgrade, so that refusals are not a busy loop."""
        self.host, port = base_url.split("//")[1].split(":")
        self.port = int(port)
        self.count = count
        self.refused_pause = refused_pause
        self.open = 0  # upgraded and not yet closed by the server
        self.upgrades = 0
        self.refusals = 0
        self._loop = asyncio.new_event_loop()
        self._stopping = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        asyncio.set_event_loop(self._loop)
        self._stopping = asyncio.Event()
        tasks = [self._loop.create_task(self._hold()) for _ in range(self.count)]
        self._loop.run_until_complete(asyncio.gather(*tasks))

    async def _hold(self):
        request = ("GET /api/feed/ws HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   "Sec-WebSocket-Version: 13\r\n\r\n" % (self.host, self.port)).encode()
        while not self._stopping.is_set():
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port)
            except OSError:
                await self._pause()
                continue
            try:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 101"):
                    self.refusals += 1
                    await self._pause()
                    continue
                self.upgrades += 1
                self.open += 1
                try:
                    await self._until_closed(reader)
                finally:
                    self.open -= 1
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                await self._pause()
            finally:
                writer.close()

    async def _until_closed(self, reader):
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            while True:
                read = asyncio.ensure_future(reader.read(4096))
                done, _ = await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
                if read not in done:
                    read.cancel()
                    return
                if not read.result():
                    return
        finally:
            stop.cancel()

    async def _pause(self):
        try:
            await asyncio.wait_for(self._stopping.wait(), self.refused_pause)
        except asyncio.TimeoutError:
            pass

    def close(self):
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=30)
