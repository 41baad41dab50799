"""How close single ingest can come to E at all: the service side by side with E and
with the same service stripped to its bare write path (and that path without the
write), on SQLite and on PostgreSQL + Redis, wrk at 16 connections, ``--rounds`` rounds.

The stripped service (``stripped_app``, served by gunicorn like the real one)
keeps what no ingest may skip: Flask, the key check, reading the body, the
group-committed write and its answer. It drops, for the measurement only:

- the request hooks (but for the runtime a view finds its service by, ``g.runtime``):
  request id, access line, metrics, security headers;
- marshmallow's validation (replaced by the bare conversion of the fields);
- the work after commit: no publish to the live feed, no analysis queued.

Its ratio to E bounds what any cut to those three can buy (docs/BENCHMARKS.md).
``stripped_app(store=False)`` also answers every interaction as created without
writing it: what is left beyond that is Flask, the key check and the body.

    .venv/bin/python -m bench.bound [--seconds 8] [--rounds 3] [--databases sqlite,postgres]
"""
import argparse
import datetime
import os
import uuid

from bench.common import Stack, database_arguments, servers
from bench.ingest import log, single_bodies, wrk


def stripped_app(store=True):
    """The app with the three parts above taken out (gunicorn "bench.bound:stripped_app()")."""
    from flask import g

    from app import create_app
    from ingest import runtime, service
    from ingest.domain import CREATED

    def bare_conversion(payload):
        return {"customer_id": uuid.UUID(payload["customerId"]),
                "timestamp": datetime.datetime.fromisoformat(payload["timestamp"]).replace(tzinfo=None),
                "channel": payload["channel"], "event_type": payload["eventType"],
                "content": payload.get("content"), "metadata": payload.get("metadata", {}),
                "message_id": payload.get("messageId")}

    service.validate_interaction = bare_conversion
    app = create_app()
    process = runtime.of(app)
    committer = process.service.committer
    committer.after_commit = lambda committed: None
    if not store:
        committer.write_group = lambda jobs: [[(CREATED, item.id) for item in job] for job in jobs]
    app.before_request_funcs.clear()
    app.after_request_funcs.clear()

    @app.before_request
    def find_runtime():
        g.runtime = process

    return app


VARIANTS = {"service": "app:create_app()", "stripped": "bench.bound:stripped_app()",
            "stripped, nothing stored": "bench.bound:stripped_app(store=False)"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    database_arguments(parser)
    args = parser.parse_args()
    from tests.servers import Gunicorn

    print("| database | round | E req/s | %s |\n|---|---|---|%s" % (
        " | ".join("%s / E (p99)" % name for name in VARIANTS), "---|" * len(VARIANTS)))
    for server in servers(args):
        stacks = {name: Stack(server, app=app) for name, app in VARIANTS.items()}
        service = stacks["service"]
        echo = Gunicorn(os.path.join(service.dir, "echo.log"), workers=2, app="bench.echo:app",
                        env=service.env)
        try:
            orgs = {name: stack.organization("bound", customers=100) for name, stack in stacks.items()}
            for round_ in range(1, args.rounds + 1):
                log("%s: round %d" % (service.kind, round_))
                org = orgs["service"]
                e = wrk(echo.url + "/api/data/ingest", org["ingestKey"], single_bodies(org["customers"]),
                        16, args.seconds)
                cells = []
                for name, stack in stacks.items():
                    org = orgs[name]
                    run = wrk(stack.url + "/api/data/ingest", org["ingestKey"],
                              single_bodies(org["customers"]), 16, args.seconds)
                    cells.append("%.2f (%.0f ms)" % (run["rps"] / e["rps"], run["p99_ms"]))
                print("| %s | %d | %.0f | %s |" % (service.kind, round_, e["rps"], " | ".join(cells)),
                      flush=True)
        finally:
            echo.stop()
            for stack in stacks.values():
                stack.stop()


if __name__ == "__main__":
    main()
