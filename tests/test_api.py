"""Every endpoint, status code and error case of DESIGN §5, through the Flask test client."""
import base64
import datetime
import gzip
import json
import uuid

import pytest

from app import create_app
from ingest import runtime
from ingest.accounts import revoke_key
from tests.helpers import (
    INGEST_PATH,
    bearer,
    gzipped,
    hours_ago,
    interaction,
    iso,
    make_customer,
    make_organization,
    post_batch,
    post_interaction,
    post_json,
    stored_count,
)


def get_customer(client, org, customer_id):
    return client.get("/api/customers/" + customer_id, headers=bearer(org["readKey"])).get_json()


def assert_error(response, status, code):
    body = response.get_json()
    assert response.status_code == status, body
    assert set(body) == {"error", "message", "details"}
    assert body["error"] == code
    return body


# Auth --------------------------------------------------------------------------

def test_missing_or_invalid_key_is_401(client, customer_id):
    response = client.post("/api/data/ingest", json=interaction(customer_id))
    assert_error(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert_error(post_interaction(client, "ik_nope", customer_id), 401, "unauthorized")


def test_basic_auth_with_key_as_user_name(client, org, customer_id):
    token = base64.b64encode((org["ingestKey"] + ":").encode()).decode()
    response = client.post("/api/data/ingest", json=interaction(customer_id),
                           headers={"Authorization": "Basic " + token})
    assert response.status_code == 201


def test_revoked_key_is_401(app, client, org, customer_id):
    with app.app_context():
        assert revoke_key(org["ingestKey"]) == 1
    assert_error(post_interaction(client, org["ingestKey"], customer_id), 401, "unauthorized")


def test_key_without_scope_is_403(client, org, customer_id):
    assert_error(post_interaction(client, org["readKey"], customer_id), 403, "forbidden")
    response = client.get("/api/customers/" + customer_id, headers=bearer(org["ingestKey"]))
    assert_error(response, 403, "forbidden")


def test_other_organizations_data_is_indistinguishable_from_missing(app, client, org, customer_id):
    other = make_organization(app, "Other")
    unknown = str(uuid.uuid4())
    for target in (customer_id, unknown):
        response = client.get("/api/customers/" + target, headers=bearer(other["readKey"]))
        assert_error(response, 404, "customer_not_found")
        body = assert_error(post_interaction(client, other["ingestKey"], target),
                            404, "customer_not_found")
        assert body["details"] == {"customerId": [target]}
    interaction_id = post_interaction(client, org["ingestKey"], customer_id).get_json()["id"]
    response = client.get("/api/interactions/" + interaction_id, headers=bearer(other["readKey"]))
    assert_error(response, 404, "interaction_not_found")
    assert get_customer(client, org, customer_id)["interactionCount"] == 1


# Customers -----------------------------------------------------------------------

def test_create_customer_then_same_external_id_returns_it(client, org):
    payload = {"externalId": "u-42", "name": "Ada", "email": "ada@example.com",
               "traits": {"plan": "pro", "seats": 3}}
    first = client.post("/api/customers", json=payload, headers=bearer(org["ingestKey"]))
    assert first.status_code == 201
    body = first.get_json()
    assert body["externalId"] == "u-42" and body["traits"] == {"plan": "pro", "seats": 3}
    assert body["interactionCount"] == 0 and body["lastSeenAt"] is None
    again = client.post("/api/customers", json={"externalId": "u-42"},
                        headers=bearer(org["ingestKey"]))
    assert again.status_code == 200 and again.get_json()["id"] == body["id"]

    found = client.get("/api/customers?externalId=u-42", headers=bearer(org["readKey"]))
    assert [c["id"] for c in found.get_json()["items"]] == [body["id"]]
    none = client.get("/api/customers?externalId=nobody", headers=bearer(org["readKey"]))
    assert none.get_json() == {"items": []}


def test_customer_without_external_id_is_always_new(client, org):
    ids = {client.post("/api/customers", json={}, headers=bearer(org["ingestKey"])).get_json()["id"]
           for _ in range(2)}
    assert len(ids) == 2


@pytest.mark.parametrize("payload, field", [
    ({"externalId": ""}, "externalId"),
    ({"email": "not-an-email"}, "email"),
    ({"traits": [1, 2]}, "traits"),
    ({"nickname": "x"}, "nickname"),
    ({"name": "a\x00b"}, "name"),
])
def test_invalid_customer_is_400_with_field(client, org, payload, field):
    response = client.post("/api/customers", json=payload, headers=bearer(org["ingestKey"]))
    assert field in assert_error(response, 400, "validation_error")["details"]


def test_customer_text_postgres_cannot_store_is_400(app, client, org):
    raw = '{"email": "a@\\ud800.com", "traits": {"big": 1e400}}'
    response = post_raw(client, org["ingestKey"], raw, path="/api/customers")
    assert_error(response, 400, "invalid_json")
    response = post_raw(client, org["ingestKey"], '{"email": "a@\\ud800.com"}', path="/api/customers")
    assert "email" in assert_error(response, 400, "validation_error")["details"]


def test_customer_lookup_needs_external_id_and_valid_id(client, org):
    response = client.get("/api/customers", headers=bearer(org["readKey"]))
    assert "externalId" in assert_error(response, 400, "validation_error")["details"]
    response = client.get("/api/customers/not-a-uuid", headers=bearer(org["readKey"]))
    assert_error(response, 404, "customer_not_found")


# Single ingest ----------------------------------------------------------------

def test_ingest_stores_and_counts(client, org, customer_id):
    stamp = hours_ago(2)
    response = post_interaction(client, org["ingestKey"], customer_id, timestamp=iso(stamp),
                                metadata={"page": "/pricing"})
    assert response.status_code == 201
    body = response.get_json()
    assert body["duplicate"] is False
    customer = get_customer(client, org, customer_id)
    assert customer["interactionCount"] == 1
    assert datetime.datetime.fromisoformat(customer["lastSeenAt"]) == stamp

    stored = client.get("/api/interactions/" + body["id"], headers=bearer(org["readKey"])).get_json()
    assert stored["customerId"] == customer_id
    assert stored["metadata"] == {"page": "/pricing"}
    assert stored["analysisStatus"] == "pending"
    assert datetime.datetime.fromisoformat(stored["timestamp"]) == stamp


def test_timestamp_offsets_are_stored_in_utc(client, org, customer_id):
    response = post_interaction(client, org["ingestKey"], customer_id, timestamp="2024-03-01T12:00:00+05:30")
    stored = client.get("/api/interactions/" + response.get_json()["id"],
                        headers=bearer(org["readKey"])).get_json()
    assert stored["timestamp"] == "2024-03-01T06:30:00+00:00"


def test_same_message_id_is_a_duplicate_not_stored_twice(app, client, org, customer_id):
    payload = interaction(customer_id, messageId="msg-1")
    first = post_json(client, INGEST_PATH, org["ingestKey"], payload)
    second = post_json(client, INGEST_PATH, org["ingestKey"], payload)
    assert first.status_code == 201
    assert second.status_code == 200
    assert second.get_json() == {"id": first.get_json()["id"], "duplicate": True}
    assert get_customer(client, org, customer_id)["interactionCount"] == 1
    assert stored_count(app) == 1


def test_message_ids_are_unique_per_organization_only(app, client, org, customer_id):
    other = make_organization(app, "Other")
    other_customer = make_customer(app, other)
    assert post_interaction(client, org["ingestKey"], customer_id, messageId="m").status_code == 201
    assert post_interaction(client, other["ingestKey"], other_customer, messageId="m").status_code == 201


def test_older_event_never_moves_last_seen_back(client, org, customer_id):
    newer, older = hours_ago(1), hours_ago(5)
    post_interaction(client, org["ingestKey"], customer_id, timestamp=iso(newer))
    post_interaction(client, org["ingestKey"], customer_id, timestamp=iso(older))
    customer = get_customer(client, org, customer_id)
    assert customer["interactionCount"] == 2
    assert datetime.datetime.fromisoformat(customer["lastSeenAt"]) == newer


def _future(hours):
    return iso(datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=hours))


INVALID_INTERACTIONS = [
    ({"customerId": "nope"}, "customerId"),
    ({"customerId": None}, "customerId"),
    ({"timestamp": "2024-01-01T00:00:00"}, "timestamp"),
    ({"timestamp": "yesterday"}, "timestamp"),
    ({"timestamp": "0001-01-01T00:00:00+05:00"}, "timestamp"),
    ({"timestamp": _future(25)}, "timestamp"),
    ({"timestamp": None}, "timestamp"),
    ({"channel": "fax"}, "channel"),
    ({"channel": None}, "channel"),
    ({"eventType": ""}, "eventType"),
    ({"eventType": "x" * 101}, "eventType"),
    ({"eventType": "tab\there"}, "eventType"),
    ({"eventType": 7}, "eventType"),
    ({"content": "x" * 10_001}, "content"),
    ({"content": "nul\x00byte"}, "content"),
    ({"metadata": [1, 2]}, "metadata"),
    ({"metadata": {"k": "v" * 17_000}}, "metadata"),
    ({"metadata": {"bad\x00key": 1}}, "metadata"),
    ({"metadata": {"nested": ["nul\x00"]}}, "metadata"),
    ({"messageId": ""}, "messageId"),
    ({"messageId": "m" * 129}, "messageId"),
    ({"extra": True}, "extra"),
]


@pytest.mark.parametrize("fields, field", INVALID_INTERACTIONS)
def test_invalid_interaction_is_400_naming_the_field(app, client, org, customer_id, fields, field):
    response = post_interaction(client, org["ingestKey"], customer_id, **fields)
    body = assert_error(response, 400, "validation_error")
    assert field in body["details"]
    assert stored_count(app) == 0
    assert get_customer(client, org, customer_id)["interactionCount"] == 0


def test_lone_surrogate_is_400_on_every_database(app, client, org, customer_id):
    raw = json.dumps(interaction(customer_id)).replace("Hello there", "\\ud800")
    response = client.post("/api/data/ingest", data=raw, content_type="application/json",
                           headers=bearer(org["ingestKey"]))
    assert "content" in assert_error(response, 400, "validation_error")["details"]
    assert stored_count(app) == 0


def test_timestamp_just_under_24h_ahead_is_accepted(client, org, customer_id):
    response = post_interaction(client, org["ingestKey"], customer_id, timestamp=_future(23.9))
    assert response.status_code == 201


def test_body_that_is_not_an_object_is_400(client, org):
    for document in ([1, 2], "text", 3, False):
        response = post_json(client, INGEST_PATH, org["ingestKey"], document)
        assert_error(response, 400, "validation_error")
    assert_error(post_raw(client, org["ingestKey"], b"null"), 400, "validation_error")
    assert_error(post_raw(client, org["ingestKey"], b""), 400, "invalid_json")


# Bodies ------------------------------------------------------------------------

def post_raw(client, key, data, content_type="application/json", path="/api/data/ingest", **headers):
    return client.post(path, data=data, headers={**bearer(key), "Content-Type": content_type,
                                                 **headers})


def test_malformed_json_and_non_finite_numbers_are_400(client, org, customer_id):
    assert_error(post_raw(client, org["ingestKey"], b"{not json"), 400, "invalid_json")
    assert_error(post_raw(client, org["ingestKey"], b"\xff\xfe"), 400, "invalid_json")
    for constant in ("NaN", "Infinity", "1e400", "-1e999"):
        raw = json.dumps(interaction(customer_id, metadata={"x": 1})).replace("1}", constant + "}")
        assert_error(post_raw(client, org["ingestKey"], raw), 400, "invalid_json")
    deep = "[" * 100_000 + "]" * 100_000
    assert_error(post_raw(client, org["ingestKey"], deep), 400, "invalid_json")


def test_non_json_content_type_is_415(client, org):
    response = post_raw(client, org["ingestKey"], "a=b", "application/x-www-form-urlencoded")
    assert_error(response, 415, "unsupported_media_type")


def test_gzip_body_is_accepted(client, org, customer_id):
    response = post_raw(client, org["ingestKey"], gzipped(interaction(customer_id)),
                        **{"Content-Encoding": "gzip"})
    assert response.status_code == 201


def test_bad_gzip_and_unknown_encoding(client, org, customer_id):
    response = post_raw(client, org["ingestKey"], b"not gzip", **{"Content-Encoding": "gzip"})
    assert_error(response, 400, "invalid_gzip")
    truncated = gzipped(interaction(customer_id))[:-12]
    response = post_raw(client, org["ingestKey"], truncated, **{"Content-Encoding": "gzip"})
    assert_error(response, 400, "invalid_gzip")
    response = post_raw(client, org["ingestKey"], b"{}", **{"Content-Encoding": "br"})
    assert_error(response, 415, "unsupported_media_type")


def test_body_over_max_content_length_is_413(client, org, customer_id):
    big = json.dumps(interaction(customer_id, content="x" * (1024 * 1024)))
    assert_error(post_raw(client, org["ingestKey"], big), 413, "payload_too_large")


def test_decompression_bomb_is_413_without_inflating_it(client, org):
    bomb = gzip.compress(b" " * (64 * 1024 * 1024))  # 64 MiB of spaces, ~64 KiB compressed
    assert len(bomb) < 1024 * 1024
    response = post_raw(client, org["ingestKey"], bomb, **{"Content-Encoding": "gzip"})
    assert_error(response, 413, "payload_too_large")


def test_unknown_route_and_method_use_the_error_shape(client, org):
    assert_error(client.get("/api/nothing-here"), 404, "not_found")
    assert_error(client.get("/api/data/ingest", headers=bearer(org["ingestKey"])),
                 405, "method_not_allowed")


def test_request_id_is_returned_and_propagated(client):
    assert len(client.get("/healthz").headers["X-Request-ID"]) == 32
    response = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert response.headers["X-Request-ID"] == "abc-123"


# Batch ---------------------------------------------------------------------------

def test_batch_reports_each_item(app, client, org, customer_id):
    key = org["ingestKey"]
    existing = post_interaction(client, key, customer_id, messageId="seen").get_json()["id"]
    unknown = str(uuid.uuid4())
    items = [
        interaction(customer_id, messageId="a"),        # 0 stored
        interaction(customer_id, channel="fax"),         # 1 invalid
        interaction(customer_id, messageId="a"),        # 2 duplicate of 0 (inside the batch)
        interaction(customer_id, messageId="seen"),     # 3 duplicate of the stored one
        interaction(unknown),                            # 4 unknown customer
        interaction(customer_id),                        # 5 stored
    ]
    response = post_batch(client, key, items)
    assert response.status_code == 200
    body = response.get_json()
    assert (body["total"], body["successful"], body["duplicates"], body["failed"]) == (6, 2, 2, 2)
    ids = body["ids"]
    assert ids[1] is None and ids[4] is None
    assert ids[2] == ids[0] and ids[3] == existing
    assert len({ids[0], ids[5], existing}) == 3
    assert [(e["index"], e["error"]) for e in body["errors"]] == [
        (1, "validation_error"), (4, "customer_not_found")]
    assert "channel" in body["errors"][0]["details"]
    assert get_customer(client, org, customer_id)["interactionCount"] == 3
    assert stored_count(app) == 3


def test_replaying_a_batch_stores_nothing_new(app, client, org, customer_id):
    items = [interaction(customer_id, messageId="m-%d" % i) for i in range(150)]
    first = post_batch(client, org["ingestKey"], items).get_json()
    again = post_batch(client, org["ingestKey"], items).get_json()
    assert first["successful"] == 150
    assert (again["successful"], again["duplicates"]) == (0, 150)
    assert again["ids"] == first["ids"]
    assert get_customer(client, org, customer_id)["interactionCount"] == 150


def test_large_batch_is_written_in_chunks(app, client, org, customer_id):
    stamps = [hours_ago(h / 10) for h in range(250)]
    items = [interaction(customer_id, timestamp=iso(s)) for s in stamps]
    body = post_batch(client, org["ingestKey"], items).get_json()
    assert body["successful"] == 250 and body["errors"] == []
    customer = get_customer(client, org, customer_id)
    assert customer["interactionCount"] == 250
    assert datetime.datetime.fromisoformat(customer["lastSeenAt"]) == max(stamps)


@pytest.mark.parametrize("envelope, field", [
    ({"interactions": []}, "interactions"),
    ({"interactions": {"a": 1}}, "interactions"),
    ({}, "interactions"),
    ([], "_schema"),
])
def test_invalid_batch_envelope_is_400(app, client, org, envelope, field):
    response = client.post("/api/data/ingest/batch", json=envelope, headers=bearer(org["ingestKey"]))
    assert field in assert_error(response, 400, "validation_error")["details"]


def test_batch_over_max_items_is_400(client, org, customer_id):
    items = [interaction(customer_id)] * 1001
    response = post_batch(client, org["ingestKey"], items)
    assert "interactions" in assert_error(response, 400, "validation_error")["details"]


def test_failed_chunk_is_rolled_back_whole_others_stand(app, client, org, customer_id, storage_faults):
    items = [interaction(customer_id) for _ in range(250)]
    items[130]["content"] = storage_faults.FAIL_INSERT       # poisons the second chunk
    body = post_batch(client, org["ingestKey"], items).get_json()
    assert (body["successful"], body["failed"]) == (150, 100)
    failed = [e["index"] for e in body["errors"]]
    assert failed == list(range(100, 200))
    assert {e["error"] for e in body["errors"]} == {"storage_error"}
    assert body["errors"][0]["details"] == {"retryable": True, "stored": False}
    assert all(body["ids"][i] is None for i in failed)
    assert get_customer(client, org, customer_id)["interactionCount"] == 150
    assert stored_count(app) == 150


def test_failed_single_ingest_is_503_retryable_and_stores_nothing(app, client, org, customer_id,
                                                                    storage_faults):
    response = post_interaction(client, org["ingestKey"], customer_id, content=storage_faults.FAIL_INSERT)
    assert_error(response, 503, "storage_error")
    assert response.headers["Retry-After"]
    assert stored_count(app) == 0


# Health ----------------------------------------------------------------------------

def test_health_and_readiness(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json()["checks"] == {"database": "ok", "queue": "ok"}


def test_database_down_is_503_and_health_still_answers(app, org):
    down = create_app({"DATABASE_URL": "postgresql://postgres@127.0.0.1:9/unreachable"})
    try:
        client = down.test_client()
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.get_json()["checks"]["database"].startswith("error")
        response = client.get("/api/customers/" + str(uuid.uuid4()), headers=bearer(org["readKey"]))
        assert_error(response, 503, "database_unavailable")
        assert response.headers["Retry-After"]
    finally:
        runtime.of(app).bind()  # the models use the test database again
