"""Initial schema: organizations, API keys, customers, interactions.

A frozen copy of the models as they were (playhouse.migrations' convention):
later changes to models.py come as new numbered migrations, never edits here.
"""
from peewee import (
    BooleanField,
    CharField,
    DateTimeField,
    DoubleField,
    ForeignKeyField,
    IntegerField,
    Model,
    TextField,
    UUIDField,
)


def tables(db):
    class Base(Model):
        class Meta:
            database = db
            legacy_table_names = False

    class Organization(Base):
        id = UUIDField(primary_key=True)
        name = CharField(max_length=200)
        created_at = DateTimeField()

    class ApiKey(Base):
        organization = ForeignKeyField(Organization, on_delete="CASCADE")
        prefix = CharField(index=True, max_length=32)
        key_hash = CharField(unique=True, max_length=64)
        scopes = CharField(max_length=64)
        created_at = DateTimeField()
        revoked = BooleanField(default=False)

    class Customer(Base):
        id = UUIDField(primary_key=True)
        organization = ForeignKeyField(Organization, on_delete="CASCADE")
        external_id = CharField(null=True)
        name = CharField(null=True)
        email = CharField(null=True, max_length=320)
        traits = TextField()
        created_at = DateTimeField()
        last_seen_at = DateTimeField(null=True)
        interaction_count = IntegerField(default=0)

        class Meta:
            indexes = ((("organization", "external_id"), True),)

    class Interaction(Base):
        id = UUIDField(primary_key=True)
        organization = ForeignKeyField(Organization, on_delete="CASCADE")
        customer = ForeignKeyField(Customer, on_delete="CASCADE")
        message_id = CharField(null=True, max_length=128)
        timestamp = DateTimeField()
        received_at = DateTimeField()
        channel = CharField(max_length=16)
        event_type = CharField(max_length=100)
        content = TextField(null=True)
        metadata = TextField()
        analysis_status = CharField(max_length=8, default="pending")
        sentiment_label = CharField(null=True, max_length=8)
        sentiment_score = DoubleField(null=True)
        analysis_error = TextField(null=True)
        analyzed_at = DateTimeField(null=True)

        class Meta:
            indexes = (
                (("organization", "message_id"), True),
                (("organization", "timestamp", "id"), False),
                (("customer", "timestamp", "id"), False),
                (("analysis_status", "received_at"), False),
            )

    return [Organization, ApiKey, Customer, Interaction]


def up(migrator, db):
    db.create_tables(tables(db))


def down(migrator, db):
    db.drop_tables(tables(db))
