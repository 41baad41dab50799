"""Feed sockets that upgrade and then say nothing, as an attacker without a key
opens them: each is re-opened as soon as the server closes it, until stopped.
One loop (tests/crowd.py) holds thousands of them."""
import asyncio
import time

from tests.crowd import Crowd


class IdleSockets(Crowd):
    def __init__(self, base_url, count, refused_pause=0.5):
        """``refused_pause``: how long a socket waits before trying again after the
        server (or a proxy) refused its upgrade, so that refusals are not a busy loop."""
        self.host, port = base_url.split("//")[1].split(":")
        self.port = int(port)
        self.refused_pause = refused_pause
        self.since = {}  # index -> when its socket, upgraded and not yet closed, was upgraded
        self.upgrades = 0
        self.refusals = 0
        super().__init__(count)

    @property
    def open(self):
        """Sockets upgraded and not yet closed by the server."""
        return len(self.since)

    def oldest(self):
        """When the open socket held longest was upgraded (time.monotonic()), or None."""
        return min(list(self.since.values()), default=None)  # (a copy: the loop's thread changes it)

    async def member(self, index):
        request = ("GET /api/feed/ws HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   "Sec-WebSocket-Version: 13\r\n\r\n" % (self.host, self.port)).encode()
        while not self.stopping():
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port)
            except OSError:
                await self.pause(self.refused_pause)
                continue
            try:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 101"):
                    self.refusals += 1
                    await self.pause(self.refused_pause)
                    continue
                self.upgrades += 1
                self.since[index] = time.monotonic()
                try:
                    await self._until_closed(reader)
                finally:
                    del self.since[index]
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                await self.pause(self.refused_pause)
            finally:
                writer.close()

    async def _until_closed(self, reader):
        while True:
            read, data = await self.unless_stopped(reader.read(4096))
            if not (read and data):
                return
