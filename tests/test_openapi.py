"""GET /api/openapi.json (DESIGN §5): a valid OpenAPI 3 document covering every
endpoint, and schemathesis against a live gunicorn finding no 5xx and no
response outside the spec. (Every response of the Flask-client tests is also
checked against the spec, by the `client` fixture.)"""
import os
import subprocess

import pytest
from openapi_spec_validator import validate

from ingest.accounts import create_key
from tests.servers import BIN, ROOT, Gunicorn

EXAMPLES = os.environ.get("SCHEMATHESIS_EXAMPLES", "25")


def test_spec_is_valid_openapi_3_and_covers_every_endpoint(app, client):
    spec = client.get("/api/openapi.json").get_json()
    validate(spec)
    assert spec["openapi"].startswith("3.")
    documented = {path.replace("{customer_id}", "<customer_id>")
                  .replace("{interaction_id}", "<interaction_id>") for path in spec["paths"]}
    routes = {rule.rule for rule in app.url_map.iter_rules()
              if rule.rule.startswith(("/api/", "/v1/", "/healthz", "/readyz", "/metrics"))
              and rule.rule not in ("/api/openapi.json", "/api/feed/ws")}
    routes = {r for r in routes if "<any(" not in r} | {"/v1/track", "/v1/identify", "/v1/page"}
    assert routes <= documented
    assert set(spec["components"]["securitySchemes"]) == {"bearer", "basic"}
    ingest = spec["paths"]["/api/data/ingest"]["post"]
    assert {"201", "200", "400", "401", "403", "404", "413", "415", "429", "503"} <= set(
        ingest["responses"])


@pytest.mark.processes
def test_schemathesis_finds_no_server_error_and_nothing_outside_the_spec(app, org, customer_id,
                                                                           tmp_path):
    with app.app_context():
        key, _ = create_key(org["organizationId"], ["ingest", "read"])
    web = Gunicorn(tmp_path / "web.log", workers=2)
    try:
        result = subprocess.run(
            [os.path.join(BIN, "schemathesis"), "run", web.url + "/api/openapi.json",
             "--header", "Authorization: Bearer " + key,
             "--checks", "not_a_server_error,status_code_conformance,"
                         "content_type_conformance,response_schema_conformance",
             "--max-examples", EXAMPLES, "--seed", os.environ.get("SCHEMATHESIS_SEED", "1"), "--request-timeout", "10"],
            cwd=ROOT, capture_output=True, text=True, timeout=600)
    finally:
        web.stop()
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
