"""One organization's live changes as a process delivers them (DESIGN §8, §16): in
position order, each once, whatever order the bus brings them in.

Changes of an organization commit in position order (ingest/changes.py), but
their publishes race: a worker's publish can reach the bus after a later one
of another worker, and a publish can be lost (Redis away, a stream trimmed).
So a change that arrives ahead of its predecessor is held; once the hole is
older than HOLE_SECONDS the fan-out reads the missing positions from the store,
where every position below one already committed is visible. A position the
store no longer has (its interaction was erased since) is skipped. Recent
frames are kept, so that a socket that resumes or fell behind catches up from
memory when it can, from the store otherwise (ingest/catchup.py).

Only the fan-out's loop thread touches an OrgFeed.
"""
import collections

from ingest.sockets import framed

HOLE_SECONDS = 0.2  # how long a change may wait for its predecessor before the store is read
RECENT_BYTES = 1024 * 1024  # frames kept per organization for sockets catching up
RECENT_FRAMES = 5000
MAX_HELD = 10_000  # changes held ahead of a hole; beyond, they are read from the store with it


class OrgFeed:
    def __init__(self):
        self.position = None  # the last position delivered
        self.held = {}  # position -> message, arrived ahead of a hole
        self.hole_since = None
        self.filling = False  # a read of the store for this feed is under way
        self.ahead = None  # the store's position when the last check found it ahead of ours
        self.members = set()  # every socket of the organization in this process
        self.live = set()  # those in step with the feed
        self._recent = collections.deque()  # (position, frame)
        self._recent_bytes = 0

    def arrived(self, items, now):
        """Take ``items`` ((position, message)) from the bus and deliver what is due;
        returns the sockets to flush."""
        return self._deliver(self.take(items, now))

    def filled(self, items, last, now):
        """Take what the store had (``fill``) and deliver what is due; returns the
        sockets to flush."""
        return self._deliver(self.fill(items, last, now))

    def take(self, items, now):
        """Hold ``items`` ((position, message)); returns those now due, in order."""
        for position, message in items:
            if position > self.position and (len(self.held) < MAX_HELD or position == self.position + 1):
                self.held.setdefault(position, message)
        return self._due(now)

    def start(self, position):
        """Start after ``position``: the store's position when the first socket came."""
        self.position = position

    def fill(self, items, last, now):
        """What the store has after ``position`` up to ``last``: ``items`` ((position,
        message)); positions it lacks up to ``last`` are gone. Returns those now due."""
        for position, message in items:
            if position > self.position:
                self.held.setdefault(position, message)
        due = [(position, self.held.pop(position)) for position in sorted(self.held) if position <= last]
        self.position = max(self.position, last)
        return due + self._due(now)

    def _due(self, now):
        due = []
        while self.position + 1 in self.held:
            self.position += 1
            due.append((self.position, self.held.pop(self.position)))
        self.hole_since = (self.hole_since or now) if self.held else None
        return due

    def _deliver(self, due):
        """Frame the changes ``due`` ((position, message), in order) once and queue them
        for the sockets in step with the feed; one that has no room left falls behind
        and catches up. Returns the sockets to flush."""
        if not due:
            return ()
        frames = framed(due)
        chunk = frames[0][1] if len(frames) == 1 else b"".join(frame for _, frame in frames)
        for feed_socket in list(self.live):
            if feed_socket.position >= frames[0][0]:  # it caught up past some of them
                fresh = [pair for pair in frames if pair[0] > feed_socket.position]
                complete = feed_socket.push(None, fresh) if fresh else True
            else:
                complete = feed_socket.push(chunk, frames)
            if not complete:
                self.live.discard(feed_socket)
        self._remember(frames)
        return self.members

    def wants_fill(self, now):
        return not self.filling and self.hole_since is not None and now - self.hole_since >= HOLE_SECONDS

    def _remember(self, frames):
        self._recent.extend(frames)
        self._recent_bytes += sum(len(frame) for _, frame in frames)
        while len(self._recent) > RECENT_FRAMES or self._recent_bytes > RECENT_BYTES:
            self._recent_bytes -= len(self._recent.popleft()[1])

    def recent_after(self, position):
        """The frames delivered after ``position`` ((position, frame)), or None if some
        are no longer kept."""
        if self._recent and self._recent[0][0] > position + 1:
            return None
        if not self._recent and position < self.position:
            return None
        return [(p, frame) for p, frame in self._recent if p > position]
