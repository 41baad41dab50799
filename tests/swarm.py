"""Many feed sockets at once, as browsers open them after a deploy (tests/crowd.py),
driven from synchronous tests. Each socket authenticates, records what it receives and, like
the page, reconnects at once when the server closes it with 1001 (going away)."""
import asyncio
import json
import time

import websockets
from websockets.asyncio.client import connect

from tests.crowd import Crowd


class Member:
    def __init__(self, index):
        self.index = index
        self.readies = 0
        self.created = set()
        self.notices = []
        self.close_codes = []
        self.error = None


class Swarm(Crowd):
    def __init__(self, base_url, key, count, deflate=None):
        """``deflate``: offer permessage-deflate on every socket (True), none (False),
        or every other one (None)."""
        self.url = base_url.replace("http", "ws", 1) + "/api/feed/ws"
        self.key = key
        self.members = [Member(i) for i in range(count)]
        self._deflate = deflate
        super().__init__(count)

    def _offers_deflate(self, member):
        return member.index % 2 == 0 if self._deflate is None else self._deflate

    async def member(self, index):
        member = self.members[index]
        while not self.stopping():
            try:
                async with connect(self.url, open_timeout=60, ping_interval=None, max_size=None,
                                   compression="deflate" if self._offers_deflate(member) else None,
                                   proxy=None) as ws:
                    await ws.send(json.dumps({"type": "auth", "token": self.key}))
                    await self._read(member, ws)
            except websockets.ConnectionClosed as closed:
                member.close_codes.append(closed.rcvd.code if closed.rcvd else None)
                if not (closed.rcvd and closed.rcvd.code == 1001):
                    return
            except (OSError, asyncio.TimeoutError, websockets.InvalidHandshake) as error:
                member.error = repr(error)
                return

    async def _read(self, member, ws):
        while True:
            received, text = await self.unless_stopped(ws.recv())
            if not received:
                return
            message = json.loads(text)
            if message["type"] == "ready":
                member.readies += 1
            elif message["type"] == "interaction.created":
                member.created.add(message["data"]["id"])
            elif message["type"] in ("dropped", "gap"):
                member.notices.append(message)

    # Synchronous views for the tests ------------------------------------------

    def wait(self, condition, timeout, message):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.05)
        raise AssertionError("%s; %s" % (message, self.summary()))

    def ready_count(self, at_least=1):
        return sum(1 for m in self.members if m.readies >= at_least)

    def wait_ready(self, at_least=1, timeout=60):
        self.wait(lambda: self.ready_count(at_least) == len(self.members), timeout,
                  "not every socket got ready")

    def wait_received(self, ids, timeout=30):
        ids = set(ids)
        self.wait(lambda: all(ids <= m.created for m in self.members), timeout,
                  "not every socket received every event")

    def summary(self):
        errors = [m.error for m in self.members if m.error][:3]
        codes = {}
        for m in self.members:
            for code in m.close_codes:
                codes[code] = codes.get(code, 0) + 1
        return "ready %d/%d, close codes %s, errors %s" % (
            self.ready_count(), len(self.members), codes, errors)

