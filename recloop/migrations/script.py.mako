"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}

Table names come from ``context.config.attributes["log_table_names"]``; never hard-code them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
${imports if imports else ""}

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def upgrade() -> None:
    names = context.config.attributes["log_table_names"]
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    names = context.config.attributes["log_table_names"]
    ${downgrades if downgrades else "pass"}
