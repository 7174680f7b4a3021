"""The events table (the feedback log) and its two indexes, created only where missing.

Revision ID: 0001
Revises: (none)

A database made before migrations existed already has this table (same columns and indexes, no
version table): the revision then creates nothing and only stamps the version, keeping every row
and its ``seq``. Columns are frozen here as they were at this revision; later revisions alter them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    names = context.config.attributes["log_table_names"]
    events = names.events
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table(events):
        op.create_table(
            events,
            sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
            sa.Column("event_id", sa.String(128), nullable=False, unique=True),
            sa.Column("user_id", sa.String(255), nullable=False),
            sa.Column("item_id", sa.String(255), nullable=False),
            sa.Column("event_type", sa.String(16), nullable=False),
            sa.Column("value", sa.Float, nullable=True),
            sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),  # recloop.logdb.UTCDateTime's DDL
            sa.Column("source", sa.String(128), nullable=False),
            sa.Column("ingested_at", sa.DateTime(timezone=True), nullable=False),
        )
        existing: set[str] = set()
    else:
        existing = {ix["name"] for ix in sa.inspect(op.get_bind()).get_indexes(events)}
    if f"ix_{events}_user_ts" not in existing:
        op.create_index(f"ix_{events}_user_ts", events, ["user_id", "timestamp", "seq"])
    if f"ix_{events}_ts" not in existing:
        op.create_index(f"ix_{events}_ts", events, ["timestamp", "seq"])


def downgrade() -> None:
    names = context.config.attributes["log_table_names"]
    op.drop_table(names.events)
