"""Small builders shared by the tests."""
import datetime
import gzip
import json

UTC = datetime.timezone.utc


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
