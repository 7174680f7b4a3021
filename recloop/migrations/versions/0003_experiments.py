"""The online experiments: one row per champion-against-challenger experiment, and an index on status.

Revision ID: 0003
Revises: 0002

A new table only; the events and exposure tables are untouched. ``recloop.experiments.ExperimentStore``
keeps at most one row ``running`` (under the database's lock); serving polls that row through the
status index. ``result`` is the conclusion's report as JSON text.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    names = context.config.attributes["log_table_names"]
    op.create_table(
        names.experiments,
        sa.Column("experiment_id", sa.String(64), primary_key=True),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("champion_version", sa.String(64), nullable=False),
        sa.Column("challenger_version", sa.String(64), nullable=False),
        sa.Column("weight_champion", sa.Float, nullable=False),
        sa.Column("weight_challenger", sa.Float, nullable=False),
        sa.Column("salt", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),  # recloop.logdb.UTCDateTime's DDL
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("concluded_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("result", sa.Text, nullable=True),
        sa.Column("note", sa.Text, nullable=True),
    )
    op.create_index(f"ix_{names.experiments}_status", names.experiments, ["status"])


def downgrade() -> None:
    names = context.config.attributes["log_table_names"]
    op.drop_index(f"ix_{names.experiments}_status", table_name=names.experiments)
    op.drop_table(names.experiments)
