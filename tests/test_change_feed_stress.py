"""The change feed under load (DESIGN §16, issue 22), through gunicorn (2 workers) and a real
`huey_consumer`: writer threads ingest singles and batches (duplicate messageIds within a
batch and against the store, invalid items, unknown customers, a customer erased mid-run)
while readers follow GET /api/changes with their cursors and a limit that varies.

Once everything is analysed, each reader has seen every stored interaction's
``interaction.created`` and every analysis's ``interaction.analyzed`` exactly once, in
strictly increasing position order, and nothing that was not stored; the erasure as
``customer.deleted`` after every change about its customer; and a fresh read from the start
shows exactly what each reader saw, less the erased customer's changes. The same holds when
a web worker is killed -9 mid-write (clients send unacknowledged requests again, with the
same messageIds; every acknowledged one is stored once) and when the readers stop at random
points and a fresh client resumes from the last cursor it processed.

A reader that falls behind misses nothing whatever the positions: it is a reader at the head
of the stream, while writers commit, that would skip a change committed after a larger
position was read. So the limits are mostly large enough for a reader to catch up, it polls
at the head, and there are two of them.

Each run prints its seed; CHANGE_FEED_SEED=<n> replays one (the interleaving with the
servers is not replayed, the choices of the clients are).
"""
import http.client
import itertools
import json
import os
import random
import signal
import threading
import time
import uuid
from collections import Counter, defaultdict
from types import SimpleNamespace

import pytest
import requests

from ingest.changes import position_of
from models import Interaction, db
from tests.helpers import BATCH_PATH, INGEST_PATH, bearer, hours_ago, interaction, iso, make_customer
from tests.servers import Consumer, Gunicorn, wait_until

pytestmark = pytest.mark.processes

WRITERS = 4
READERS = 2  # each a chance to be at the head when a change commits out of order
REQUESTS = 50  # per writer
LIVE_CUSTOMERS = 3
SHARED_MESSAGE_IDS = 40  # sent by every writer: races on the same messageId
LIMITS = (1, 2, 7, 50, 300, 1000, 1000, 1000)
CONTENTS = ("I love it, thank you!", "This is terrible.", "", "The parcel came on Tuesday.",
            "Très bien 👍", "meh")
INVALID = ({"channel": "fax"}, {"eventType": ""}, {"content": "x" * 10_001},
           {"timestamp": "2024-01-01T00:00:00"}, {"colour": "red"})
RETRYABLE_ITEM_ERRORS = ("storage_error", "commit_outcome_unknown")
EXPECTED_ERRORS = {"live": {None}, "invalid": {"validation_error"}, "unknown customer": {"customer_not_found"},
                   "doomed": {None, "customer_not_found"}}  # stored until the customer is erased


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("feed"))
    yield stack
    stack.stop()


class Stack:
    """gunicorn with 2 workers and a huey_consumer sharing a SQLite queue file. The consumer
    polls an empty queue at least every 0.2 s (huey's default backs off to 10 s), so that
    analyses commit while the writers do; its sweep (when it starts, then every minute)
    queues again whatever is pending, however recent: analyses a killed web worker never
    queued are found by starting a new consumer, and a task run twice must change nothing."""

    def __init__(self, directory):
        self.directory = directory
        self.env = {"QUEUE_URL": "sqlite:///%s" % (directory / "queue.db")}
        self.web = Gunicorn(directory / "web.log", workers=2, env=self.env)
        self.consumers = []
        try:
            self.start_consumer()
        except BaseException:
            self.stop()
            raise

    def start_consumer(self):
        log = self.directory / ("consumer-%d.log" % len(self.consumers))
        self.consumers.append(Consumer(log, env={**self.env, "ANALYSIS_SWEEP_AFTER": "0"}, args=("-m", "0.2")))
        wait_until(lambda: "Huey consumer started" in log.read_text(), message="the consumer to start")

    def restart_consumer(self):
        """A new consumer in place of the running one (its sweep runs when it starts)."""
        self.consumers[-1].stop()
        self.start_consumer()

    def kill_the_worker_serving(self, path, key, document):
        """POST ``document`` on a connection of its own and SIGKILL the web worker that
        accepted it as soon as the request's last byte is sent; (its pid, the answer it gave
        all the same, if any)."""
        body = json.dumps(document).encode()
        connection = http.client.HTTPConnection("127.0.0.1", self.web.port, timeout=30)
        connection.putrequest("POST", path)
        for name, value in {**bearer(key), "Content-Type": "application/json",
                            "Content-Length": str(len(body))}.items():
            connection.putheader(name, value)
        connection.endheaders(body[:-1])
        client_port = connection.sock.getsockname()[1]
        pid = wait_until(lambda: self.worker_connected_to(client_port), timeout=5, interval=0.001,
                         message="the worker holding the request's connection")
        connection.send(body[-1:])
        os.kill(pid, signal.SIGKILL)
        try:
            response = connection.getresponse()
            return pid, "%d %s" % (response.status, response.read()[:300])
        except (http.client.HTTPException, OSError):
            return pid, None
        finally:
            connection.close()

    def worker_connected_to(self, client_port):
        """The web worker holding the accepted end of the connection from ``client_port``."""
        with open("/proc/net/tcp") as table:  # local address, remote address, ..., inode
            rows = [line.split() for line in table][1:]
        sockets = {"socket:[%s]" % row[9] for row in rows if int(row[1].split(":")[1], 16) == self.web.port
                   and int(row[2].split(":")[1], 16) == client_port}
        return next((pid for pid in self.web.worker_pids() if open_files(pid) & sockets), None)

    def wait_for_workers(self, gone=()):
        wait_until(lambda: len(set(self.web.worker_pids()) - set(gone)) == 2, message="2 web workers")

    def stop(self):
        for consumer in self.consumers[-1:]:
            consumer.stop()
        self.web.stop()


def open_files(pid):
    try:
        return {os.readlink("/proc/%d/fd/%s" % (pid, fd)) for fd in os.listdir("/proc/%d/fd" % pid)}
    except OSError:  # one closed meanwhile: look again
        return set()


class Background(threading.Thread):
    """A thread whose exception is raised again where it is joined."""

    def __init__(self, target, *args):
        super().__init__(target=target, args=args, daemon=True)
        self.error = None

    def run(self):
        try:
            super().run()
        except BaseException as error:
            self.error = error

    def finish(self, timeout=60):
        self.join(timeout)
        assert not self.is_alive(), "%s still running after %d s" % (self.name, timeout)
        if self.error is not None:
            raise self.error


def send(session, url, key, path, document, params=None, method="post"):
    """A request sent until it is answered: when the connection fails, the answer is cut
    short, or it is a 5xx or a 429, the client cannot know whether it was done and sends it
    again as it was; returns (response, retries)."""
    for retries in range(30):
        try:
            response = session.request(method, url + path, json=document, params=params,
                                       headers=bearer(key), timeout=30)
            if response.status_code < 500 and response.status_code != 429:
                return response, retries
        except requests.RequestException:
            pass
        time.sleep(0.02 * (retries + 1))  # a client's back-off: a replacement worker is booting
    raise AssertionError("%s %s never answered" % (method, path))


class Writers:
    """Client threads ingesting for a few customers. Every item has a messageId, so that a
    request that was not answered can be sent again as it was; the answers are recorded
    per messageId."""

    def __init__(self, url, org, live, doomed, rnd):
        self.url, self.key, self.live, self.doomed = url, org["ingestKey"], live, doomed
        self.sent = {}  # messageId -> (customerId, valid)
        self.answered = defaultdict(set)  # messageId -> ids answered for it
        self.unexpected = []  # answers that only a fault explains
        self.outcomes = Counter()  # (kind of item, error or "id") -> how many
        self.retries = self.requests = 0
        self.lock = threading.Lock()
        self.threads = [Background(self.write, "w%d" % n, random.Random(rnd.random())) for n in range(WRITERS)]

    def start(self):
        for thread in self.threads:
            thread.start()

    def running(self):
        return any(thread.is_alive() for thread in self.threads)

    def finish(self):
        for thread in self.threads:
            thread.finish()

    def write(self, name, rnd):
        session, mine = requests.Session(), []  # mine: this writer's valid items for live customers
        for number in range(REQUESTS):
            if rnd.random() < 0.6:
                item = self.item(rnd, "%s-%d" % (name, number), mine)
                response = self.post(session, INGEST_PATH, item)
                self.record_single(item, response)
            else:
                items = []
                for index in range(rnd.randint(2, 60)):
                    if items and rnd.random() < 0.1:  # the same messageId again in this batch
                        items.append({**rnd.choice(items), "metadata": {"again": True}})
                    else:
                        items.append(self.item(rnd, "%s-%d-%d" % (name, number, index), mine))
                response = self.post(session, BATCH_PATH, {"interactions": items})
                while any(error["error"] in RETRYABLE_ITEM_ERRORS for error in response.json()["errors"]):
                    with self.lock:
                        self.retries += 1
                    response = self.post(session, BATCH_PATH, {"interactions": items})
                self.record_batch(items, response)

    def batch_through_a_kill(self, stack, rnd):
        """A batch whose web worker is killed -9 with it in hand (and the other writers'
        requests on that worker wherever they are, commits included), then sent again as
        it was, as a client that got no answer does; the killed worker's pid."""
        mine, session = [], requests.Session()
        items = [self.item(rnd, "victim-%d" % n, mine) for n in range(600)]
        pid, answered = stack.kill_the_worker_serving(BATCH_PATH, self.key, {"interactions": items})
        assert answered is None, "the killed worker answered: %s" % answered
        with self.lock:
            self.retries += 1
        self.record_batch(items, self.post(session, BATCH_PATH, {"interactions": items}))
        return pid

    def item(self, rnd, message_id, mine):
        """A new item (registered as sent), or one of this writer's sent before: 8 % sent
        again, 10 % a messageId shared by all writers, 8 % invalid, 3 % for an unknown
        customer, 16 % for the customer to be erased, the rest for one of the others."""
        roll = rnd.random()
        if roll < 0.08 and mine:
            return rnd.choice(mine)  # a duplicate against the store
        customer, fields = rnd.choice(self.live), {}
        if roll < 0.18:
            shared = rnd.randrange(SHARED_MESSAGE_IDS)
            message_id, customer = "shared-%d" % shared, self.live[shared % len(self.live)]
        elif roll < 0.26:
            fields = rnd.choice(INVALID)
        elif roll < 0.29:
            customer = str(uuid.uuid4())
        elif roll < 0.45:
            customer = self.doomed
        item = interaction(customer, **{"messageId": message_id, "content": rnd.choice(CONTENTS),
                                        "timestamp": iso(hours_ago(rnd.uniform(0, 48))),
                                        "metadata": {"writer": message_id, "n": rnd.randrange(1000)}, **fields})
        with self.lock:
            self.sent.setdefault(message_id, (customer, not fields))
        if not fields and customer in self.live:
            mine.append(item)
        return item

    def post(self, session, path, document):
        response, retries = send(session, self.url, self.key, path, document)
        with self.lock:
            self.requests += 1
            self.retries += retries
        return response

    def record_single(self, item, response):
        if response.status_code in (200, 201):
            self.answer(item, response.json()["id"])
        else:
            self.answer(item, None, response.json()["error"])

    def record_batch(self, items, response):
        body = response.json()
        assert response.status_code == 200, body
        errors = {error["index"]: error["error"] for error in body["errors"]}
        for index, item in enumerate(items):
            self.answer(item, body["ids"][index], errors.get(index))

    def answer(self, item, interaction_id, error=None):
        """Record the answer for an item: an id, or the error a client expects for it."""
        customer, valid = self.sent[item["messageId"]]
        kind = ("invalid" if not valid else "live" if customer in self.live
                else "doomed" if customer == self.doomed else "unknown customer")
        with self.lock:
            self.outcomes[kind, error or "id"] += 1
            if error not in EXPECTED_ERRORS[kind] or (error is None) != (interaction_id is not None):
                self.unexpected.append((item["messageId"], kind, error, interaction_id))
            if interaction_id is not None:
                self.answered[item["messageId"]].add(interaction_id)


class Reader:
    """A client following GET /api/changes from its cursor, page after page, with a limit
    that varies; ``processed`` is every item it handled, in order. With ``stops``, after
    some pages it handles only part of the page and stops there; a fresh client (its own
    session) resumes from the cursor of the last item handled."""

    def __init__(self, url, org, rnd, stops=False):
        self.url, self.key, self.rnd, self.stops = url, org["readKey"], rnd, stops
        self.processed, self.after = [], None
        self.session = requests.Session()
        self.pages = self.restarts = self.retries = 0

    def page(self, limit):
        params = {"limit": limit, **({"after": self.after} if self.after else {})}
        response, retries = send(self.session, self.url, self.key, "/api/changes", None, params, method="get")
        assert response.status_code == 200, response.text
        self.pages, self.retries = self.pages + 1, self.retries + retries
        return response.json()

    def step(self):
        """Read one page; whether it took the reader further."""
        body = self.page(self.rnd.choice(LIMITS))
        items = body["items"]
        if self.stops and self.rnd.random() < 0.3:
            handled = self.rnd.randint(0, len(items))
            self.processed += items[:handled]
            if handled:
                self.after = items[handled - 1]["cursor"]
            self.session.close()
            self.session, self.restarts = requests.Session(), self.restarts + 1
            return True
        self.processed += items
        further = bool(items) or body["nextCursor"] != self.after
        self.after = body["nextCursor"]
        return further

    def follow(self, finished):
        """Read until a page asked for after ``finished`` was set takes it no further."""
        while True:
            last_round = finished.is_set()
            if not self.step():
                if last_round:
                    return
                time.sleep(0.002)  # at the head: poll again


def read_from_start(url, org):
    reader, finished = Reader(url, org, random.Random(0)), threading.Event()
    finished.set()
    reader.follow(finished)
    return reader.processed


def database_rows(org):
    """{id: (messageId, customerId)} of the organization's stored interactions, and how many pending."""
    with db.connection_context():
        rows = (Interaction.select(Interaction.id, Interaction.message_id, Interaction.customer)
                .where(Interaction.organization == org["organizationId"]).tuples())
        pending = Interaction.select().where(Interaction.analysis_status == "pending").count()
        return {str(i): (message_id, str(customer)) for i, message_id, customer in rows}, pending


def stored_for(customer_id, analysed=False):
    with db.connection_context():
        query = Interaction.select().where(Interaction.customer == customer_id)
        return (query.where(Interaction.analysis_status != "pending") if analysed else query).count()


def as_the_api_shows(url, org, rnd):
    """{id: the interaction as GET /api/interactions shows it}, every one of the organization's;
    a sample of them checked against GET /api/interactions/<id>."""
    shown, cursor, session = {}, None, requests.Session()
    while True:
        params = {"limit": 500, **({"cursor": cursor} if cursor else {})}
        body = session.get(url + "/api/interactions", params=params, headers=bearer(org["readKey"])).json()
        shown.update((item["id"], item) for item in body["items"])
        cursor = body["nextCursor"]
        if cursor is None:
            break
    for interaction_id in rnd.sample(sorted(shown), min(20, len(shown))):
        one = session.get(url + "/api/interactions/" + interaction_id, headers=bearer(org["readKey"]))
        assert one.json() == shown[interaction_id]
    return shown


def while_writing(writers, condition, what):
    """Wait for ``condition`` while the writers still write."""
    wait_until(lambda: condition() or not writers.running(), timeout=30, message=what)
    if not writers.running():
        writers.finish()  # a writer's failure first
        raise AssertionError("the writers finished before " + what)


def erase(url, org, customer_id):
    """DELETE the customer, as a client would until answered (a 404 after an unanswered try)."""
    response, retries = send(requests, url, org["ingestKey"], "/api/customers/" + customer_id, None,
                             method="delete")
    assert response.status_code == 204 or (retries and response.status_code == 404), response.text


def run(stack, app, org, name, kill_a_worker=False, readers_stop=False):
    """One stress run: writers and readers at once, an erasure (and a kill) on the way; when
    all is analysed, the readers read to the end. Returns what the checks need."""
    seed = int(os.environ.get("CHANGE_FEED_SEED") or random.randrange(2 ** 32))
    print("\n%s: CHANGE_FEED_SEED=%d" % (name, seed))
    rnd = random.Random(seed)
    live = [make_customer(app, org) for _ in range(LIVE_CUSTOMERS)]
    doomed = make_customer(app, org, external_id="doomed")
    writers = Writers(stack.web.url, org, live, doomed, rnd)
    readers = [Reader(stack.web.url, org, random.Random(rnd.random()), stops=readers_stop) for _ in range(READERS)]
    finished = threading.Event()
    following = [Background(reader.follow, finished) for reader in readers]
    writers.start()
    for thread in following:
        thread.start()

    while_writing(writers, lambda: stored_for(doomed, analysed=True) >= 20 and all(
        any(item["data"].get("customerId") == doomed for item in reader.processed) for reader in readers),
        "the doomed customer has 20 interactions analysed, and every reader has seen one of its changes")
    erase(stack.web.url, org, doomed)
    killed = ()
    if kill_a_worker:
        while_writing(writers, lambda: len(database_rows(org)[0]) >= 600, "600 interactions are stored")
        killed = (writers.batch_through_a_kill(stack, rnd),)
    writers.finish()
    if kill_a_worker:  # the killed worker may have committed interactions it never queued
        stack.restart_consumer()
    wait_until(lambda: database_rows(org)[1] == 0, timeout=30, message="every interaction analysed")
    finished.set()
    for thread in following:
        thread.finish()
    stack.wait_for_workers(gone=killed)
    stored, _ = database_rows(org)
    print("%s: %d requests (%d sent again), %d interactions stored; readers: %s changes in %s pages, "
          "%s restarts\n  answers: %s" % (
              name, writers.requests, writers.retries, len(stored), [len(r.processed) for r in readers],
              [r.pages for r in readers], [r.restarts for r in readers],
              ", ".join("%s %s: %d" % (kind, error, n) for (kind, error), n in sorted(writers.outcomes.items()))))
    return SimpleNamespace(writers=writers, readers=readers, stored=stored, doomed=doomed, rnd=rnd,
                           retries=writers.retries + sum(reader.retries for reader in readers))


def check_acknowledged_once(writers, stored, doomed):
    """Every acknowledged item is stored once, under the id it was answered with; nothing
    that was not acknowledged, invalid or for the erased customer is stored."""
    assert writers.unexpected == []
    by_message_id = Counter(message_id for message_id, _ in stored.values())
    assert max(by_message_id.values()) == 1
    stored_ids = {message_id: interaction_id for interaction_id, (message_id, _) in stored.items()}
    live_answers = {message_id: ids for message_id, ids in writers.answered.items()
                    if writers.sent[message_id][0] != doomed}
    assert live_answers == {message_id: {interaction_id} for message_id, interaction_id in stored_ids.items()}
    for message_id, customer in stored.values():
        assert writers.sent[message_id] == (customer, True)


def check_feed(items, org, stored, shown, doomed, writers):
    """What a reader saw: each stored interaction created and analysed once, as stored, in
    position order; nothing else but the erased customer's changes before its erasure."""
    positions = [position_of(org["organizationId"], item["cursor"]) for item in items]
    assert all(a < b for a, b in itertools.pairwise(positions)), "positions not strictly increasing"
    index = defaultdict(dict)  # type -> {id: where the reader saw it}
    for n, item in enumerate(items):
        assert item["data"]["id"] not in index[item["type"]], "seen twice: %s" % item
        index[item["type"]][item["data"]["id"]] = n
    assert set(index) <= {"interaction.created", "interaction.analyzed", "customer.deleted"}
    assert list(index["customer.deleted"]) == [doomed]
    erased_at = index["customer.deleted"][doomed]

    created = {item["data"]["id"]: item["data"] for item in items if item["type"] == "interaction.created"}
    live_created = {i for i, data in created.items() if data["customerId"] != doomed}
    assert live_created == set(stored), "created: %d missing, %d not stored" % (
        len(set(stored) - live_created), len(live_created - set(stored)))
    for interaction_id in live_created:
        assert created[interaction_id] == {**shown[interaction_id], "analysisStatus": "pending",
                                           "sentiment": None, "analyzedAt": None}
    for interaction_id, data in created.items():
        if data["customerId"] == doomed:  # sent for it, and stored as answered if it was
            assert writers.sent[data["messageId"]] == (doomed, True)
            assert writers.answered.get(data["messageId"], {interaction_id}) == {interaction_id}

    analyzed = {item["data"]["id"]: item["data"] for item in items if item["type"] == "interaction.analyzed"}
    live_analyzed = {i for i, data in analyzed.items() if data["customerId"] != doomed}
    assert live_analyzed == set(stored), "analyzed: %d missing, %d not stored" % (
        len(set(stored) - live_analyzed), len(live_analyzed - set(stored)))
    for interaction_id, data in analyzed.items():
        assert index["interaction.created"].get(interaction_id, len(items)) < index["interaction.analyzed"][
            interaction_id], "analysed before it was created: %s" % interaction_id
        if interaction_id in stored:
            view = shown[interaction_id]
            assert view["analysisStatus"] in ("done", "skipped")
            assert data == {key: view[key] for key in ("id", "customerId", "analysisStatus", "sentiment")}
    about_doomed = [n for n, item in enumerate(items) if item["data"].get("customerId") == doomed]
    assert about_doomed and max(about_doomed) < erased_at, "a change about the customer after its erasure"


def check_run(stack, org, run):
    check_acknowledged_once(run.writers, run.stored, run.doomed)
    shown = as_the_api_shows(stack.web.url, org, run.rnd)
    assert set(shown) == set(run.stored)
    fresh = read_from_start(stack.web.url, org)
    assert not [item for item in fresh if item["data"].get("customerId") == run.doomed]
    for reader in run.readers:
        check_feed(reader.processed, org, run.stored, shown, run.doomed, run.writers)
        assert fresh == [item for item in reader.processed if item["data"].get("customerId") != run.doomed]


def test_a_reader_following_the_feed_sees_every_stored_change_once_in_order(stack, app, org):
    steady = run(stack, app, org, "steady")
    assert steady.retries == 0, "a request went unanswered or failed with no fault"
    check_run(stack, org, steady)


def test_a_web_worker_killed_mid_write_loses_nothing_acknowledged_and_the_feed_shows_it_once(
        stack, app, org):
    killed = run(stack, app, org, "worker killed", kill_a_worker=True)
    check_run(stack, org, killed)


def test_a_reader_resuming_from_its_last_cursor_at_random_points_misses_nothing(stack, app, org):
    stopping = run(stack, app, org, "readers stop", readers_stop=True)
    assert stopping.retries == 0, "a request went unanswered or failed with no fault"
    assert all(reader.restarts > 5 for reader in stopping.readers)
    check_run(stack, org, stopping)
