"""New catalogue items, forgotten users, and each experiment arm's re-ranking.

Revision ID: 0007
Revises: 0006

Three additions; the other tables and their rows are untouched:

- ``catalog_items``: items added to the catalogue after the lake snapshot (``POST /items`` or a source
  batch): ``item_id`` (primary key), ``title``, ``genres`` (pipe-separated, nullable), ``text``
  (nullable: a description), ``added_at``. Every serving worker and replica reads it (new items are served
  at once by a text-aware model; the next retrain learns their id embeddings).
- ``forgotten_users``: one row per forget request, keyed by the salted hash of the user id (never the id):
  ``user_hash`` (primary key; also the tombstone ingestion and the API check), ``requested_at``,
  ``completed_at`` (nullable until every store's handler ran), ``rows`` (JSON text: rows removed per
  store), ``honoured_by`` (nullable: the MLflow run of the cold retrain that honoured it).
- ``experiments.rerank_champion`` / ``rerank_challenger`` (nullable): each arm's re-ranking stage text
  ("mmr:0.3", "dpp:0.5"; null = the request's own ``diversity`` or none).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    names = context.config.attributes["log_table_names"]
    op.create_table(
        names.catalog_items,
        sa.Column("item_id", sa.String(255), primary_key=True),  # recloop.contract.MAX_ID_CHARS
        sa.Column("title", sa.String(500), nullable=False),
        sa.Column("genres", sa.String(500), nullable=True),
        sa.Column("text", sa.Text, nullable=True),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),  # recloop.logdb.UTCDateTime's DDL
    )
    op.create_table(
        names.forgotten_users,
        sa.Column("user_hash", sa.String(64), primary_key=True),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rows", sa.Text, nullable=True),
        sa.Column("honoured_by", sa.String(64), nullable=True),
    )
    op.add_column(names.experiments, sa.Column("rerank_champion", sa.String(64), nullable=True))
    op.add_column(names.experiments, sa.Column("rerank_challenger", sa.String(64), nullable=True))


def downgrade() -> None:
    names = context.config.attributes["log_table_names"]
    with op.batch_alter_table(names.experiments) as batch:  # SQLite before 3.35 cannot DROP COLUMN in place
        batch.drop_column("rerank_challenger")
        batch.drop_column("rerank_champion")
    op.drop_table(names.forgotten_users)
    op.drop_table(names.catalog_items)
