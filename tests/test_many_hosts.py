"""Many hosts, one service (DESIGN §18, issue 25): the production topology on hosts
of their own (tests/hosts.py), each a network namespace with one address:

    db       PostgreSQL and Redis, listening on its address only
    replica  a streaming replica of db's PostgreSQL, which the web hosts read from
    web1  gunicorn (2 workers)          \\
    web2  gunicorn (2 workers)           > edge: nginx (deploy/nginx.conf) balancing web1, web2
    work  huey_consumer

The clients (this process) reach the service through ``edge`` only. Nothing runs
on a host's loopback but what that host itself serves, so a setting that assumed
the database, Redis or another process on localhost fails here.

A host is lost under load: clients send singles and batches with messageIds and
send an unanswered request again as it was, 1,000 sockets follow the change feed
through edge (tests/swarm.py: Followers) and resume from their cursor when their
connection is lost. Afterwards every acknowledged interaction is stored exactly
once, the counters are exact, and every socket received every change of the
organization exactly once, in order: the same list a fresh read of /api/changes
gives. Each run prints requests failed during the loss, seconds to recover and
events lost.
"""
import json
import os
import subprocess
import threading
import time
import uuid
from collections import Counter

import pytest
import requests

from ingest.changes import Kind
from tests import dbs, hosts
from tests.helpers import BATCH_PATH, INGEST_PATH, bearer, interaction
from tests.postgres import Postgres
from tests.servers import BIN, ROOT, Consumer, Gunicorn, Nginx, RedisServer, stop_group, wait_until
from tests.swarm import Followers

pytestmark = [pytest.mark.processes, pytest.mark.redis]

SOCKETS = 1000
CLIENT_THREADS = 3
CLIENT_PAUSE = 0.1  # seconds between one client thread's requests: load, not a flood
CUSTOMERS = 5
SWEEP_AGE = 5  # ANALYSIS_SWEEP_AFTER: the sweep queues again what is pending longer
# An analysis whose enqueue failed while a host was cut off waits for the sweep, which
# runs once a minute: it is done within a minute and SWEEP_AGE, plus the analysis.
ANALYSED_WITHIN = 60 + SWEEP_AGE + 25
ORGANIZATIONS = 20  # the sockets spread over them, as over customers of a real service


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not dbs.is_postgres_url(os.environ["DATABASE_URL"]):
        pytest.skip("runs in the PostgreSQL suite (DATABASE_URL=postgresql://...): the db host runs a "
                    "PostgreSQL of its own, whichever database the suite uses, so once is enough")
    why_not = hosts.available()
    if why_not:
        if os.environ.get("CI"):
            pytest.fail("CI must be able to make hosts: " + why_not)
        pytest.skip(why_not)
    network = hosts.Network()
    cluster = None
    try:
        cluster = Cluster(network, tmp_path_factory.mktemp("hosts"))
        yield cluster
    finally:
        if cluster is not None:
            cluster.stop()
        network.close()


class Cluster:
    """The six hosts and what runs on them."""

    def __init__(self, network, directory):
        self.directory = directory
        self.parts = []  # the stop of everything started, called in reverse order (also if start-up fails)
        self.db, self.replica_host, self.web1, self.web2, self.work, self.edge_host = (
            network.host(name) for name in ("db", "replica", "web1", "web2", "work", "edge"))
        try:
            self.start()
        except BaseException:
            self.stop()
            raise

    def start(self):
        self.postgres = self.started(Postgres(5432, host=self.db), stop="remove")
        self.replica = self.started(Postgres(5432, host=self.replica_host, primary=self.postgres), stop="remove")
        self.redis = self.started(RedisServer(6379, host=self.db).start())
        self.env = {"DATABASE_URL": self.postgres.url(), "DATABASE_READ_URL": self.replica.url(),
                    "EVENTS_URL": self.redis.url,
                    "QUEUE_URL": self.redis.url[:-1] + "1", "TRUSTED_PROXIES": "1",
                    "ANALYSIS_SWEEP_AFTER": str(SWEEP_AGE), "LOG_LEVEL": "INFO"}
        hosts.init_db(self.env)
        self.web = {host.name: self.start_web(host) for host in (self.web1, self.web2)}
        self.consumer = self.start_consumer()
        self.edge = self.started(Nginx(self.host_directory(self.edge_host), list(self.web.values()),
                                       sockets_per_address=2 * SOCKETS, host=self.edge_host))
        self.url = self.edge.url
        ready = requests.get(self.url + "/readyz").json()
        assert ready["status"] == "ready" and not ready["replica"]["fallback"], ready

    def host_directory(self, host):
        """A directory of the host's own, for what it keeps on disk."""
        path = self.directory / host.name
        path.mkdir(exist_ok=True)
        return path

    def host_env(self, host):
        return {**self.env, "INSTANCE_PATH": str(self.host_directory(host))}

    def started(self, part, stop="stop"):
        """``part``, whose method ``stop`` the cluster's stop() calls."""
        self.parts.append(getattr(part, stop))
        return part

    def start_web(self, host):
        log = self.directory / ("%s-%d.log" % (host.name, time.monotonic_ns()))
        return self.started(Gunicorn(log, workers=2, env=self.host_env(host), host=host))

    def start_consumer(self):
        return self.started(Consumer(self.directory / "work.log", env=self.host_env(self.work), host=self.work))

    def restart_web(self, host):
        self.web[host.name] = self.start_web(host)

    def restore(self, host):
        """A web host as it was before a test lost it: linked, and serving."""
        host.mend()
        if self.web[host.name].process.poll() is not None:
            self.restart_web(host)

    def new_organization(self):
        out = subprocess.run([os.path.join(BIN, "flask"), "--app", "app", "create-org", "Acme", "--json"],
                             cwd=ROOT, env={**os.environ, **self.env}, check=True,
                             capture_output=True, text=True).stdout
        org = json.loads(out)
        session = requests.Session()
        org["customers"] = [session.post(self.url + "/api/customers", json={"externalId": "c%d" % n},
                                         headers=bearer(org["ingestKey"])).json()["id"]
                            for n in range(CUSTOMERS)]
        return org

    def sql(self, query, *params):
        return self.postgres.sql(query, *params)

    def stop(self):
        for stop in reversed(self.parts):
            stop()


class Clients:
    """Client threads sending singles and batches of 1 to 5 items through edge, to
    each organization in turn, every item with a messageId; a request that is not
    acknowledged (no answer, a 5xx) is sent again as it was, until it is.
    ``acknowledged``: organization id -> {messageId: the id answered}."""

    def __init__(self, url, orgs):
        self.url, self.orgs = url, orgs
        self.acknowledged = {org["organizationId"]: {} for org in orgs}
        self.failures = []  # when each failed attempt ended
        self.lock, self.stopping = threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(n,), daemon=True) for n in range(CLIENT_THREADS)]
        for thread in self.threads:
            thread.start()

    def run(self, number):
        session = requests.Session()
        sent = number
        while not self.stopping.is_set():
            sent += CLIENT_THREADS
            org = self.orgs[sent % len(self.orgs)]
            items = [interaction(org["customers"][(sent + n) % CUSTOMERS], messageId=str(uuid.uuid4()),
                                 content="Thank you, it works" if n % 2 else "It broke again")
                     for n in range(1 + sent % 5)]
            if len(items) == 1:
                ids = [self.send(session, org, INGEST_PATH, items[0])["id"]]
            else:
                ids = self.send(session, org, BATCH_PATH, {"interactions": items})["ids"]
            with self.lock:
                self.acknowledged[org["organizationId"]].update(
                    zip((item["messageId"] for item in items), ids, strict=True))
            self.stopping.wait(CLIENT_PAUSE)

    def send(self, session, org, path, document):
        while True:
            try:
                response = session.post(self.url + path, json=document, headers=bearer(org["ingestKey"]),
                                        timeout=10)
                if response.status_code in (200, 201):
                    return response.json()
                assert response.status_code >= 500, response.text  # anything else is the client's fault
            except requests.RequestException:
                session = requests.Session()  # its pooled connection may be the dead one
            with self.lock:
                self.failures.append(time.monotonic())
            time.sleep(0.2)

    def count(self):
        with self.lock:
            return sum(len(acknowledged) for acknowledged in self.acknowledged.values())

    def stop(self):
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=60)


def all_changes(url, org):
    """Every change of the organization, oldest first, read from the start."""
    items, after, session = [], None, requests.Session()
    while True:
        params = {"limit": 1000, **({"after": after} if after else {})}
        body = session.get(url + "/api/changes", params=params, headers=bearer(org["readKey"])).json()
        items += body["items"]
        if not body["items"]:
            return items
        after = body["nextCursor"]


def start_cursor(url, org):
    """The cursor before the organization's first change."""
    return requests.get(url + "/api/changes", params={"limit": 1},
                        headers=bearer(org["readKey"])).json()["nextCursor"]


def follow(url, orgs):
    """SOCKETS sockets, spread evenly over the organizations, each from its start."""
    starts = [(org["readKey"], start_cursor(url, org)) for org in orgs]
    return Followers(url, [starts[n % len(orgs)] for n in range(SOCKETS)])


def check_stored(cluster, org, acknowledged):
    """Each acknowledged interaction stored once and nothing else; counters exact; all
    analysed. Returns how many interactions the organization has."""
    stored = cluster.sql("SELECT message_id, id::text FROM interaction WHERE organization_id = %s",
                         org["organizationId"])
    by_message_id = Counter(message_id for message_id, _ in stored)
    assert not [m for m, n in by_message_id.items() if n > 1], "a messageId stored twice"
    assert dict(stored) == acknowledged, "stored is not exactly what was acknowledged"
    counts = cluster.sql("SELECT c.id::text, c.interaction_count, COUNT(i.id) FROM customer c "
                         "LEFT JOIN interaction i ON i.customer_id = c.id WHERE c.organization_id = %s "
                         "GROUP BY c.id", org["organizationId"])
    assert all(counted == actual for _, counted, actual in counts), counts
    wait_until(lambda: not cluster.sql("SELECT 1 FROM interaction WHERE organization_id = %s "
                                       "AND analysis_status = 'pending' LIMIT 1", org["organizationId"]),
               timeout=ANALYSED_WITHIN, message="every interaction analysed")
    return len(stored)


def check_nothing_lost(cluster, orgs, clients, followers):
    """Acknowledged once, counters exact, and every socket saw every change of its
    organization once, in order. Returns the events lost: changes a socket lacks."""
    expected = {}
    for org in orgs:
        stored = check_stored(cluster, org, clients.acknowledged[org["organizationId"]])
        changes = [(item["cursor"], item["type"], item["data"]["id"]) for item in all_changes(cluster.url, org)]
        assert len(changes) == 2 * stored  # created and analysed, each once
        expected[org["readKey"]] = changes
    print("\n%d changes; sockets: %s" % (sum(map(len, expected.values())), followers.summary()))
    followers.wait(lambda: all(len(f.changes) >= len(expected[f.key]) for f in followers.members),
                   timeout=120, message="every socket received every change")
    wrong = [f.index for f in followers.members if f.changes != expected[f.key]]
    assert not wrong, "%d sockets saw other than every change once, in order (first: %s)" % (
        len(wrong), wrong[:5])
    return sum(len(expected[f.key]) - len(f.changes) for f in followers.members)


@pytest.mark.parametrize("how", ["kill", "cut"])
def test_losing_a_web_host_under_load_loses_no_acknowledged_interaction_and_no_change(cluster, how):
    orgs = [cluster.new_organization() for _ in range(ORGANIZATIONS)]
    log_from = {name: len(web.log_lines()) for name, web in cluster.web.items()}

    def connected(name):
        return sum(1 for line in cluster.web[name].log_lines()[log_from[name]:]
                   if line["message"] == "feed socket connected")

    followers, clients = follow(cluster.url, orgs), None
    try:
        followers.wait(lambda: all(f.readies for f in followers.members), timeout=120,
                       message="every socket ready")
        wait_until(lambda: connected("web1") + connected("web2") >= SOCKETS, message="each socket logged")
        on_web1 = connected("web1")
        assert 0 < on_web1 < SOCKETS, "edge balances the sockets over web1 and web2"
        clients = Clients(cluster.url, orgs)
        wait_until(lambda: clients.count() >= 200, timeout=60, message="200 interactions acknowledged")
        lost_before = {f.index: f.lost for f in followers.members}  # refusals at start, if any

        def lost_since():
            return sum(1 for f in followers.members if f.lost > lost_before[f.index])

        lost_at = time.monotonic()
        if how == "kill":
            cluster.web1.kill_all()
        else:
            cluster.web1.cut()
        at_loss = clients.count()
        followers.wait(lambda: clients.count() >= at_loss + 200 and lost_since() >= on_web1
                       and all(f.state == "following" for f in followers.members),
                       timeout=120, message=lambda: "200 more acknowledged (%d), and web1's %d sockets resumed "
                       "through edge" % (clients.count() - at_loss, on_web1))
        recovered = max([*clients.failures, lost_at]) - lost_at
        resumed = time.monotonic() - lost_at
        assert lost_since() == on_web1, "only web1's sockets lost theirs"
        if how == "kill":
            cluster.restart_web(cluster.web1)
        else:
            cluster.web1.mend()
        back = cluster.web["web1"]
        served_before = len(back.log_lines())
        wait_until(lambda: any(line.get("path") in (INGEST_PATH, BATCH_PATH)
                               for line in back.log_lines()[served_before:]),
                   timeout=60, message="web1 to take load again")
        clients.stop()
        lost = check_nothing_lost(cluster, orgs, clients, followers)
        print("\nweb1 %s: %d requests failed during the loss; requests succeeded again after %.1f s, "
              "the %d sockets it held resumed within %.1f s; %d interactions acknowledged, events lost: %d"
              % ("killed -9" if how == "kill" else "cut off", len(clients.failures), recovered,
                 on_web1, resumed, clients.count(), lost))
    finally:
        if clients is not None:
            clients.stop()
        followers.close()
        cluster.restore(cluster.web1)  # for the next test, also when this one failed


def test_losing_the_work_host_mid_backlog_leaves_nothing_pending(cluster):
    """The backlog is ingested while work is down, so that it is lost mid-way through."""
    org = cluster.new_organization()
    stop_group(cluster.consumer.process)
    session = requests.Session()
    for n in range(20):
        items = [interaction(org["customers"][n % CUSTOMERS], content="It is great %d" % k) for k in range(500)]
        response = session.post(cluster.url + BATCH_PATH, json={"interactions": items},
                                headers=bearer(org["ingestKey"]))
        assert response.status_code == 200 and response.json()["successful"] == 500

    def pending():
        return cluster.sql("SELECT COUNT(*) FROM interaction WHERE organization_id = %s "
                           "AND analysis_status = 'pending'", org["organizationId"])[0][0]

    cluster.consumer = cluster.start_consumer()
    wait_until(lambda: pending() < 9_000, timeout=60, message="the consumer to be on its way")
    cluster.work.kill_all()
    lost_at, left = time.monotonic(), pending()
    assert left > 0, "the consumer finished before it was lost: no backlog was lost mid-way"
    cluster.consumer = cluster.start_consumer()
    wait_until(lambda: pending() == 0, timeout=120, message="nothing pending once work is back")
    analysed = cluster.sql("SELECT COUNT(*) FROM change WHERE organization_id = %s AND kind = %s",
                           org["organizationId"], Kind.ANALYZED)[0][0]
    assert analysed == 10_000, "each interaction analysed once: %d analyses" % analysed
    print("\nwork killed -9 with %d of 10000 pending: all analysed %.1f s later, each once"
          % (left, time.monotonic() - lost_at))


def web_log_messages(cluster):
    return [line["message"] for web in cluster.web.values() for line in web.log_lines()]


def test_losing_the_replica_host_sends_reads_to_the_primary_within_seconds(cluster):
    """Its link cut, the replica answers nothing and resets nothing: reads that were on
    its connections give up within seconds and go to the primary, and so does every
    read until it is back; each process says so once."""
    org = cluster.new_organization()
    session = requests.Session()
    items = [interaction(org["customers"][0], content="hello %d" % n) for n in range(10)]
    assert session.post(cluster.url + BATCH_PATH, json={"interactions": items},
                        headers=bearer(org["ingestKey"])).status_code == 200
    answers, stopping = [], threading.Event()  # (when it was sent, seconds taken, status)

    def read():
        reader = requests.Session()
        while not stopping.is_set():
            began = time.monotonic()
            status = reader.get(cluster.url + "/api/interactions", params={"limit": 10},
                                headers=bearer(org["readKey"]), timeout=60).status_code
            answers.append((began, time.monotonic() - began, status))

    readers = [threading.Thread(target=read, daemon=True) for _ in range(3)]
    for reader in readers:
        reader.start()
    try:
        wait_until(lambda: len(answers) >= 30, message="reads before the cut")
        cut_at = time.monotonic()
        cluster.replica_host.cut()
        wait_until(lambda: sum(1 for began, _, _ in answers if began > cut_at + 20) >= 30, timeout=120,
                   message="reads for 20 s after the cut")
        cluster.replica_host.mend()
        wait_until(lambda: "replica reachable again; reads go to it" in web_log_messages(cluster), timeout=60,
                   message="a web process to read from the replica again")
    finally:
        stopping.set()
        for reader in readers:
            reader.join(timeout=70)
        cluster.replica_host.mend()
    during = [took for began, took, _ in answers if began >= cut_at]
    assert {status for _, _, status in answers} == {200}, Counter(status for _, _, status in answers)
    slowest = max(during)
    assert slowest < 10, "a read waited %.1f s for a lost replica" % slowest
    assert "replica unreachable; reads go to the primary" in web_log_messages(cluster)
    print("\nreplica cut off: %d reads answered 200 meanwhile, the slowest in %.1f s"
          % (len(during), slowest))
