"""Command line (DESIGN §10): `flask --app app <command>`."""
import contextlib
import json
import os
import signal
import sys
import time
import uuid

import click
from flask import current_app
from flask.cli import with_appcontext
from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress

import models
import tasks
from ingest import accounts, changes, lifecycle, partitions, simulate
from ingest.analysis import requeue_failed
from models import Customer, Organization


def init_app(app):
    for command in (init_db, migrate, partitions_cli, create_org, create_key, revoke_key, demo, analysis,
                    retention, changes_cli):
        app.cli.add_command(command)


def _emit(as_json, payload, text):
    click.echo(json.dumps(payload) if as_json else text)


@click.command("init-db")
@with_appcontext
def init_db():
    """Create or upgrade the schema, and the queue's tables (idempotent). On
    PostgreSQL an interaction table of more than 100,000 rows is left unpartitioned:
    `flask migrate` converts it."""
    applied = models.migrate(current_app.config["PARTITION_INTERVAL"])
    tasks.create_queue_tables()
    click.echo("applied: %s" % ", ".join(applied) if applied else "schema is up to date")


@click.command("migrate")
@click.option("--chunk", type=click.IntRange(min=1), default=partitions.COPY_ROWS, show_default=True,
              help="Rows copied per transaction.")
@with_appcontext
def migrate(chunk):
    """Upgrade the schema as init-db does, then, on PostgreSQL, turn an unpartitioned
    interaction table into the partitioned one (DESIGN §17): rows are copied in
    chunks, each committed with where it stopped, so a killed run resumes
    where it was; ingest and analysis go on meanwhile, and wait only for the last
    chunk and the swap of the tables. A progress bar shows on stderr on a terminal."""
    interval = current_app.config["PARTITION_INTERVAL"]
    applied = models.migrate(interval, convert_up_to=0)
    tasks.create_queue_tables()
    click.echo("applied: %s" % ", ".join(applied) if applied else "schema is up to date")
    started = time.monotonic()
    with _progress(partitions.remaining_estimate(), "rows") as advance:
        copied = partitions.convert(interval, partitions.AHEAD, models.utcnow(), chunk, progress=advance)
    if copied is not None:
        click.echo("interaction is partitioned by %s: %d row(s) copied in %.1f s" % (
            interval, copied, time.monotonic() - started))


@click.group("partitions")
def partitions_cli():
    """interaction's partitions on PostgreSQL (DESIGN §17)."""


@partitions_cli.command("ensure")
@click.option("--ahead", type=click.IntRange(min=0), default=partitions.AHEAD, show_default=True,
              help="Periods to create after the current one.")
@click.option("--since", type=click.DateTime(formats=["%Y-%m-%d"]),
              help="Also create the partitions from this date's period on (UTC), before importing history.")
@with_appcontext
def partitions_ensure(ahead, since):
    """Create the partitions of the coming periods (the consumer does it hourly);
    rows the default partition holds for them move in."""
    interval = current_app.config["PARTITION_INTERVAL"]
    if since is not None and not partitions.is_partitioned():
        raise click.ClickException("interaction is not partitioned: run flask migrate")
    created = (partitions.cover(interval, since, models.utcnow(), ahead) if since is not None
               else partitions.ensure_ahead(interval, ahead))
    for partition, moved in created:
        click.echo("created %s for %s to %s%s" % (partition.name, partition.start, partition.end,
                                                   ", moved %d row(s) from the default" % moved if moved else ""))


@partitions_cli.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@with_appcontext
def partitions_status(as_json):
    """The partitions, how far ahead they go and what the default partition holds
    (rows there mean a partition was missing: `flask partitions ensure`)."""
    found = partitions.report(models.utcnow())
    if found is None:
        state = partitions.conversion_state()
        _emit(as_json, {"partitioned": False, "state": state},
              {"sqlite": "SQLite keeps one table", "unpartitioned": "not partitioned: run flask migrate",
               "started": "a conversion is under way: run flask migrate"}[state])
        return
    payload = {"partitioned": True, "interval": current_app.config["PARTITION_INTERVAL"],
               "defaultRows": found["default_rows"], "coveredUntil": found["covered_until"].isoformat(),
               "partitions": [{"name": p.name, "from": p.start.isoformat(), "to": p.end.isoformat()}
                              for p in found["partitions"]]}
    _emit(as_json, payload, "\n".join(["%(name)s  %(from)s .. %(to)s" % p for p in payload["partitions"]] + [
        "covered until %s; default partition: %d row(s)" % (payload["coveredUntil"], payload["defaultRows"])]))


@click.command("create-org")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def create_org(name, as_json):
    """Create an organization with an ingest key and a read key."""
    created = accounts.new_organization(name)
    _emit(as_json, created, "organization %(organizationId)s\ningest key: %(ingestKey)s\n"
                            "read key:   %(readKey)s\n(the keys are shown only now)" % created)


@click.command("create-key")
@click.argument("organization_id")
@click.option("--scope", "scopes", multiple=True, required=True,
              type=click.Choice([scope.value for scope in accounts.Scope]), help="ingest and/or read (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def create_key(organization_id, scopes, as_json):
    """Create an API key for an organization."""
    org = Organization.get_or_none(Organization.id == _uuid(organization_id))
    if org is None:
        raise click.ClickException("no organization %s" % organization_id)
    key, row = accounts.create_key(org.id, scopes)
    _emit(as_json, {"organizationId": str(org.id), "key": key, "prefix": row.prefix,
                    "scopes": sorted(scopes)},
          "key: %s\nprefix: %s (to revoke it)\n(the key is shown only now)" % (key, row.prefix))


@click.command("revoke-key")
@click.argument("prefix")
def revoke_key(prefix):
    """Revoke the key with this prefix (its first 12 characters)."""
    count = accounts.revoke_key(prefix)
    if not count:
        raise click.ClickException("no live key with prefix %s" % prefix[:accounts.PREFIX_LENGTH])
    click.echo("revoked %d key(s)" % count)


def _uuid(value):
    try:
        return uuid.UUID(value)
    except ValueError:
        raise click.ClickException("not an id: %s" % value) from None


DEMO_NAME = "Demo"
DEMO_CUSTOMERS = (("ada", "Ada Lovelace"), ("grace", "Grace Hopper"), ("alan", "Alan Turing"))


def create_demo(base_url):
    """A demo organization with customers and keys; returns what to print."""
    created = accounts.new_organization(DEMO_NAME)
    customers = [Customer.create(organization=created["organizationId"], external_id=ext, name=name)
                 for ext, name in DEMO_CUSTOMERS]
    return _with_examples(created, [str(c.id) for c in customers], base_url)


def first_demo(base_url):
    """The demo organization made at first start, with fresh keys (keys are shown
    only once), or None."""
    org = (Organization.select().where(Organization.name == DEMO_NAME)
           .order_by(Organization.created_at).first())
    customers = [str(c.id) for c in Customer.select(Customer.id).where(Customer.organization == org)
                 .order_by(Customer.created_at)] if org else []
    if not customers:
        return None
    return _with_examples(accounts.new_keys(org.id), customers, base_url)


def _with_examples(created, customer_ids, base_url):
    """``created`` with its customers, a curl line to try and the feed link."""
    created["customerIds"] = customer_ids
    created["curl"] = (
        "curl -s %s/api/data/ingest -H 'Authorization: Bearer %s' "
        "-H 'Content-Type: application/json' -d '{\"customerId\": \"%s\", "
        "\"timestamp\": \"2026-01-01T12:00:00Z\", \"channel\": \"chat\", "
        "\"eventType\": \"message\", \"content\": \"I love this product!\"}'"
        % (base_url, created["ingestKey"], customer_ids[0]))
    created["feedUrl"] = "%s/feed#key=%s" % (base_url, created["readKey"])
    return created


def _demo_text(created):
    return ("demo organization %(organizationId)s\n"
            "ingest key: %(ingestKey)s\nread key:   %(readKey)s\n"
            "try:\n  %(curl)s\nlive feed: %(feedUrl)s\n"
            "simulated traffic for this organization, shown by the live feed above:\n"
            "  .venv/bin/flask --app app demo --stream" % created)


@click.command("demo")
@click.option("--base-url", default="http://127.0.0.1:5000", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--stream", is_flag=True,
              help="Post simulated interactions to the server at --base-url, for the demo "
                   "organization made at first start (or a new one).")
@click.option("--rate", default=5.0, show_default=True, help="Interactions a second, with --stream.")
@click.option("--count", default=0, help="Stop after this many (default: until Ctrl-C).")
def demo(base_url, as_json, stream, rate, count):
    """Create a demo organization with customers and keys, and show how to try it;
    with --stream, feed the first-start demo organization simulated traffic."""
    created = (stream and first_demo(base_url)) or create_demo(base_url)
    _emit(as_json, created, _demo_text(created))
    if stream:
        simulate.stream(base_url, created["ingestKey"], created["customerIds"], rate, count)


def greet_first_start(base_url):
    """On the first start with an empty database, create the demo and print it."""
    if Organization.select().exists():
        return
    click.echo(_demo_text(create_demo(base_url)))


@click.group("analysis")
def analysis():
    """Sentiment analysis maintenance."""


@analysis.command("retry")
def analysis_retry():
    """Re-queue the interactions whose analysis failed."""
    ids = requeue_failed()
    tasks.requeue(ids)
    click.echo("re-queued %d interaction(s)" % len(ids))


@click.group("retention")
def retention():
    """Delete old interactions and changes (DESIGN §15, §16)."""


@retention.command("apply")
@click.option("--days", type=click.IntRange(min=0), required=True,
              help="Delete interactions whose event time is more than this many days ago.")
@click.option("--org", "organization_id", help="Only this organization (default: all).")
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
def retention_apply(days, organization_id, dry_run):
    """Delete old interactions, correcting their customers' counters as it goes:
    ingest goes on meanwhile. On PostgreSQL whole partitions received before the
    horizon are dropped first (the fast path; not with --org); the rest goes in
    chunks of 1,000, one transaction each. A progress bar shows on stderr when it
    is a terminal. For a daily cron job: `flask --app app retention apply --days 365`."""
    if organization_id is not None:
        organization_id = _uuid(organization_id)
    cutoff = lifecycle.retention_cutoff(days)
    if dry_run:
        click.echo("would delete %d interaction(s) older than %s UTC" % (
            lifecycle.count_expired(cutoff, organization_id), cutoff.isoformat(" ", "seconds")))
        return
    started = time.monotonic()
    expected = lifecycle.count_expired(cutoff, organization_id) if sys.stderr.isatty() else None
    with _progress(expected, "interactions") as advance:
        dropped, deleted = lifecycle.apply_retention(cutoff, organization_id, progress=advance)
    click.echo("deleted %d interaction(s) older than %s UTC (%d partition(s) dropped whole) in %.1f s" % (
        deleted, cutoff.isoformat(" ", "seconds"), dropped, time.monotonic() - started))
    pruned = changes.prune(cutoff, organization_id)
    click.echo("%d change(s) recorded before then are out of reach: cursors among them are answered 410; "
               "their rows (and dropped partitions' message keys) go with `retention reclaim`, which the "
               "consumer runs hourly" % pruned)


@retention.command("reclaim")
def retention_reclaim():
    """Delete now what retention put out of reach (the consumer does it hourly, a
    bounded amount at a time): the rows of pruned changes, the message keys of
    dropped partitions."""
    started = time.monotonic()
    reclaimed = lifecycle.reclaim()
    click.echo("deleted %d change row(s) and %d message key(s) in %.1f s" % (
        reclaimed["changes"], reclaimed["message_keys"], time.monotonic() - started))


@click.group("changes")
def changes_cli():
    """The organization's change feed (DESIGN §16)."""


@changes_cli.command("export")
@click.option("--org", "organization_id", required=True, help="The organization's id.")
@click.option("--after", help="Export the changes after this cursor (default: from the oldest "
                              "change kept or, with --out, after the file's last line).")
@click.option("--out", type=click.Path(dir_okay=False),
              help="Append to this file instead of writing to stdout; the cursor to resume from "
                   "then goes to stdout.")
def changes_export(organization_id, after, out):
    """Export the organization's changes as NDJSON, oldest first: one {"cursor",
    "type", "data"} a line, as GET /api/changes lists them, up to the last change
    committed when it starts. Each page of 1,000 is written and flushed whole; a
    progress bar shows on stderr when it is a terminal.

    At the end, or when stopped by Ctrl-C or SIGTERM (after the page under way;
    exit 130 or 143; a second one stops it at once), it prints the cursor to
    resume from with --after: on stdout with --out, else as the last line of stderr. With --out, running the same
    command again continues after the file's last whole line (a partial one, left
    by a kill -9, is cut off first), so the file holds every change once."""
    organization_id = _organization(organization_id)
    after = _start(organization_id, after, out)
    sink = open(out, "ab") if out else sys.stdout.buffer
    try:
        with _noting_signals() as stopped:
            last, written = _export(organization_id, after, sink, stopped)
    except changes.ExpiredCursor as expired:
        raise click.ClickException("the changes after that cursor are no longer kept (retention deleted "
                                   "them); the oldest cursor still good is %s" % expired.oldest) from None
    finally:
        if out:
            sink.close()
    click.echo("%s %d change(s)" % ("stopped by %s after" % stopped[0].name if stopped else "exported",
                                    written), err=True)
    click.echo(changes.cursor(organization_id, last), err=not out)
    if stopped:
        click.get_current_context().exit(128 + stopped[0])


def _organization(text):
    organization_id = _uuid(text)
    if not Organization.select().where(Organization.id == organization_id).exists():
        raise click.ClickException("no organization %s" % text)
    return organization_id


def _start(organization_id, after, out):
    """The position to export after: --after's, else that of --out's last line (None:
    from the oldest change kept). --after may not go back before what --out holds."""
    held = _held(organization_id, out) if out else None
    if after is None:
        return held
    given = _position(organization_id, after, "--after")
    if held is not None and given < held:
        raise click.BadParameter("%s already holds the changes after it; leave --after out to "
                                 "continue the file" % out, param_hint="--after")
    return given


def _position(organization_id, cursor, option):
    try:
        return changes.position_of(organization_id, cursor)
    except changes.BadCursor:
        raise click.BadParameter("not a cursor of this organization's changes", param_hint=option) from None


def _held(organization_id, path):
    """The position of the last whole line of the export file ``path`` (None if it has
    none); a partial last line, left by a kill, is cut off."""
    try:
        file = open(path, "rb+")
    except FileNotFoundError:
        return None
    with file:
        end, line = _last_whole_line(file)
        position = _line_position(organization_id, line) if line is not None else _no_line(file)
        file.truncate(end)
    return position


def _no_line(file):
    """None, for a file that is empty or holds only the start of an export's first line."""
    file.seek(0)
    if not b'{"cursor":'.startswith(file.read(10)):
        raise click.BadParameter("not a changes export", param_hint="--out")


def _last_whole_line(file):
    """(where the whole lines of a binary ``file`` end, the last of them or None)."""
    start = file.seek(0, os.SEEK_END)
    tail = b""
    while start and tail.count(b"\n") < 2:
        step = min(start, 1 << 16)
        start -= step
        file.seek(start)
        tail = file.read(step) + tail
    end = tail.rfind(b"\n")
    if end < 0:
        return 0, None
    return start + end + 1, tail[tail.rfind(b"\n", 0, end) + 1:end]


def _line_position(organization_id, line):
    try:
        return changes.position_of(organization_id, json.loads(line)["cursor"])
    except (ValueError, KeyError, TypeError):  # BadCursor is a ValueError
        raise click.BadParameter("its last line is not a change of this organization",
                                 param_hint="--out") from None


def _export(organization_id, after, sink, stopped):
    """Write the changes after position ``after`` (None: the oldest kept) to ``sink``,
    a page at a time, up to the last position given out now, until ``stopped`` holds
    a signal; returns (the last position read, how many changes were written)."""
    end, oldest = changes.stream(organization_id)
    after = oldest - 1 if after is None else after
    written = 0
    with _progress(max(end - after, 0), "changes") as advance:
        while after < end and not stopped:
            events, last = changes.read(organization_id, after)
            if last == after:  # the rest is not committed yet: for the next run
                break
            _write_all(sink, "".join(json.dumps({"cursor": e["cursor"], "type": e["type"], "data": e["data"]},
                                                separators=(",", ":")) + "\n" for e in events).encode())
            advance(last - after)
            after, written = last, written + len(events)
    return after, written


def _write_all(sink, data):
    """Write ``data`` to a binary ``sink`` and flush it. A write to a pipe that a
    signal interrupts returns short; the text layer would drop the rest silently."""
    view = memoryview(data)
    while view:
        view = view[sink.write(view):]
    sink.flush()


@contextlib.contextmanager
def _progress(total, what):
    """A bar on stderr, when it is a terminal; yields advance(how many more of ``what``)."""
    with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), disable=not sys.stderr.isatty(),
                  console=Console(stderr=True), redirect_stdout=False, redirect_stderr=False) as bar:
        task = bar.add_task(what, total=total)
        yield lambda count: bar.advance(task, count)


@contextlib.contextmanager
def _noting_signals():
    """Yields a list that gets a SIGINT or SIGTERM received meanwhile, instead of the
    process stopping in the middle of a page; a second one of a kind stops it at once."""
    received = []

    def note(number, frame):
        received.append(signal.Signals(number))
        signal.signal(number, signal.SIG_DFL)

    previous = {number: signal.signal(number, note) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
