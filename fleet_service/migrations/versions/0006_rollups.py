"""hourly telemetry and result rollups, and the cursor of the retention job

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 17:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "telemetry_hourly",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("hour", _TIME, nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("cpu_min", sa.Float(), nullable=False),
        sa.Column("cpu_max", sa.Float(), nullable=False),
        sa.Column("cpu_sum", sa.Float(), nullable=False),
        sa.Column("memory_min", sa.Float(), nullable=False),
        sa.Column("memory_max", sa.Float(), nullable=False),
        sa.Column("memory_sum", sa.Float(), nullable=False),
        sa.Column("disk_sum", sa.Float(), nullable=False),
        sa.Column("load_min", sa.Float(), nullable=False),
        sa.Column("load_max", sa.Float(), nullable=False),
        sa.Column("load_sum", sa.Float(), nullable=False),
        sa.Column("temperature_samples", sa.Integer(), nullable=False),
        sa.Column("temperature_min", sa.Float(), nullable=True),
        sa.Column("temperature_max", sa.Float(), nullable=True),
        sa.Column("temperature_sum", sa.Float(), nullable=False),
        sa.Column("memory_used_sum", sa.Float(), nullable=False),
        sa.Column("memory_total_max", sa.BigInteger(), nullable=False),
        sa.Column("net_sent_max", sa.BigInteger(), nullable=False),
        sa.Column("net_recv_max", sa.BigInteger(), nullable=False),
        sa.Column("uptime_max", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["device.id"]),
        sa.PrimaryKeyConstraint("device_id", "hour"),
    )
    op.create_table(
        "result_hourly",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("hour", _TIME, nullable=False),
        sa.Column("results", sa.Integer(), nullable=False),
        sa.Column("errors", sa.Integer(), nullable=False),
        sa.Column("latency_min_ms", sa.Float(), nullable=False),
        sa.Column("latency_max_ms", sa.Float(), nullable=False),
        sa.Column("latency_sum_ms", sa.Float(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["device.id"]),
        sa.PrimaryKeyConstraint("device_id", "model", "hour"),
    )
    op.create_index("ix_result_hourly_model_hour", "result_hourly", ["model", "hour"])
    op.create_table(
        "maintenance_cursor",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("last_id", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("maintenance_cursor")
    op.drop_index("ix_result_hourly_model_hour", table_name="result_hourly")
    op.drop_table("result_hourly")
    op.drop_table("telemetry_hourly")
