"""Command line (DESIGN §10): `flask --app app <command>`."""
import json
import uuid

import click

import models
import tasks
from ingest import accounts, changes, lifecycle, simulate
from ingest.analysis import requeue_failed
from models import Customer, Organization


def init_app(app):
    for command in (init_db, create_org, create_key, revoke_key, demo, analysis, retention):
        app.cli.add_command(command)


def _emit(as_json, payload, text):
    click.echo(json.dumps(payload) if as_json else text)


@click.command("init-db")
def init_db():
    """Create or upgrade the schema, and the queue's tables (idempotent)."""
    applied = models.migrate()
    tasks.create_queue_tables()
    click.echo("applied: %s" % ", ".join(applied) if applied else "schema is up to date")


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
              type=click.Choice(accounts.SCOPES), help="ingest and/or read (repeatable).")
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
    """Delete old interactions in chunks of 1,000, one transaction each, correcting
    their customers' counters as it goes: ingest goes on meanwhile. For a daily
    cron job: `flask --app app retention apply --days 365`."""
    if organization_id is not None:
        organization_id = _uuid(organization_id)
    cutoff = lifecycle.retention_cutoff(days)
    if dry_run:
        click.echo("would delete %d interaction(s) older than %s UTC" % (
            lifecycle.count_expired(cutoff, organization_id), cutoff.isoformat(" ", "seconds")))
        return
    deleted = lifecycle.apply_retention(cutoff, organization_id)
    click.echo("deleted %d interaction(s) older than %s UTC" % (deleted, cutoff.isoformat(" ", "seconds")))
    pruned = changes.prune(cutoff, organization_id)
    click.echo("deleted %d change(s) recorded before then; older cursors are answered 410" % pruned)
