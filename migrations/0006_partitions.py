"""Storage at scale (DESIGN §17), the schema half; ingest/partitions.py converts
``interaction`` itself, after the migrations (models.migrate, `flask migrate`).

- ``change.subject_at``: the ``received_at`` of the interaction a change is about,
  so that reading a page of changes looks each one up in its own partition.
- PostgreSQL: ``message_key``, one row per (organization, messageId) stored,
  written in the same statement as the interaction. A partitioned table cannot
  hold a unique index without its partition key, so this small table keeps
  "a messageId is stored once" exact across partitions (docs/design.md §17);
  ``storage_horizon``: the start of what is kept since retention dropped partitions
  (a key received before it points at nothing, and is taken over).
"""

from peewee import DateTimeField, PostgresqlDatabase

KINDS_ABOUT_INTERACTIONS = "(1, 2, 4)"


def up(migrator, db):
    migrator.migrate(migrator.add_column("change", "subject_at", DateTimeField(null=True)))
    if _postgres(db):
        db.execute_sql('UPDATE "change" SET subject_at = i.received_at FROM interaction AS i '
                       'WHERE i.id = "change".subject AND "change".kind IN ' + KINDS_ABOUT_INTERACTIONS)
        db.execute_sql("CREATE TABLE message_key (organization_id uuid NOT NULL, message_id varchar(128) NOT NULL, "
                       "interaction_id uuid NOT NULL, received_at timestamp NOT NULL, "
                       "PRIMARY KEY (organization_id, message_id))")
        db.execute_sql("CREATE INDEX message_key_received_at ON message_key (received_at)")
        db.execute_sql("CREATE TABLE storage_horizon (id integer PRIMARY KEY, kept_from timestamp NOT NULL)")
        db.execute_sql("INSERT INTO message_key SELECT organization_id, message_id, id, received_at "
                       "FROM interaction WHERE message_id IS NOT NULL")
    else:
        db.execute_sql('UPDATE "change" SET subject_at = (SELECT received_at FROM interaction AS i '
                       'WHERE i.id = "change".subject) WHERE kind IN ' + KINDS_ABOUT_INTERACTIONS)


def down(migrator, db):
    if _postgres(db):
        db.execute_sql("DROP TABLE message_key")
        db.execute_sql("DROP TABLE storage_horizon")
    migrator.migrate(migrator.drop_column("change", "subject_at"))


def _postgres(db):
    return isinstance(db, PostgresqlDatabase)
