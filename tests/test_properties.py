"""Property tests (hypothesis) for the invariants of DESIGN §4 and §6.

Random sequences of valid, invalid, duplicate and failing ingests, single and
batch, run through the service; storage failures are injected by real
database triggers part-way through chunks. After every step, for every
customer, count and last_seen_at match its interactions, and exactly the
interactions reported stored exist. Also: what validates reads back unchanged,
and a live event carries the interaction exactly as the read API dumps it.
"""
import datetime
import json
import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from ingest import changes, schemas
from ingest.accounts import new_organization
from ingest.domain import NewInteraction, ServiceError
from ingest.lifecycle import apply_retention
from models import Customer, Interaction
from tests import dbs

BASE = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
MESSAGE_IDS = ["m%d" % i for i in range(12)]

timestamps = st.builds(lambda s, us: (BASE + datetime.timedelta(seconds=s, microseconds=us)).isoformat(),
                       st.integers(0, 10 ** 6), st.integers(0, 999_999))
item_kinds = st.sampled_from(["valid", "valid", "valid", "invalid", "fail"])


class IngestMachine(RuleBasedStateMachine):
    service = None  # set by the test

    @initialize()
    def setup(self):
        dbs.empty_tables()
        org = new_organization("Prop")
        self.org_id = org["organizationId"]
        self.customers = [str(Customer.create(organization=self.org_id, name=name).id)
                          for name in ("a", "b", dbs.FAIL_UPDATE)]
        self.stored = set()          # ids reported created
        self.by_message = {}         # messageId -> id reported for it
        self.times = {}              # id -> (timestamp, messageId) of those created

    def payload(self, data, kind):
        customer = data.draw(st.sampled_from(self.customers))
        item = {"customerId": customer, "timestamp": data.draw(timestamps),
                "channel": "web", "eventType": "view",
                "content": dbs.FAIL_INSERT if kind == "fail" else "ok"}
        message_id = data.draw(st.none() | st.sampled_from(MESSAGE_IDS))
        if message_id:
            item["messageId"] = message_id
        if kind == "invalid":
            item["channel"] = "fax"
        return item

    def record(self, item, status, interaction_id):
        """Check one reported outcome against what was reported before."""
        message_id = item.get("messageId")
        if status == "created":
            assert interaction_id not in self.stored
            assert message_id not in self.by_message
            self.stored.add(interaction_id)
            when = datetime.datetime.fromisoformat(item["timestamp"]).replace(tzinfo=None)
            self.times[interaction_id] = (when, message_id)
        elif status == "duplicate":
            assert self.by_message[message_id] == interaction_id
        if message_id and status in ("created", "duplicate"):
            self.by_message[message_id] = interaction_id

    @rule(data=st.data(), kind=item_kinds)
    def single(self, data, kind):
        item = self.payload(data, kind)
        try:
            interaction_id, duplicate = self.service.ingest_one(self.org_id, item)
        except ServiceError as error:
            assert error.code == {"invalid": "validation_error"}.get(kind, "storage_error")
            return
        # A failing item whose messageId is stored already may be answered as its duplicate:
        # nothing is inserted, so the injected insert fault never fires (PostgreSQL decides
        # on message_key first; SQLite's trigger fires before its conflict check).
        assert kind == "valid" or (duplicate and item.get("messageId") in self.by_message)
        self.record(item, "duplicate" if duplicate else "created", interaction_id)

    @rule(data=st.data(), size=st.integers(1, 230))
    def batch(self, data, size):
        kinds = data.draw(st.lists(item_kinds, min_size=size, max_size=size))
        items = [self.payload(data, kind) for kind in kinds]
        result = self.service.ingest_batch(self.org_id, {"interactions": items})
        assert result.total == result.successful + result.duplicates + result.failed == size
        errors = {e["index"]: e["error"] for e in result.errors}
        for index in range(len(items)):
            if kinds[index] == "invalid":
                assert errors[index] == "validation_error"
            elif index in errors:
                assert errors[index] == "storage_error" and result.ids[index] is None
        # Created before duplicates: a duplicate may point at an item earlier in this batch.
        firsts = {}
        for index, item in enumerate(items):
            if index not in errors:
                key = item.get("messageId")
                created = key is None or (key not in self.by_message and key not in firsts)
                if key is not None:
                    firsts.setdefault(key, result.ids[index])
                self.record(item, "created" if created else "duplicate", result.ids[index])

    @rule(offset=st.integers(0, 12 * 86400), chunk=st.integers(1, 40))
    def retention(self, offset, chunk):
        """Retention in chunks between ingests: what is older than the cutoff goes
        (its messageId may then be used again), the rest stays."""
        cutoff = (BASE + datetime.timedelta(seconds=offset)).replace(tzinfo=None)
        expired = {i for i in self.stored if self.times[i][0] < cutoff}
        assert apply_retention(cutoff, chunk=chunk).deleted == len(expired)
        self.stored -= expired
        for interaction_id in expired:
            self.by_message.pop(self.times.pop(interaction_id)[1], None)

    @invariant()
    def counters_match_interactions(self):
        if not hasattr(self, "org_id"):
            return
        assert dbs.invariant_violations() == []

    @invariant()
    def exactly_the_reported_interactions_exist(self):
        if not hasattr(self, "org_id"):
            return
        stored = {row[0] for row in Interaction.select(Interaction.id).tuples()}
        assert stored == self.stored


def test_ingest_sequences_keep_the_invariants(service, storage_faults):
    IngestMachine.service = service
    run_state_machine_as_test(IngestMachine, settings=settings(
        max_examples=25, stateful_step_count=8, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.none() | st.text(max_size=300), metadata=st.dictionaries(st.text(), json_values, max_size=5),
       event_type=st.text(min_size=1, max_size=100), timestamp=timestamps,
       message_id=st.none() | st.text(min_size=1, max_size=128))
def test_what_validates_reads_back_exactly(app, client, org, customer_id, content, metadata,
                                           event_type, timestamp, message_id):
    """DESIGN §5: every value that passes validation stores and reads back unchanged,
    and every value that cannot be stored is a 400, never a 500. The change feed
    (§16) reads it back as the socket carried it: as the read API shows it, pending."""
    body = {"customerId": customer_id, "timestamp": timestamp, "channel": "web",
            "eventType": event_type, "content": content, "metadata": metadata, "messageId": message_id}
    response = client.post("/api/data/ingest", data=json.dumps(body),
                           content_type="application/json",
                           headers={"Authorization": "Bearer " + org["ingestKey"]})
    if response.status_code == 400:
        assert set(response.get_json()["details"]) <= {"content", "metadata", "eventType", "messageId"}
        return
    assert response.status_code in (200, 201), response.get_json()  # 200: a messageId seen before
    read = {"Authorization": "Bearer " + org["readKey"]}
    stored = client.get("/api/interactions/" + response.get_json()["id"], headers=read).get_json()
    if response.status_code == 201:
        assert (stored["content"], stored["eventType"], stored["messageId"]) == (content, event_type, message_id)
        assert stored["metadata"] == metadata
        assert json.dumps(stored["metadata"]) == json.dumps(metadata)
    changes = client.get("/api/changes", query_string={"limit": 1000}, headers=read).get_json()["items"]
    assert [change["data"] for change in changes if change["data"]["id"] == stored["id"]] == [
        {**stored, "analysisStatus": "pending", "sentiment": None, "analysisError": None, "analyzedAt": None}]


naive_times = st.datetimes(min_value=datetime.datetime(1, 1, 2), max_value=datetime.datetime(9999, 12, 30))


@settings(max_examples=200, deadline=None)
@given(customer_id=st.uuids(), timestamp=naive_times, received_at=naive_times,
       channel=st.sampled_from(schemas.CHANNELS), event_type=st.text(min_size=1),
       content=st.none() | st.text(), message_id=st.none() | st.text(min_size=1),
       metadata=st.dictionaries(st.text(), json_values, max_size=5))
def test_a_live_event_carries_the_interaction_as_the_read_api_shows_it(
        customer_id, timestamp, received_at, channel, event_type, content, message_id, metadata):
    """The event's data (built directly, the fast path) is exactly the read API
    schema's dump of the same interaction."""
    item = NewInteraction(organization_id=uuid.uuid4(), customer_id=customer_id, timestamp=timestamp,
                          received_at=received_at, channel=channel, event_type=event_type,
                          content=content, message_id=message_id, metadata=metadata, position=1)
    assert changes.created_event(item)["data"] == schemas.interaction_out.dump(item)
