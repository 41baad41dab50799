"""Data lifecycle (DESIGN §15): erasure of a customer, retention of old
interactions, each under concurrent ingest with the §4 invariant holding at
every moment (retention interleaved with ingest sequences: test_properties.py);
dry runs (§5) that answer what the real call does and store nothing."""
import datetime
import threading

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest import analysis, lifecycle
from ingest.accounts import new_organization
from ingest.domain import ServiceError
from ingest.service import IngestService
from models import Customer, Interaction, utcnow
from tests import dbs
from tests.helpers import bearer, hours_ago, interaction, iso

UTC = datetime.timezone.utc


def days_ago(days):
    return iso(datetime.datetime.now(UTC) - datetime.timedelta(days=days))


def ingest_all(client, key, items):
    for item in items:
        assert client.post("/api/data/ingest", json=item, headers=bearer(key)).status_code == 201


def test_erasure_removes_the_customer_and_every_interaction_of_it(app, client, org, customer_id):
    with app.app_context():
        other = str(Customer.create(organization=org["organizationId"], external_id="c-2").id)
    ingest_all(client, org["ingestKey"], [interaction(customer_id) for _ in range(3)] + [interaction(other)])
    stranger = new_organization_keys(app)
    assert client.delete("/api/customers/" + customer_id, headers=bearer(stranger)).status_code == 404

    response = client.delete("/api/customers/" + customer_id, headers=bearer(org["ingestKey"]))
    assert response.status_code == 204 and response.data == b""
    read = bearer(org["readKey"])
    assert client.get("/api/customers/" + customer_id, headers=read).status_code == 404
    assert client.get("/api/interactions?customerId=" + customer_id, headers=read).get_json()["items"] == []
    assert client.delete("/api/customers/" + customer_id, headers=bearer(org["ingestKey"])).status_code == 404
    assert client.get("/api/customers/" + other, headers=read).get_json()["interactionCount"] == 1
    with app.app_context():
        assert Interaction.select().count() == 1
    assert client.post("/api/data/ingest", json=interaction(customer_id),
                       headers=bearer(org["ingestKey"])).status_code == 404
    assert client.delete("/api/customers/not-an-id", headers=bearer(org["ingestKey"])).status_code == 404
    assert client.delete("/api/customers/" + other, headers=read).status_code == 403


def new_organization_keys(app):
    with app.app_context():
        return new_organization("Stranger")["ingestKey"]


def test_a_queued_analysis_of_an_erased_interaction_is_a_no_op(app, service, org, customer_id):
    with app.app_context():
        interaction_id, _ = service.ingest_one(org["organizationId"], interaction(customer_id, content="Great!"))
        service.erase_customer(org["organizationId"], customer_id)
        assert analysis.score_and_store([interaction_id]) == []
        assert not Interaction.select().where(Interaction.id == interaction_id).exists()


def test_another_process_that_knew_the_customer_answers_404_not_503(running, app, org, customer_id):
    """A web process caches the customers it has seen; after another process
    erased one, its next ingest for that customer is a plain 404."""
    this, other = (running(IngestService(lambda *a: None, lambda *a: None)) for _ in range(2))
    with app.app_context():
        other.ingest_one(org["organizationId"], interaction(customer_id))  # now known to `other`
        this.erase_customer(org["organizationId"], customer_id)
        try:
            other.ingest_one(org["organizationId"], interaction(customer_id))
            raise AssertionError("stored for an erased customer")
        except ServiceError as error:
            assert error.code == "customer_not_found"
        assert Interaction.select().count() == 0


def segment_batch(client, org, events, sent_at=None):
    body = {"batch": events, **({"sentAt": sent_at} if sent_at else {})}
    return client.post("/v1/batch", json=body, auth=(org["ingestKey"], "")).get_json()


def test_a_late_retry_of_an_older_segment_batch_does_not_bring_an_erased_customer_back(app, client, org):
    older = [{"type": "identify", "userId": "u-9", "traits": {"name": "Nine"}, "timestamp": iso(hours_ago(1)),
              "messageId": "id-1"},
             {"type": "track", "userId": "u-9", "event": "Clicked", "timestamp": iso(hours_ago(1)),
              "messageId": "tr-1"}]
    assert segment_batch(client, org, older) == {"success": True}
    with app.app_context():
        erased = str(Customer.get(Customer.external_id == "u-9").id)
    assert client.delete("/api/customers/" + erased, headers=bearer(org["ingestKey"])).status_code == 204

    replay = segment_batch(client, org, older)
    assert [(p["index"], p["error"]) for p in replay["errors"]] == [(0, "customer_erased"), (1, "customer_erased")]
    with app.app_context():
        assert not Customer.select().where(Customer.external_id == "u-9").exists()

    newer = [{"type": "track", "userId": "u-9", "event": "Came back", "messageId": "tr-2",
              "timestamp": iso(datetime.datetime.now(UTC) + datetime.timedelta(seconds=1))}]
    assert segment_batch(client, org, newer) == {"success": True}
    with app.app_context():
        back = Customer.get(Customer.external_id == "u-9")
        assert str(back.id) != erased and back.interaction_count == 1


def test_erasure_during_ingest_leaves_no_interaction_of_the_customer(running, app, org, customer_id):
    """8 threads ingest for a customer while it is erased: every answer is a 201
    before or a 404 after, and nothing of it remains."""
    service = running(IngestService(lambda *a: None, lambda *a: None))
    answers, started = [], threading.Event()

    def writer():
        with app.app_context():
            for _ in range(40):
                try:
                    service.ingest_one(org["organizationId"], interaction(customer_id))
                    answers.append(201)
                except ServiceError as error:
                    answers.append(error.code)
                started.set()
    threads = [threading.Thread(target=writer) for _ in range(8)]
    for thread in threads:
        thread.start()
    started.wait(10)
    with app.app_context():
        service.erase_customer(org["organizationId"], customer_id)
    for thread in threads:
        thread.join()
    assert set(answers) <= {201, "customer_not_found"} and 201 in answers
    with app.app_context():
        assert Interaction.select().count() == 0


def test_retention_deletes_what_is_old_and_corrects_the_counters(app, client, runner, org, customer_id):
    with app.app_context():
        old_only = str(Customer.create(organization=org["organizationId"], external_id="old").id)
        other_org = new_organization("Other")
        elsewhere = str(Customer.create(organization=other_org["organizationId"]).id)
    ingest_all(client, org["ingestKey"], [interaction(customer_id, timestamp=days_ago(d)) for d in (40, 20, 5)]
               + [interaction(old_only, timestamp=days_ago(d)) for d in (50, 45)])
    ingest_all(client, other_org["ingestKey"], [interaction(elsewhere, timestamp=days_ago(60))])

    dry = runner.invoke(args=["retention", "apply", "--days", "30", "--dry-run"])
    assert "would delete 4 interaction(s)" in dry.output
    only_ours = runner.invoke(args=["retention", "apply", "--days", "30", "--org", org["organizationId"]])
    assert "deleted 3 interaction(s)" in only_ours.output, only_ours.output
    read = bearer(org["readKey"])
    kept = client.get("/api/customers/" + customer_id, headers=read).get_json()
    assert kept["interactionCount"] == 2 and kept["lastSeenAt"][:10] == days_ago(5)[:10]
    emptied = client.get("/api/customers/" + old_only, headers=read).get_json()
    assert (emptied["interactionCount"], emptied["lastSeenAt"]) == (0, None)
    assert "deleted 1 interaction(s)" in runner.invoke(args=["retention", "apply", "--days", "30"]).output
    with app.app_context():
        assert dbs.invariant_violations() == []


def test_retention_during_ingest_keeps_the_invariant_at_every_moment(running, app, org, customer_id):
    """Writers ingest old and new events for 3 customers while retention deletes
    in chunks of 7; a checker reads the invariant (one snapshot) all along."""
    with app.app_context():
        customers = [customer_id] + [str(Customer.create(organization=org["organizationId"]).id)
                                     for _ in range(2)]
    service = running(IngestService(lambda *a: None, lambda *a: None))
    done, violations = threading.Event(), []

    def writer(n):
        with app.app_context():
            for i in range(60):
                service.ingest_one(org["organizationId"], interaction(
                    customers[(n + i) % 3], timestamp=days_ago(40 if i % 2 else 1)))

    def checker():
        while not done.is_set():
            violations.extend(dbs.invariant_violations())

    writers = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    watch = threading.Thread(target=checker)
    for thread in writers + [watch]:
        thread.start()
    with app.app_context():
        cutoff = utcnow() - datetime.timedelta(days=30)
        deleted = 0
        while any(thread.is_alive() for thread in writers):
            deleted += lifecycle.apply_retention(cutoff, chunk=7).deleted
        for thread in writers:
            thread.join()
        deleted += lifecycle.apply_retention(cutoff, chunk=7).deleted
    done.set()
    watch.join()
    assert violations == []
    with app.app_context():
        assert deleted == 120 and Interaction.select().count() == 120
        assert sum(c.interaction_count for c in Customer.select()) == 120


# Dry runs (DESIGN §5) ---------------------------------------------------------

def interactions(customer_id):
    """Interaction payloads as a client could send them: mostly valid, each field
    sometimes wrong; messageIds repeat, so some are duplicates."""
    return st.fixed_dictionaries({
        "customerId": st.sampled_from([customer_id] * 4 + ["1c9d2a43-0f0e-4d8a-9b52-3c6fd0f4a001",
                                                           "not-a-uuid", 5]),
        "timestamp": st.sampled_from([days_ago(1)] * 4 + [days_ago(-2), "2026-01-01T00:00:00", "soon"]),
        "channel": st.sampled_from(["web", "chat", "web", "fax", 3]),
        "eventType": st.sampled_from(["view", "click"]) | st.text(max_size=110),
    }, optional={
        "content": st.none() | st.text(max_size=40) | st.just("x" * 10_001),
        "metadata": st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3),
        "messageId": st.sampled_from(["m-1", "m-2", "m-3", "", "x" * 129]),
    })


def verdict(response):
    """What a call decided, whatever a dry run leaves out (ids, 201 vs 200)."""
    body = response.get_json()
    if response.status_code >= 400:
        return response.status_code, body
    if "interactions" in body or "total" in body:
        return {key: value for key, value in body.items() if key not in ("ids", "dryRun")}
    return body.get("duplicate")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_dry_run_answers_what_the_real_call_then_does_and_stores_nothing(app, client, org, customer_id,
                                                                          data):
    key = bearer(org["ingestKey"])
    single = data.draw(interactions(customer_id))
    batch = {"interactions": data.draw(st.lists(interactions(customer_id), min_size=1, max_size=5))}
    for path, body in (("/api/data/ingest", single), ("/api/data/ingest/batch", batch)):
        with app.app_context():
            before = Interaction.select().count(), [c.interaction_count for c in Customer.select()]
        dry = client.post(path + "?dryRun=true", json=body, headers=key)
        with app.app_context():
            assert (Interaction.select().count(), [c.interaction_count for c in Customer.select()]) == before
        real = client.post(path, json=body, headers=key)
        assert verdict(dry) == verdict(real), (path, body)
        if dry.status_code < 400:
            assert dry.get_json()["dryRun"] is True and not any(dry.get_json().get("ids") or [])


def test_a_segment_dry_run_reports_the_same_problems_and_creates_no_one(app, client, org):
    batch = {"batch": [{"type": "track", "userId": "new-user", "event": "Clicked"},
                       {"type": "track", "userId": "new-user", "event": "x" * 101},
                       {"type": "identify", "userId": "other-user", "traits": {"plan": "pro"}}]}
    dry = client.post("/v1/batch?dryRun=true", json=batch, auth=(org["ingestKey"], "")).get_json()
    with app.app_context():
        assert Customer.select().count() == 0 and Interaction.select().count() == 0
    real = client.post("/v1/batch", json=batch, auth=(org["ingestKey"], "")).get_json()
    assert dry == {**real, "dryRun": True} and [p["index"] for p in real["errors"]] == [1]


def test_dry_run_must_be_true_or_false(client, org, customer_id):
    response = client.post("/api/data/ingest?dryRun=maybe", json=interaction(customer_id),
                           headers=bearer(org["ingestKey"]))
    assert response.status_code == 400 and "dryRun" in response.get_json()["details"]
