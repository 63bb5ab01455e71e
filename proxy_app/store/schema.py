"""The analytics schema's versions: ``create_tables`` creates the tables of models.py in a new database, or migrates
an older one to SCHEMA_VERSION keeping its rows, one version at a time, under a lock that serialises processes
starting at once. A database newer than this code is left as it is (logged).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from peewee import (
    SQL,
    BigIntegerField,
    BooleanField,
    CharField,
    Database,
    IntegerField,
    PostgresqlDatabase,
    SchemaManager,
    TextField,
)
from playhouse.migrate import SchemaMigrator, SqliteMigrator, migrate

from proxy_app.store.models import CALLS_TABLE, MODELS, SCHEMA_VERSION_TABLE, ModelEvent, SchemaVersion

log = logging.getLogger(__name__)

# Version N's migration takes a database at N - 1 to N. A new column is added here *and* on CallRow (and COLUMNS),
# e.g. ``3: lambda m: [m.add_column("calls", "gpu_name", TextField(null=True))]``. Version 1 is the first schema.
# Each migration spells out its fields rather than taking CallRow's, so it stays what it was when a later version
# changes a column.


def _add_cache_and_cloud_columns(migrator: SchemaMigrator) -> list:
    """Version 2: cached_input_tokens, remote_model and remote_host; ``api`` widens to hold ``anthropic``."""
    operations = [
        migrator.add_column(CALLS_TABLE, "cached_input_tokens", IntegerField(null=True)),
        migrator.add_column(CALLS_TABLE, "remote_model", TextField(null=True)),
        migrator.add_column(CALLS_TABLE, "remote_host", TextField(null=True)),
    ]
    if not isinstance(migrator, SqliteMigrator):  # SQLite does not enforce a VARCHAR's length; PostgreSQL does
        operations.append(migrator.alter_column_type(CALLS_TABLE, "api", CharField(max_length=16)))
    return operations


def _add_cold_start(migrator: SchemaMigrator) -> list:
    """Version 3: cold_start (the model_events table has its own step: create_tables makes it when missing)."""
    return [migrator.add_column(CALLS_TABLE, "cold_start", BooleanField(null=True))]


def _add_attribution_columns(migrator: SchemaMigrator) -> list:
    """Version 4: key_name, instance and upstream (rows stored before get ''), and the key and instance indexes;
    the token counts widen to 64 bits (an answer may claim more than 2**31 tokens; SQLite's integers are 64-bit)."""
    # NOT NULL DEFAULT '' in one ADD COLUMN each: no table rewrite (peewee's path for a default rebuilds SQLite's).
    operations = [
        migrator.add_column(CALLS_TABLE, name, TextField(constraints=[SQL("DEFAULT ''")]), allow_not_null=True)
        for name in ("key_name", "instance", "upstream")
    ]
    operations += [  # named as create_tables names CallRow's indexes
        migrator.add_index(CALLS_TABLE, (name, "timestamp"), name=f"callrow_{name}_timestamp")
        for name in ("key_name", "instance")
    ]
    if not isinstance(migrator, SqliteMigrator):
        operations += [
            migrator.alter_column_type(CALLS_TABLE, name, BigIntegerField(null=True))
            for name in ("input_tokens", "output_tokens", "total_tokens", "cached_input_tokens")
        ]
    return operations


MIGRATIONS: dict[int, Callable[[SchemaMigrator], list]] = {
    2: _add_cache_and_cloud_columns,
    3: _add_cold_start,
    4: _add_attribution_columns,
}
SCHEMA_VERSION = 4


def create_tables(db: Database) -> int:
    """Create the tables, or migrate an older schema to the current version keeping the rows; return the version."""
    with db.atomic():
        _lock_schema(db)
        found = _stored_version(db)
        SchemaManager(ModelEvent, database=db).create_all(safe=True)  # its own step, whatever the version
        if found is None:
            for model in MODELS:
                SchemaManager(model, database=db).create_all(safe=True)
            # as_rowcount: peewee would ask for the new id back (RETURNING) whenever the read side's database
            # (the proxy the model is bound to) supports it, whatever ``db`` is
            SchemaVersion.insert(version=SCHEMA_VERSION).as_rowcount().execute(db)
            return SCHEMA_VERSION
        return _migrate(db, found)


def _lock_schema(db: Database) -> None:
    """Serialise schema work between processes starting at once (SQLite's IMMEDIATE already does)."""
    if isinstance(db, PostgresqlDatabase):
        db.execute_sql("SELECT pg_advisory_xact_lock(7469001)")  # any fixed key: it names our schema lock


def _stored_version(db: Database) -> int | None:
    if not db.table_exists(SCHEMA_VERSION_TABLE):
        return None
    row = SchemaVersion.select(SchemaVersion.version).limit(1).execute(db)
    versions = [found.version for found in row]
    return versions[0] if versions else None


def _migrate(db: Database, found: int) -> int:
    if found > SCHEMA_VERSION:
        log.warning("database schema version %s is newer than this proxy's %s; leaving it as is", found, SCHEMA_VERSION)
        return found
    migrator = SchemaMigrator.from_database(db)
    for version in range(found + 1, SCHEMA_VERSION + 1):
        log.info("migrating the analytics schema to version %s", version)
        migrate(*MIGRATIONS[version](migrator))
        SchemaVersion.update(version=version).execute(db)
    return SCHEMA_VERSION
