"""Many feed sockets at once, as browsers open them after a deploy (tests/crowd.py),
driven from synchronous tests. Each socket authenticates, records what it receives and, like
the page, reconnects at once when the server closes it with 1001 (going away)."""
import asyncio
import json
from collections import Counter

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
        async for message in self.messages(ws):
            if message["type"] == "ready":
                member.readies += 1
            elif message["type"] == "interaction.created":
                member.created.add(message["data"]["id"])
            elif message["type"] == "dropped":
                member.notices.append(message)

    # Synchronous views for the tests ------------------------------------------

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


class Follower:
    def __init__(self, index, key, after):
        self.index, self.key = index, key
        self.cursor = after  # of the last change received, or where to start
        self.changes = []  # (cursor, type, data id), in the order received
        self.readies = 0
        self.lost = 0  # connections lost or refused
        self.notices = []
        self.state = "connecting"  # then "authenticating" (awaiting "ready"), then "following"


class Followers(Crowd):
    """Sockets that follow the change feed as a careful client does (DESIGN §8, §16):
    each keeps the cursor of the last change it received and, whenever its
    connection is lost or refused (or it is told that it was dropped or missed
    changes), connects again and authenticates with ``"after"``: that cursor.
    Its own pings find a path that went dead without a word (a cut link).

    ``subscriptions``: one (key, cursor to start after) per socket."""

    def __init__(self, base_url, subscriptions, ping_seconds=5.0):
        self.url = base_url.replace("http", "ws", 1) + "/api/feed/ws"
        self.ping_seconds = ping_seconds
        self.members = [Follower(i, key, after) for i, (key, after) in enumerate(subscriptions)]
        super().__init__(len(self.members))

    async def member(self, index):
        follower = self.members[index]
        while not self.stopping():
            follower.state = "connecting"
            try:
                async with connect(self.url, open_timeout=30, ping_interval=self.ping_seconds,
                                   ping_timeout=2 * self.ping_seconds, max_size=None, compression=None,
                                   proxy=None) as ws:
                    follower.state = "authenticating"
                    await ws.send(json.dumps({"type": "auth", "token": follower.key, "after": follower.cursor}))
                    await self._read(follower, ws)
            except (websockets.ConnectionClosed, websockets.InvalidHandshake, OSError, asyncio.TimeoutError):
                pass
            if not self.stopping():
                follower.lost += 1
                await asyncio.sleep(0.1 + 0.4 * (index % 10) / 10)  # spread the reconnections

    async def _read(self, follower, ws):
        async for message in self.messages(ws):
            if message["type"] == "ready":
                follower.readies += 1
                follower.state = "following"
            elif message["type"] == "dropped":
                follower.notices.append(message["type"])
                return  # resume from the last cursor
            elif "cursor" in message:
                follower.cursor = message["cursor"]
                follower.changes.append((message["cursor"], message["type"], message["data"]["id"]))

    def summary(self):
        lost = sum(1 for m in self.members if m.lost)
        received = sorted(len(m.changes) for m in self.members)
        notices = Counter(notice for m in self.members for notice in m.notices)
        states = Counter(m.state for m in self.members)
        return "%d of %d sockets lost a connection (%d losses in all); now %s; notices %s; changes received: " \
            "fewest %d, median %d, most %d" % (lost, len(self.members), sum(m.lost for m in self.members),
                                              dict(states), dict(notices), received[0],
                                              received[len(received) // 2], received[-1])
