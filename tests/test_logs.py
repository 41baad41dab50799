"""Logs are JSON lines carrying the ids of what happened, and never a key."""
import ast
import json
import logging
import sys

import pytest

from ingest.logs import JsonFormatter
from tests.helpers import bearer, interaction, json_log


@pytest.fixture
def log_lines():
    with json_log() as lines:
        yield lines


def test_ingest_logs_ids_and_never_the_key(client, org, customer_id, log_lines):
    response = client.post("/api/data/ingest", json=interaction(customer_id),
                           headers={**bearer(org["ingestKey"]), "X-Request-ID": "req-1"})
    interaction_id = response.get_json()["id"]
    client.post("/api/data/ingest", json=interaction(customer_id),
                headers=bearer(org["ingestKey"] + "x"))
    lines = log_lines()
    access = [line for line in lines if line["logger"] == "ingest.access"]
    assert [line["status"] for line in access] == [201, 401]
    ingested = access[0]  # one line a request, carrying what it did
    assert ingested["organization_id"] == org["organizationId"]
    assert ingested["customer_id"] == customer_id
    assert ingested["interaction_id"] == interaction_id
    assert ingested["request_id"] == "req-1"
    everything = json.dumps(lines)
    assert org["ingestKey"] not in everything and org["ingestKey"][3:] not in everything


def test_logging_a_traceback_parses_no_source(monkeypatch):
    """Python 3.11 places its ^^^ markers by parsing source with ast, which is not
    thread-safe: a background thread logging an error made Werkzeug, compiling
    URL rules on another thread, fail with "AST constructor recursion depth
    mismatch" (seen once in CI). The JSON logs leave the markers out."""
    parsed = []
    parse = ast.parse
    monkeypatch.setattr(ast, "parse", lambda source, *args, **kwargs: parsed.append(source) or parse(
        source, *args, **kwargs))
    try:
        _ = {}["missing"] + 1
    except KeyError:
        record = logging.makeLogRecord({"msg": "failed", "exc_info": sys.exc_info()})
    entry = json.loads(JsonFormatter().format(record))
    assert "_ = {}[\"missing\"] + 1" in entry["exception"] and "KeyError" in entry["exception"]
    assert parsed == []
