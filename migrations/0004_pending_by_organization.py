"""A partial index of the interactions pending analysis, by organization.

The analysis backlog bound is shared fairly between organizations
(ingest/auth.py, Backlog): while it is exceeded, each organization's pending
count is read once a second, each count stopping early. This index holds only
the pending rows (about the backlog, however large the table grows), so those
counts and the search for the organizations that have a backlog read it alone.
A row leaves it when its analysis is stored."""
from peewee import SQL

NAME = "interaction_pending_organization"


def up(migrator, db):
    migrator.migrate(migrator.add_index("interaction", ("organization_id",), name=NAME,
                                        where=SQL("analysis_status = 'pending'")))


def down(migrator, db):
    migrator.migrate(migrator.drop_index("interaction", NAME))
