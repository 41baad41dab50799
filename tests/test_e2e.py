"""End to end over real HTTP through gunicorn (2 worker processes), and the
concurrency promise of DESIGN §6: many writers on the same customers, every
count exact, no 5xx, no "database is locked" reaching a client."""
import gzip
import json
import os
import random
import signal
import socket
import threading
import time

import pytest
import requests

from models import Interaction
from tests import dbs
from tests.helpers import bearer, hours_ago, interaction, iso, post_interaction
from tests.servers import Production, wait_until


@pytest.fixture(scope="module")
def nginx_gunicorn(tmp_path_factory):
    """nginx in front of gunicorn with 2 workers, as in production."""
    front = Production(tmp_path_factory.mktemp("production"), workers=2)
    yield front
    front.stop()


def new_customer(nginx_gunicorn, org, external_id):
    response = requests.post(nginx_gunicorn.url + "/api/customers", json={"externalId": external_id},
                             headers=bearer(org["ingestKey"]))
    assert response.status_code == 201
    return response.json()["id"]


def test_ingest_and_read_back_over_http(nginx_gunicorn, org):
    customer = new_customer(nginx_gunicorn, org, "e2e")
    headers = {**bearer(org["ingestKey"]), "Content-Type": "application/json",
               "Content-Encoding": "gzip"}
    body = gzip.compress(json.dumps(interaction(customer, messageId="e2e-1")).encode())
    first = requests.post(nginx_gunicorn.url + "/api/data/ingest", data=body, headers=headers)
    again = requests.post(nginx_gunicorn.url + "/api/data/ingest", data=body, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == {"id": first.json()["id"], "duplicate": True}
    assert again.headers["X-Request-ID"]

    batch = requests.post(nginx_gunicorn.url + "/api/data/ingest/batch",
                          json={"interactions": [interaction(customer), {"bad": 1}]},
                          auth=(org["ingestKey"], ""))
    assert batch.status_code == 200
    assert (batch.json()["successful"], batch.json()["failed"]) == (1, 1)

    bad = post_interaction(nginx_gunicorn.url, org["ingestKey"], customer, channel="fax")
    assert bad.status_code == 400 and "channel" in bad.json()["details"]
    huge = requests.post(nginx_gunicorn.url + "/api/data/ingest", data=b"x" * (2 * 1024 * 1024),
                         headers={**bearer(org["ingestKey"]), "Content-Type": "application/json"})
    assert huge.status_code == 413

    read = requests.get(nginx_gunicorn.url + "/api/customers/" + customer, headers=bearer(org["readKey"]))
    assert read.json()["interactionCount"] == 2
    assert requests.get(nginx_gunicorn.url + "/readyz").status_code == 200


def test_demo_stream_feeds_the_first_start_demo_organization(app, runner, nginx_gunicorn):
    """`python app.py` printed a demo organization and its feed link; `demo --stream`
    sends to that organization, so the link shows life."""
    first = json.loads(runner.invoke(args=["demo", "--json"]).output)
    result = runner.invoke(args=["demo", "--json", "--stream", "--count", "5", "--rate", "50",
                                 "--base-url", nginx_gunicorn.url])
    assert result.exit_code == 0, result.output
    assert "sent 5 interactions" in result.output
    assert json.loads(result.output.splitlines()[0])["organizationId"] == first["organizationId"]
    with app.app_context():
        assert Interaction.select().count() == 5
        assert {str(i.organization_id) for i in Interaction.select()} == {first["organizationId"]}


WRITERS = 8
OPERATIONS = 30
SHARED_MESSAGE_IDS = 150


def test_concurrent_writers_keep_every_count_exact(app, nginx_gunicorn, org):
    customers = [new_customer(nginx_gunicorn, org, "hot-%d" % i) for i in range(3)]
    responses, violations, done = [], [], threading.Event()

    def payload(rnd):
        item = interaction(rnd.choice(customers), timestamp=iso(hours_ago(rnd.uniform(0, 48))))
        if rnd.random() < 0.3:  # shared across writers: races on the same messageId
            item["messageId"] = "shared-%d" % rnd.randrange(SHARED_MESSAGE_IDS)
        return item

    def writer(seed):
        rnd, session = random.Random(seed), requests.Session()
        session.headers.update(bearer(org["ingestKey"]))
        for _ in range(OPERATIONS):
            if rnd.random() < 0.7:
                response = session.post(nginx_gunicorn.url + "/api/data/ingest", json=payload(rnd))
            else:
                items = [payload(rnd) for _ in range(rnd.randint(20, 150))]
                response = session.post(nginx_gunicorn.url + "/api/data/ingest/batch",
                                        json={"interactions": items})
            responses.append((response.status_code, response.text))

    def reader():
        while not done.is_set():
            violations.extend(dbs.invariant_violations())

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(WRITERS)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    watcher.join()

    statuses = [status for status, _ in responses]
    assert all(status < 500 for status in statuses), [r for r in responses if r[0] >= 500][:3]
    assert not any("locked" in text for _, text in responses)
    assert set(statuses) <= {200, 201}
    assert violations == [], "invariant broken as seen from outside: %s" % violations[:3]

    created, reported_ids = 0, set()
    for _, text in responses:
        body = json.loads(text)
        if "total" in body:
            created += body["successful"]
            reported_ids.update(i for i in body["ids"] if i)
        else:
            created += not body["duplicate"]
            reported_ids.add(body["id"])
    with app.app_context():
        stored = {str(row[0]) for row in Interaction.select(Interaction.id).tuples()}
        assert dbs.invariant_violations() == []
    assert len(stored) == created
    assert stored == reported_ids
    counts = [requests.get(nginx_gunicorn.url + "/api/customers/" + c, headers=bearer(org["readKey"]))
              .json()["interactionCount"] for c in customers]
    assert sum(counts) == created

    worker_pids = {line["pid"] for line in nginx_gunicorn.log_lines()
                   if line.get("path", "").startswith("/api/data/ingest")}
    assert len(worker_pids) >= 2, "writes were not spread over both worker processes"
    print("\nconcurrency: %d writers, %d requests, %d interactions stored, %d customers "
          "%s, %d worker processes, invariant checks: %s" % (
              WRITERS, len(responses), created, len(customers), counts,
              len(worker_pids), "all clean"))


def healthz_answers(url, count=20, interval=0.1):
    """How many of ``count`` health checks answered within a second."""
    answered = 0
    for _ in range(count):
        try:
            answered += requests.get(url + "/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            pass
        time.sleep(interval)
    return answered


def test_clients_that_never_close_do_not_stall_the_server(nginx_gunicorn):
    """10 a second of a complete request with `Connection: close` and a client
    that never closes its end (gunicorn alone lingers 2 s on each, in its main
    loop: /healthz took 3.9 s): nginx holds them."""
    host, port = nginx_gunicorn.url.split("//")[1].split(":")
    held, stop = [], threading.Event()

    def open_and_keep():
        while not stop.is_set():
            sock = socket.create_connection((host, int(port)))
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            held.append(sock)
            time.sleep(0.1)
    opener = threading.Thread(target=open_and_keep)
    opener.start()
    try:
        time.sleep(1)
        assert healthz_answers(nginx_gunicorn.url) == 20
    finally:
        stop.set()
        opener.join()
        for sock in held:
            sock.close()


def test_a_slowloris_does_not_starve_the_server(nginx_gunicorn):
    """3,400 connections sending a byte of their request now and then (gunicorn
    alone: every /healthz timed out for 30 s): nginx holds them, and cuts them
    off after client_header_timeout."""
    host, port = nginx_gunicorn.url.split("//")[1].split(":")
    slow = []
    for _ in range(3400):
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        slow.append(sock)
    try:
        for sock in slow[::2]:
            sock.sendall(b"X")
        assert healthz_answers(nginx_gunicorn.url) == 20
    finally:
        for sock in slow:
            sock.close()


def test_each_worker_has_a_cpu_of_its_own_and_a_replacement_takes_the_freed_one(nginx_gunicorn):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs for 2 workers")
    pids = nginx_gunicorn.worker_pids()
    assert len(pids) == 2
    placed = {pid: os.sched_getaffinity(pid) for pid in pids}
    assert all(len(cpus) == 1 for cpus in placed.values()), placed
    assert placed[pids[0]] != placed[pids[1]]

    os.kill(pids[0], signal.SIGKILL)
    wait_until(lambda: len(set(nginx_gunicorn.worker_pids()) - {pids[0]}) == 2, message="a replacement worker")
    [replacement] = set(nginx_gunicorn.worker_pids()) - set(pids)
    wait_until(lambda: os.sched_getaffinity(replacement) == placed[pids[0]], message="the freed CPU")
    wait_until(lambda: requests.get(nginx_gunicorn.url + "/healthz").ok)
