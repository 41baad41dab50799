"""Small builders and requests shared by the tests (and the benchmarks)."""
import contextlib
import datetime
import gzip
import io
import json
import logging

import requests

from ingest.logs import JsonFormatter

UTC = datetime.timezone.utc

INGEST_PATH = "/api/data/ingest"
BATCH_PATH = "/api/data/ingest/batch"


def iso(dt):
    return dt.isoformat()


def hours_ago(hours):
    return datetime.datetime.now(UTC) - datetime.timedelta(hours=hours)


def interaction(customer_id, **fields):
    """A valid interaction payload; ``fields`` override or add (None removes)."""
    payload = {"customerId": customer_id, "timestamp": iso(hours_ago(1)),
               "channel": "chat", "eventType": "message", "content": "Hello there"}
    payload.update(fields)
    return {k: v for k, v in payload.items() if v is not None}


def bearer(key):
    return {"Authorization": "Bearer " + key}


def gzipped(document):
    return gzip.compress(json.dumps(document).encode())


# Requests: ``target`` is a Flask test client, or the base URL of a running server
# (its ``url``), sent to with ``session`` (requests itself, or a requests.Session).

def post_json(target, path, key, document, session=requests):
    """POST ``document`` as JSON to ``path`` with ``key`` as the bearer token; the response."""
    if isinstance(target, str):
        return session.post(target + path, json=document, headers=bearer(key))
    return target.post(path, json=document, headers=bearer(key))


def post_interaction(target, key, customer_id, session=requests, **fields):
    """POST ``interaction(customer_id, **fields)`` to the ingest endpoint; the response."""
    return post_json(target, INGEST_PATH, key, interaction(customer_id, **fields), session)


def post_batch(target, key, items, session=requests):
    """POST a batch of ``items`` to the batch ingest endpoint; the response."""
    return post_json(target, BATCH_PATH, key, {"interactions": items}, session)


def stored_over_http(url, key, customer_id, session=requests, **fields):
    """Store one interaction through the server at ``url``: its id (the answer must be a 201)."""
    response = post_interaction(url, key, customer_id, session, **fields)
    assert response.status_code == 201, response.text
    return response.json()["id"]


# The database, in the app's context.

def make_organization(app, name):
    """A new organization: its id, an ingest key and a read key."""
    from ingest.accounts import new_organization
    with app.app_context():
        return new_organization(name)


def make_customer(app, org, external_id=None):
    """The id of a new customer of ``org`` (as make_organization returns it)."""
    from models import Customer
    with app.app_context():
        return str(Customer.create(organization=org["organizationId"], external_id=external_id).id)


def stored_count(app):
    """How many interactions the database holds."""
    from models import Interaction
    with app.app_context():
        return Interaction.select().count()


@contextlib.contextmanager
def started_app(config):
    """An app built with ``config`` whose runtime runs for the block."""
    from app import create_app
    from ingest import runtime

    app = create_app(config)
    process = runtime.of(app)
    process.start()
    try:
        yield app
    finally:
        process.stop()


@contextlib.contextmanager
def json_log(name=None):
    """What logger ``name`` (the root by default) logs at INFO and above meanwhile, as
    the service's JSON log lines: yields a function that returns them, parsed."""
    stream, logger = io.StringIO(), logging.getLogger(name)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
