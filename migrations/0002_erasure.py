"""Erasures (DESIGN §15): which external ids of an organization were erased, and
when, so that an older Segment event arriving late cannot bring a customer back.
Only a SHA-256 of the external id is kept."""
from peewee import CharField, DateTimeField, ForeignKeyField, Model, UUIDField


def tables(db):
    class Base(Model):
        class Meta:
            database = db
            legacy_table_names = False

    class Organization(Base):
        id = UUIDField(primary_key=True)

    class Erasure(Base):
        organization = ForeignKeyField(Organization, on_delete="CASCADE")
        external_id_hash = CharField(max_length=64)
        erased_at = DateTimeField()

        class Meta:
            indexes = ((("organization", "external_id_hash"), True),)

    return [Erasure]


def up(migrator, db):
    db.create_tables(tables(db))


def down(migrator, db):
    db.drop_tables(tables(db))
