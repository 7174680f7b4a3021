"""Exploration: the pool size of each exposure, and per-arm exploration policies of online experiments.

Revision ID: 0004
Revises: 0003

Three nullable columns, added in place (SQLite adds nullable columns without rebuilding the table);
existing rows keep their values with the new columns null:

- ``exposures.pool_size`` (Integer): the number of candidates the exploration policy could draw from,
  after masking (``models.exploration.Slate.pool_size``); null for exposures recorded before it existed.
- ``experiments.exploration_champion`` / ``experiments.exploration_challenger`` (String(64)): each arm's
  exploration policy text (``models.exploration.ExplorationPolicy.parse``, e.g. "epsilon:0.1"); null means
  the service's global policy (``settings.exploration``).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    names = context.config.attributes["log_table_names"]
    op.add_column(names.exposures, sa.Column("pool_size", sa.Integer, nullable=True))
    op.add_column(names.experiments, sa.Column("exploration_champion", sa.String(64), nullable=True))
    op.add_column(names.experiments, sa.Column("exploration_challenger", sa.String(64), nullable=True))


def downgrade() -> None:
    names = context.config.attributes["log_table_names"]
    with op.batch_alter_table(names.experiments) as batch:  # SQLite before 3.35 cannot DROP COLUMN in place
        batch.drop_column("exploration_challenger")
        batch.drop_column("exploration_champion")
    with op.batch_alter_table(names.exposures) as batch:
        batch.drop_column("pool_size")
