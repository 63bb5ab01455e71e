"""The store at start-up: open the database the read side binds to, create or migrate its tables, and plug a
``Writer`` in as a call sink, with its shutdown hook and its ``writer`` health check. A database that is down only
delays the tables (the writer creates them once it answers); calls are relayed meanwhile.
"""

from __future__ import annotations

import atexit
import logging
import weakref

from flask import Flask
from peewee import Database

from proxy_app.state import state_of
from proxy_app.store import models, schema
from proxy_app.store.csvlog import CsvLog
from proxy_app.store.writer import Writer

log = logging.getLogger(__name__)


def init_app(app: Flask) -> None:
    """Open the database, create or migrate the tables, and plug the writer in as a call sink with its hooks."""
    config = app.config
    db = models.open_database(config["DATABASE"])
    models.database.initialize(db)
    csv_log = CsvLog(config["CSV_FILE"], config["CSV_MAX_BYTES"])
    writer = Writer(db, csv_log, config["WRITER_QUEUE_SIZE"], retention_days=config["RETENTION_DAYS"],
                    retry_seconds=config["WRITER_RETRY_SECONDS"], max_rows=config["MAX_ROWS"])  # fmt: skip
    writer.schema_ready = _create_tables(db)
    state_of(app).writer = writer
    state_of(app).call_sinks.append(writer.submit)
    state_of(app).shutdown_hooks.append(writer.close)
    state_of(app).health_checks["writer"] = writer.health
    atexit.register(_close_at_exit, weakref.ref(writer))  # e.g. waitress-serve stopped with Ctrl-C


def _create_tables(db: Database) -> bool:
    """Create or migrate the schema at start-up; a database that is down only delays it (the writer retries)."""
    try:
        schema.create_tables(db)
        return True
    except Exception:
        log.exception("cannot prepare the analytics database; calls are relayed, rows dropped until it answers")
        return False
    finally:
        db.close()  # never carry a connection across gunicorn's fork (wsgi-stack.md rule 14)


def _close_at_exit(ref: weakref.ref) -> None:
    writer = ref()
    if writer is not None:
        writer.close()
