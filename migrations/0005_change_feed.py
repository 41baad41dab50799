"""The change feed (DESIGN §16): every organization's stream of positions, and one
row per committed change. Organizations that exist get an empty stream; what was
stored before this migration is not in it (the read API has it)."""
from peewee import BigIntegerField, CompositeKey, DateTimeField, ForeignKeyField, Model, SmallIntegerField, UUIDField


def tables(db):
    class Base(Model):
        class Meta:
            database = db
            legacy_table_names = False

    class Organization(Base):
        id = UUIDField(primary_key=True)

    class ChangeStream(Base):
        organization = ForeignKeyField(Organization, primary_key=True, on_delete="CASCADE")
        position = BigIntegerField(default=0)
        oldest = BigIntegerField(default=1)

    class Change(Base):
        organization_id = UUIDField()
        position = BigIntegerField()
        kind = SmallIntegerField()
        subject = UUIDField()
        recorded_at = DateTimeField()

        class Meta:
            primary_key = CompositeKey("organization_id", "position")

    return [ChangeStream, Change]


def up(migrator, db):
    db.create_tables(tables(db))
    db.execute_sql("INSERT INTO change_stream (organization_id, position, oldest) "
                   "SELECT id, 0, 1 FROM organization")


def down(migrator, db):
    db.drop_tables(tables(db))
