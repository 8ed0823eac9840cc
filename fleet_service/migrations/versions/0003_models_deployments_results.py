"""model releases, deployments, inference results, model state on devices

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 07:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("device") as batch:
        batch.add_column(
            sa.Column("desired_models", sa.JSON(), nullable=False, server_default="[]")
        )
        batch.add_column(
            sa.Column("reported_models", sa.JSON(), nullable=False, server_default="{}")
        )
    op.create_table(
        "model_release",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("runtime", sa.String(length=16), nullable=False),
        sa.Column("release", sa.Integer(), nullable=False),
        sa.Column("signed_manifest", sa.JSON(), nullable=False),
        sa.Column("encryption_key", sa.String(length=64), nullable=True),
        sa.Column("stored_bytes", sa.BigInteger(), nullable=False),
        sa.Column("rollback_of", sa.String(length=32), nullable=True),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name", "release", name="uq_model_release_number"),
    )
    op.create_index("ix_model_release_name", "model_release", ["name"])
    op.create_table(
        "deployment",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("release_id", sa.String(length=32), nullable=False),
        sa.Column("model_name", sa.String(length=64), nullable=False),
        sa.Column("target_tag", sa.String(length=200), nullable=True),
        sa.Column("target_device_ids", sa.JSON(), nullable=True),
        sa.Column("batch_size", sa.Integer(), nullable=False),
        sa.Column("pause_s", sa.Float(), nullable=False),
        sa.Column("max_failure_ratio", sa.Float(), nullable=False),
        sa.Column("canary", sa.JSON(), nullable=True),
        sa.Column("schedules", sa.JSON(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("current_batch", sa.Integer(), nullable=False),
        sa.Column("batch_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_batch_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("detail", sa.String(), nullable=True),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["release_id"], ["model_release.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_deployment_release_id", "deployment", ["release_id"])
    op.create_index("ix_deployment_model_name", "deployment", ["model_name"])
    op.create_index("ix_deployment_state", "deployment", ["state"])
    op.create_table(
        "deployment_target",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("deployment_id", sa.String(length=32), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("batch", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("previous_release_id", sa.String(length=32), nullable=True),
        sa.Column("detail", sa.String(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["deployment_id"], ["deployment.id"]),
        sa.ForeignKeyConstraint(["device_id"], ["device.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("deployment_id", "device_id", name="uq_deployment_target_device"),
    )
    op.create_index("ix_deployment_target_deployment_id", "deployment_target", ["deployment_id"])
    op.create_table(
        "inference_result",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("message_id", sa.String(length=64), nullable=False),
        sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("release", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("runtime", sa.String(length=16), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("input_ref", sa.String(length=500), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=True),
        sa.Column("confidence", sa.Float(), nullable=True),
        sa.Column("scores", sa.JSON(), nullable=True),
        sa.Column("text", sa.String(), nullable=True),
        sa.Column("tokens", sa.Integer(), nullable=True),
        sa.Column("tokens_per_s", sa.Float(), nullable=True),
        sa.Column("error", sa.String(), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["device.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("message_id", name="uq_inference_result_message_id"),
    )
    op.create_index("ix_inference_result_model_time", "inference_result", ["model", "timestamp"])
    op.create_index(
        "ix_inference_result_device_model_time",
        "inference_result",
        ["device_id", "model", "timestamp"],
    )


def downgrade() -> None:
    op.drop_table("inference_result")
    op.drop_table("deployment_target")
    op.drop_table("deployment")
    op.drop_table("model_release")
    with op.batch_alter_table("device") as batch:
        batch.drop_column("reported_models")
        batch.drop_column("desired_models")
