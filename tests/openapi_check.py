"""Checks responses against the OpenAPI document the service publishes."""
import re

from openapi_schema_validator import OAS30Validator

from ingest.openapi import spec_dict
from ingest.schemas import LIVE_MESSAGES


def _operations():
    spec = spec_dict()
    table = []
    for path, operations in spec["paths"].items():
        pattern = re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "$")
        for method, operation in operations.items():
            table.append((pattern, method, operation))
    return spec, table


def check_response(method, path, status, body):
    """Raise if a JSON response is not what the spec documents for it."""
    spec, table = _operations()
    for pattern, op_method, operation in table:
        if op_method == method.lower() and pattern.match(path):
            documented = operation["responses"].get(str(status))
            assert documented is not None, "%s %s answered %s, not in the spec" % (method, path, status)
            schema = {**documented["content"]["application/json"]["schema"],
                      "components": spec["components"]}
            OAS30Validator(schema).validate(body)
            if path == "/api/changes" and status == 200:  # the items are the socket's changes
                for item in body["items"]:
                    check_live_message(item)
            return True
    return False  # not an API path (the page, static files)


def check_live_message(message):
    """Raise if a message of the feed's socket is not what the spec publishes for its type;
    returns it."""
    assert message.get("type") in LIVE_MESSAGES, "unpublished live message %r" % message
    spec = spec_dict()
    schema = {"$ref": "#/components/schemas/" + LIVE_MESSAGES[message["type"]].__name__,
              "components": spec["components"]}
    OAS30Validator(schema).validate(message)
    return message
