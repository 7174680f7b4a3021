"""Alembic migrations of the event-log database (``recloop.logdb.upgrade`` runs them; see its docstring).

A new migration is one file in ``versions/`` whose ``down_revision`` is the current head, plus
``recloop.logdb.HEAD_REVISION`` and ``log_tables`` moved to match. Table names come from
``context.config.attributes["log_table_names"]`` (a ``recloop.logdb.LogTableNames``), never from
the script, and every migration runs on SQLite and PostgreSQL.
"""
