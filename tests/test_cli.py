"""The command line of DESIGN §10."""
import json

from ingest.auth import KEY_CACHE_SECONDS
from models import ApiKey, Customer, Organization
from tests.helpers import bearer, post_interaction
from tests.servers import wait_until


def test_init_db_is_idempotent(runner):
    result = runner.invoke(args=["init-db"])
    assert result.exit_code == 0
    assert "up to date" in result.output


def test_create_org_json_gives_working_keys(app, runner, client):
    result = runner.invoke(args=["create-org", "Acme", "--json"])
    assert result.exit_code == 0
    created = json.loads(result.output)
    assert set(created) == {"organizationId", "ingestKey", "readKey"}
    response = client.post("/api/customers", json={"externalId": "x"},
                           headers=bearer(created["ingestKey"]))
    assert response.status_code == 201
    customer = response.get_json()["id"]
    assert client.get("/api/customers/" + customer,
                      headers=bearer(created["readKey"])).status_code == 200
    with app.app_context():
        hashes = [k.key_hash for k in ApiKey.select()]
    assert created["ingestKey"] not in hashes and len(hashes) == 2


def test_create_key_and_revoke_it(runner, client, org, customer_id):
    result = runner.invoke(args=["create-key", org["organizationId"], "--scope", "ingest",
                                 "--scope", "read", "--json"])
    assert result.exit_code == 0, result.output
    created = json.loads(result.output)
    assert created["scopes"] == ["ingest", "read"]
    assert post_interaction(client, created["key"], customer_id).status_code == 201

    result = runner.invoke(args=["revoke-key", created["prefix"]])
    assert result.exit_code == 0 and "revoked 1" in result.output
    # Keys are cached: a revoked one is refused within KEY_CACHE_SECONDS.
    wait_until(lambda: client.get("/api/customers/" + customer_id,
                                  headers=bearer(created["key"])).status_code == 401,
               timeout=KEY_CACHE_SECONDS + 2, interval=0.2, message="the key to be refused")
    assert post_interaction(client, created["key"], customer_id).status_code == 401
    assert runner.invoke(args=["revoke-key", created["prefix"]]).exit_code != 0


def test_create_key_for_unknown_org_fails_cleanly(runner):
    result = runner.invoke(args=["create-key", "00000000-0000-0000-0000-000000000000",
                                 "--scope", "read"])
    assert result.exit_code != 0 and "no organization" in result.output
    assert runner.invoke(args=["create-key", "nope", "--scope", "read"]).exit_code != 0


def test_demo_prints_a_curl_line_that_works(app, runner, client):
    result = runner.invoke(args=["demo", "--json"])
    assert result.exit_code == 0
    demo = json.loads(result.output)
    assert demo["feedUrl"].endswith("/feed#key=" + demo["readKey"])
    assert "curl" in demo["curl"] and demo["ingestKey"] in demo["curl"]
    body = json.loads(demo["curl"].split("-d '")[1].rstrip("'"))
    response = client.post("/api/data/ingest", json=body, headers=bearer(demo["ingestKey"]))
    assert response.status_code == 201
    with app.app_context():
        assert Organization.select().count() == 1
        assert Customer.select().count() == 3
