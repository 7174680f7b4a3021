"""Exposure mask: the item ids serving masked when it answered, so off-policy estimates mask the same.

Revision ID: 0005
Revises: 0004

One nullable column, added in place (SQLite adds nullable columns without rebuilding the table):

- ``exposures.masked`` (Text): JSON list of the item ids the serving core removed from the candidates
  before ranking (everything the user consumed, not only the model's window, and the items a negative
  still suppresses; ``serving.recommender.RecommenderCore.masked_items``). ``flows/ope.py`` masks exactly
  these for the target policy. Null for exposures recorded before this revision: the estimator then
  masks the ``context`` only (the model's window), as before.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    names = context.config.attributes["log_table_names"]
    op.add_column(names.exposures, sa.Column("masked", sa.Text, nullable=True))


def downgrade() -> None:
    names = context.config.attributes["log_table_names"]
    with op.batch_alter_table(names.exposures) as batch:  # SQLite before 3.35 cannot DROP COLUMN in place
        batch.drop_column("masked")
