"""The schema the migrations build (models.migrate(), run on this run's database by
conftest) is the one models.py declares. For every model defined in models.py:
the same columns (name, type, nullability, default, primary key), indexes (name,
columns, uniqueness) and foreign keys (column, target, ON DELETE) as in a fresh
database of the same kind where the models' own CREATE statements ran; and no
table the models do not declare."""
import os

import pytest
from peewee import PostgresqlDatabase, SchemaManager, sort_models

import models
from ingest import partitions
from tests import dbs

DECLARED = sorted((value for value in vars(models).values()
                   if isinstance(value, type) and issubclass(value, models.BaseModel)
                   and value is not models.BaseModel and value.__module__ == models.__name__),
                  key=lambda model: model.__name__)

# Tables that are not models': the migrations' history, and the queue's when it is
# kept in the same PostgreSQL database (test_consumer).
NOT_MODELS = ("schema_migration",)
QUEUE_PREFIX = "huey_"


@pytest.fixture(scope="module")
def created(tmp_path_factory):
    """A new database of this run's kind with models.py's tables, as create_tables makes them."""
    url = dbs.create_scratch_database(os.environ["DATABASE_URL"], str(tmp_path_factory.mktemp("created")))
    database = models.make_database(url, pool_size=1)
    with database.connection_context():
        for model in sort_models(DECLARED):
            SchemaManager(model, database).create_all()
    yield database
    if dbs.is_postgres_url(url):
        database.close_all()
        dbs.drop_database(url)


def foreign_keys(database, table):
    """{column: (target table, target column, ON DELETE)} of the foreign keys."""
    if isinstance(database, PostgresqlDatabase):
        actions = dict(database.execute_sql(
            "SELECT kcu.column_name, rc.delete_rule FROM information_schema.referential_constraints rc "
            "JOIN information_schema.key_column_usage kcu USING (constraint_schema, constraint_name) "
            "WHERE kcu.table_schema = current_schema() AND kcu.table_name = %s", (table,)).fetchall())
    else:
        actions = {row[3]: row[6] for row in database.execute_sql('PRAGMA foreign_key_list("%s")' % table)}
    return {key.column: (key.dest_table, key.dest_column, actions.get(key.column))
            for key in database.get_foreign_keys(table)}


def indexes(database, table):
    """{name: {"columns", "unique"}} of the table's indexes (on PostgreSQL read from the
    catalog: peewee's introspection skips a partitioned table's)."""
    if not isinstance(database, PostgresqlDatabase):
        return {index.name: {"columns": index.columns, "unique": index.unique}
                for index in database.get_indexes(table)}
    rows = database.execute_sql(
        "SELECT i.relname, x.indisunique, array_agg(a.attname ORDER BY k.n) FROM pg_index AS x "
        "JOIN pg_class AS i ON i.oid = x.indexrelid JOIN pg_class AS t ON t.oid = x.indrelid "
        "CROSS JOIN LATERAL unnest(x.indkey) WITH ORDINALITY AS k(attnum, n) "
        "JOIN pg_attribute AS a ON a.attrelid = t.oid AND a.attnum = k.attnum "
        "WHERE t.relname = %s AND t.relnamespace = current_schema()::regnamespace "
        "GROUP BY i.relname, x.indisunique", (table,)).fetchall()
    return {name: {"columns": list(columns), "unique": unique} for name, unique, columns in rows}


def schema(database, table):
    """What the database says of ``table``: its columns, indexes and foreign keys, by name."""
    with database.connection_context():
        return {
            "columns": {column.name: column._asdict() for column in database.get_columns(table)},
            "indexes": indexes(database, table),
            "foreign keys": foreign_keys(database, table),
        }


def partitioned(declared):
    """interaction as migration 0006 and ingest/partitions.py make it on PostgreSQL, from
    its declaration: partitioned by received_at, which joins its primary key, and no
    unique index of messageIds (message_key holds them, docs/design.md §17)."""
    declared["columns"]["received_at"]["primary_key"] = True
    declared["indexes"]["interaction_pkey"]["columns"] = ["id", "received_at"]
    del declared["indexes"]["interaction_organization_id_message_id"]
    return declared


@pytest.mark.parametrize("model", DECLARED, ids=lambda model: model.__name__)
def test_the_migrated_table_is_the_declared_one(created, model):
    table = model._meta.table_name
    postgres = isinstance(created, PostgresqlDatabase)
    if model in (models.MessageKey, models.StorageHorizon) and not postgres:
        pytest.skip("PostgreSQL only: SQLite keeps the unique index on interaction")
    declared, migrated = schema(created, table), schema(models.db.obj, table)
    if model is models.Interaction and postgres:
        declared = partitioned(declared)
    assert declared["columns"], "the model made no table %r" % table
    for part in declared:
        assert migrated[part] == declared[part], "the %s of %s: migrated (left), declared (right)" % (part, table)


def test_the_migrations_make_no_table_the_models_do_not_declare():
    with models.db.connection_context():
        tables = set(models.db.get_tables())
        if partitions.is_partitioned():  # interaction's partitions are interaction
            tables -= {p.name for p in partitions.partitions()} | {partitions.DEFAULT}
    undeclared = {table for table in tables - {model._meta.table_name for model in DECLARED}
                  if table not in NOT_MODELS and not table.startswith(QUEUE_PREFIX)}
    assert undeclared == set()
