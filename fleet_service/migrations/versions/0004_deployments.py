"""deployment targets remember the desired generation they were sent at

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("deployment_target") as batch:
        batch.add_column(sa.Column("sent_generation", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deployment_target") as batch:
        batch.drop_column("sent_generation")
