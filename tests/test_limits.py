"""Limits under attack (DESIGN §5, §13): refusals of large bodies through nginx,
the analysis backlog bound shared fairly between organizations, budgets counted
in events, ?dryRun where it is not supported, and floods of unknown keys."""
import http.client
import json
import random
import threading
import uuid

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest import runtime
from ingest.accounts import revoke_key
from ingest.auth import EVENTS, REQUESTS, KeyCache, RateLimit, hash_key, over_share, parse_rate, pending_by_organization
from models import Customer
from tests.conftest import production_stack, require_redis
from tests.helpers import (
    BATCH_PATH,
    INGEST_PATH,
    bearer,
    interaction,
    make_customer,
    make_organization,
    post_batch,
    post_interaction,
    stored_count,
)
from tests.servers import wait_until

MIB = 1024 * 1024


def assert_error(response, status, code):
    body = response.get_json()
    assert response.status_code == status, body
    assert set(body) == {"error", "message", "details"} and body["error"] == code
    if status == 429:
        assert 1 <= int(response.headers["Retry-After"]) == body["details"]["retryAfter"]
    return body


# Refusals of large bodies through nginx -----------------------------------------------

def batch_of_size(customer_id, size):
    """A batch whose JSON is about ``size`` bytes."""
    items = [interaction(customer_id, content="x" * 9000) for _ in range(size // 9300)]
    return json.dumps({"interactions": items})


@pytest.mark.processes
@pytest.mark.redis
def test_refusals_of_large_bodies_reach_the_client_through_nginx_and_no_one_else_sees_a_502(
        app, tmp_path, org, customer_id):
    """A key over its rate limit keeps sending ~1 MiB batches from 4 threads: each
    is answered 429 with Retry-After through nginx, while another tenant's 120
    requests over the same nginx (and its pool of upstream connections) all
    succeed; a bad key's, a wrong scope's and an oversized body's refusals
    (401, 403, 413) arrive as well."""
    other = make_organization(app, "Other")
    other_customer = make_customer(app, other)
    with production_stack(tmp_path, env={"RATE_LIMIT": "150/day"}) as web:
        session = requests.Session()
        while post_interaction(web.url, org["ingestKey"], customer_id, session).status_code != 429:
            pass  # spend the key's budget with small requests
        body = batch_of_size(customer_id, MIB - 10_000)
        assert MIB * 0.9 < len(body) < MIB
        refused, done = [], threading.Event()

        def send_large():
            sender = requests.Session()
            while not done.is_set():
                response = sender.post(web.url + BATCH_PATH, data=body, headers={
                    **bearer(org["ingestKey"]), "Content-Type": "application/json"})
                refused.append((response.status_code, response.headers.get("Retry-After")))
        senders = [threading.Thread(target=send_large) for _ in range(4)]
        for sender in senders:
            sender.start()
        try:
            others = [post_interaction(web.url, other["ingestKey"], other_customer, session).status_code
                      for _ in range(120)]
        finally:
            done.set()
            for sender in senders:
                sender.join()
        oversized = batch_of_size(customer_id, int(1.5 * MIB))
        for key, data, status in ((org["readKey"], body, 403), ("not-a-key", body, 401),
                                  (other["ingestKey"], oversized, 413)):
            response = session.post(web.url + BATCH_PATH, data=data, headers={
                **bearer(key), "Content-Type": "application/json"})
            assert response.status_code == status and response.json()["error"]
    assert others == [201] * 120
    assert len(refused) >= 8
    assert {status for status, _ in refused} == {429}, refused
    assert all(retry_after and int(retry_after) >= 1 for _, retry_after in refused)


# The backlog bound, shared fairly -----------------------------------------------------

def test_one_organizations_backlog_refuses_it_and_not_another(make_app, app, org, customer_id):
    """Bound 10, no consumer (what is stored stays pending). B holds 30: B is refused,
    A, with none, is not. A's share of the bound is then 5: with 4 it goes on
    ingesting; once over 5 it is refused too, for its own backlog."""
    app = make_app({"TESTING": True, "ANALYSIS_BACKLOG_MAX": 10})
    client, backlog = app.test_client(), runtime.of(app).backlog
    b_key, b_id = org["ingestKey"], org["organizationId"]
    a = make_organization(app, "A")
    a_customer = make_customer(app, a)
    assert post_batch(client, b_key, [interaction(customer_id) for _ in range(30)]).status_code == 200

    wait_until(lambda: client.post(INGEST_PATH + "?dryRun=true", json=interaction(customer_id),
                                   headers=bearer(b_key)).status_code == 429, message="B's backlog to be sampled")
    assert_error(post_interaction(client, b_key, customer_id), 429, "analysis_backlog_full")
    assert post_interaction(client, a["ingestKey"], a_customer).status_code == 201
    assert post_batch(client, a["ingestKey"], [interaction(a_customer) for _ in range(3)]).status_code == 200
    segment = client.post("/v1/track", auth=(b_key, ""), json={"userId": "u", "event": "Clicked"})
    assert segment.status_code == 429

    with app.app_context():  # what the next sample decides: A's 4 are within its share
        assert over_share(10, pending_by_organization) == {b_id}
    assert post_interaction(client, a["ingestKey"], a_customer).status_code == 201
    assert post_interaction(client, a["ingestKey"], a_customer).status_code == 201
    wait_until(lambda: backlog.retry_after(a["organizationId"]), message="A's 6 to be sampled")
    assert_error(post_interaction(client, a["ingestKey"], a_customer), 429, "analysis_backlog_full")
    assert stored_count(app) == 36


def max_min_refused(limit, backlogs):
    """The organizations over the water level L at which sum(min(backlog, L)) == limit."""
    room, left = limit, sorted(backlogs.items(), key=lambda item: item[1])
    for position, (_, backlog) in enumerate(left):
        share = room / (len(left) - position)
        if backlog > share:
            return {organization for organization, pending in left[position:] if pending > share}
        room -= backlog
    return set()


@settings(max_examples=300, deadline=None)
@given(limit=st.integers(0, 1000), backlogs=st.lists(st.integers(1, 3000), max_size=12))
def test_the_shares_are_max_min_fair_and_bounded_passes_only_refuse_the_largest(limit, backlogs):
    backlogs = dict(enumerate(backlogs))
    reads = []

    def count(cap):
        reads.append(sum(min(pending, cap) for pending in backlogs.values()))
        return {organization: min(pending, cap) for organization, pending in backlogs.items()}
    exact = max_min_refused(limit, backlogs)
    assert over_share(limit, count, passes=len(backlogs) + 1) == exact
    assert all(read <= limit + len(backlogs) for read in reads[1:])  # each pass is bounded
    if sum(backlogs.values()) > limit:  # the only case the service asks
        bounded = over_share(limit, count)
        assert exact <= bounded
        assert all(backlogs[organization] > limit / len(backlogs) for organization in bounded)


def test_the_backlog_sample_counts_each_organization_up_to_a_cap(app, org, customer_id):
    other = make_organization(app, "Other")
    client = app.test_client()
    post_batch(client, org["ingestKey"], [interaction(customer_id) for _ in range(7)])
    post_interaction(client, other["ingestKey"], make_customer(app, other))
    with app.app_context():
        assert pending_by_organization(5) == {org["organizationId"]: 5, other["organizationId"]: 1}
        assert pending_by_organization(100) == {org["organizationId"]: 7, other["organizationId"]: 1}


# Budgets in events ---------------------------------------------------------------------

def test_rate_limit_syntax():
    requests_budget, events_budget = parse_rate("200/s burst 1000; 5000 events/s burst 20000")
    assert (requests_budget.kind, requests_budget.item.amount, requests_budget.item.get_expiry()) == (
        REQUESTS, 1000, 5)
    assert (events_budget.kind, events_budget.item.amount, events_budget.item.get_expiry()) == (EVENTS, 20000, 4)
    assert [b.spec for b in parse_rate("600/min, 1000 events/day")] == ["600/min", "1000 events/day"]
    for wrong in ("", "200", "0/s", "5 apples/s", "200/s burst 0", "200/s;", "200/week"):
        with pytest.raises(ValueError, match="5000 events/s burst 20000"):
            parse_rate(wrong)


def test_an_events_budget_refuses_a_batch_that_does_not_fit_whole(make_app, org, customer_id):
    app = make_app({"TESTING": True, "RATE_LIMIT": "100/s; 20 events/min"})
    client = app.test_client()

    def batch(n):
        return post_batch(client, org["ingestKey"], [interaction(customer_id) for _ in range(n)])
    assert batch(15).get_json()["successful"] == 15
    refused = assert_error(batch(10), 429, "rate_limited")
    assert refused["details"]["limit"] == "20 events/min"
    assert stored_count(app) == 15
    assert post_interaction(client, org["ingestKey"], customer_id).status_code == 201
    segment = client.post("/v1/batch", auth=(org["ingestKey"], ""), json={
        "batch": [{"type": "track", "userId": "u", "event": "Clicked"}] * 5})
    assert_error(segment, 429, "rate_limited")
    never = assert_error(batch(21), 400, "validation_error")
    assert "20 events/min" in never["details"]["interactions"][0]
    assert batch(4).status_code == 200
    assert stored_count(app) == 20


@pytest.mark.redis
def test_leased_events_budgets_are_never_exceeded():
    """Two processes' limiters charge batches of 1-60 events against one budget of
    5,000 a minute in Redis, leasing 50 at a time: together they never let more
    through, and lose at most what a lease and a refused batch leave."""
    processes = [RateLimit("5000 events/min", require_redis()) for _ in range(2)]
    key, spent, rng = uuid.uuid4().hex, 0, random.Random(1)
    for n in range(400):
        cost = rng.randint(1, 60)
        spent += cost * (processes[n % 2].retry_after(key, EVENTS, cost) is None)
    assert 5000 - 2 * 50 - 60 <= spent <= 5000


# ?dryRun where it is not supported ------------------------------------------------------

def test_dry_run_is_refused_where_it_is_not_supported(app, client, org, customer_id):
    ingest_key, read_key = bearer(org["ingestKey"]), bearer(org["readKey"])
    refused = [
        client.post("/api/customers?dryRun=true", json={"externalId": "new"}, headers=ingest_key),
        client.delete("/api/customers/%s?dryRun=true" % customer_id, headers=ingest_key),
        client.get("/api/customers/%s?dryRun=true" % customer_id, headers=read_key),
        client.get("/api/customers?externalId=c-1&dryRun=false", headers=read_key),
        client.get("/api/interactions?dryRun=true", headers=read_key),
    ]
    for response in refused:
        assert "dryRun" in assert_error(response, 400, "validation_error")["details"]
    with app.app_context():
        assert [c.external_id for c in Customer.select()] == ["c-1"]
    assert client.post(INGEST_PATH + "?dryRun=true", json=interaction(customer_id),
                       headers=ingest_key).get_json()["dryRun"] is True
    assert client.post("/v1/identify?dryRun=true", auth=(org["ingestKey"], ""),
                       json={"userId": "u-2", "traits": {}}).status_code == 200
    assert stored_count(app) == 0


# Unknown keys -----------------------------------------------------------------------------

def test_the_key_cache_evicts_the_least_recently_used_and_keeps_keys_in_use(app, org):
    """A key in use stays cached (it still works after being revoked: it was never
    looked up again) while 1,000 unknown keys pass through a cache of 100."""
    cache, live = KeyCache(size=100), hash_key(org["ingestKey"])
    unknown = [uuid.uuid4().hex for _ in range(1000)]
    with app.app_context():
        assert cache.principal(live) is not None
        revoke_key(org["ingestKey"])
        for n, key_hash in enumerate(unknown):
            assert cache.principal(key_hash) is None
            if n % 50 == 0:
                assert cache.principal(live) is not None
        assert cache.cached(unknown[0]) is None and cache.cached(unknown[-1]) is not None
        assert cache.principal(live) is not None


def test_a_flood_of_bad_keys_from_one_address_is_refused_without_lookups(make_app, app, org, customer_id):
    """After 5 failures in a minute, the address's unknown keys are answered 429, and
    so is a live key not yet cached (no lookup is made for it), while a cached live
    key goes on working and another address is not concerned."""
    fresh = make_organization(app, "Fresh")
    fresh_customer = make_customer(app, fresh)
    app = make_app({"TESTING": True, "AUTH_FAILURE_LIMIT": "5/min"})
    client = app.test_client()

    def post_from(address, key, customer):
        return client.post(INGEST_PATH, json=interaction(customer), headers=bearer(key),
                           environ_overrides={"REMOTE_ADDR": address})
    assert post_from("192.0.2.1", org["ingestKey"], customer_id).status_code == 201  # now cached
    answers = [post_from("192.0.2.1", "ik_%d" % n, customer_id) for n in range(8)]
    assert [a.status_code for a in answers] == [401] * 5 + [429] * 3
    assert_error(answers[-1], 429, "auth_rate_limited")
    assert post_from("192.0.2.1", org["ingestKey"], customer_id).status_code == 201
    assert_error(post_from("192.0.2.1", fresh["ingestKey"], fresh_customer), 429, "auth_rate_limited")
    assert post_from("192.0.2.2", "ik_x", customer_id).status_code == 401
    assert post_from("192.0.2.2", fresh["ingestKey"], fresh_customer).status_code == 201


@pytest.mark.processes
@pytest.mark.redis
def test_failed_authentications_are_limited_per_client_behind_nginx(app, tmp_path, org, customer_id):
    """TRUSTED_PROXIES=1: the address is the one nginx saw (X-Forwarded-For), so one
    client's flood of bad keys does not refuse another's."""
    flooder, bystander = ["127.%d.%d.%d" % tuple(random.randint(1, 254) for _ in range(3)) for _ in range(2)]

    def post_from(address, key):
        connection = http.client.HTTPConnection("127.0.0.1", port, source_address=(address, 0), timeout=10)
        connection.request("POST", INGEST_PATH, json.dumps(interaction(customer_id)),
                           {**bearer(key), "Content-Type": "application/json"})
        return connection.getresponse().status
    with production_stack(tmp_path, env={"AUTH_FAILURE_LIMIT": "5/min", "TRUSTED_PROXIES": "1"}) as web:
        port = web.proxy.port
        assert [post_from(flooder, "ik_%d" % n) for n in range(8)] == [401] * 5 + [429] * 3
        assert post_from(bystander, "ik_other") == 401
        assert post_from(bystander, org["ingestKey"]) == 201
