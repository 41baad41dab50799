"""Drop the two single-column indexes peewee made for interaction's foreign keys.

Each is the leading column of a composite index that stays ((organization_id,
message_id) and (organization_id, timestamp, id); (customer_id, timestamp, id)),
which serves the same lookups, the cascading deletes included. Every stored
interaction paid for writing both: with them gone SQLite's insert-and-count
costs 10-20 % less CPU per row (docs/BENCHMARKS.md)."""

REDUNDANT = (("interaction_organization_id", ("organization_id",)),
             ("interaction_customer_id", ("customer_id",)))


def up(migrator, db):
    for name, _ in REDUNDANT:
        migrator.migrate(migrator.drop_index("interaction", name))


def down(migrator, db):
    for _, columns in REDUNDANT:
        migrator.migrate(migrator.add_index("interaction", columns))
