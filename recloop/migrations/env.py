"""Alembic environment of the event-log database: online only, on the connection ``recloop.logdb`` passes.

``config.attributes`` holds ``connection`` (a SQLAlchemy Connection already inside the caller's
transaction and lock) and ``log_table_names`` (a ``recloop.logdb.LogTableNames``). The migrations
run inside that transaction; the caller commits.
"""

from __future__ import annotations

from alembic import context

config = context.config
connection = config.attributes.get("connection")
names = config.attributes.get("log_table_names")
if connection is None or names is None or context.is_offline_mode():
    raise RuntimeError("run these migrations through recloop.logdb.upgrade (online, with a connection)")

context.configure(connection=connection, target_metadata=None, version_table=names.version_table)
with context.begin_transaction():
    context.run_migrations()
