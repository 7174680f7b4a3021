"""The catalogue-wide blocklist: items no serving worker may recommend (blocked or retired).

Revision ID: 0006
Revises: 0005

A new table only; the other tables are untouched. ``recloop.blocklist.BlocklistStore`` writes it
(``recloop blocklist add|remove``, ``POST /blocklist``); every serving worker reads it through a short
TTL cache (``settings.blocklist_ttl_s``), so a change reaches every worker and replica within that time.
``kind`` is "blocked" (a business rule, e.g. a takedown) or "retired" (the item left the catalogue).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    names = context.config.attributes["log_table_names"]
    op.create_table(
        names.blocklist,
        sa.Column("item_id", sa.String(255), primary_key=True),  # recloop.contract.MAX_ID_CHARS
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(500), nullable=True),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),  # recloop.logdb.UTCDateTime's DDL
    )


def downgrade() -> None:
    names = context.config.attributes["log_table_names"]
    op.drop_table(names.blocklist)
