"""The exposure log: ``request_id``/``position`` on events, the exposures and exposure_items tables.

Revision ID: 0002
Revises: 0001

``events`` gains two nullable columns (SQLite adds nullable columns in place) and an index on
``request_id``; existing rows keep their values with both columns null. ``exposures`` holds one row
per served list, ``exposure_items`` one row per shown item (no foreign key: the writer batches both).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    names = context.config.attributes["log_table_names"]
    op.add_column(names.events, sa.Column("request_id", sa.String(64), nullable=True))
    op.add_column(names.events, sa.Column("position", sa.Integer, nullable=True))
    op.create_index(f"ix_{names.events}_request", names.events, ["request_id"])
    op.create_table(
        names.exposures,
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),  # recloop.logdb.UTCDateTime's DDL
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("variant", sa.String(64), nullable=False, server_default=""),
        sa.Column("experiment_id", sa.String(64), nullable=True),
        sa.Column("arm", sa.String(32), nullable=True),
        sa.Column("policy", sa.String(32), nullable=False, server_default="greedy"),
        sa.Column("context", sa.Text, nullable=True),
    )
    op.create_index(f"ix_{names.exposures}_ts", names.exposures, ["ts"])
    op.create_index(f"ix_{names.exposures}_user_ts", names.exposures, ["user_id", "ts"])
    op.create_table(
        names.exposure_items,
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("item_id", sa.String(255), nullable=False),
        sa.Column("score", sa.Float, nullable=True),
        sa.Column("team", sa.String(32), nullable=True),
        sa.Column("propensity", sa.Float, nullable=True),
        sa.PrimaryKeyConstraint("request_id", "position", name=f"pk_{names.exposure_items}"),
    )


def downgrade() -> None:
    names = context.config.attributes["log_table_names"]
    op.drop_table(names.exposure_items)
    op.drop_table(names.exposures)
    op.drop_index(f"ix_{names.events}_request", table_name=names.events)
    with op.batch_alter_table(names.events) as batch:  # SQLite before 3.35 cannot DROP COLUMN in place
        batch.drop_column("position")
        batch.drop_column("request_id")
