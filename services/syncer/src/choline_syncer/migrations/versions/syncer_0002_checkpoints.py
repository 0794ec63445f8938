"""checkpoints, artifacts and the boxes' S3 endpoints

Revision ID: syncer_0002
Revises: syncer_0001
"""

import sqlalchemy as sa
from alembic import op

revision = "syncer_0002"
down_revision = "syncer_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "syncer_checkpoint",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("prefix", sa.String(512), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False, server_default="periodic"),
        sa.Column("files", sa.Text, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("metrics", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("committed", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("run_id", "attempt", "step", name="uq_syncer_checkpoint_step"),
    )
    op.create_index("ix_syncer_checkpoint_run", "syncer_checkpoint", ["run_id", "step"])
    op.create_table(
        "syncer_artifact",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("key", sa.String(1200), nullable=False),
        sa.Column("bundle", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("run_id", "path", name="uq_syncer_artifact_path"),
    )
    op.create_table(
        "syncer_box_endpoint",
        sa.Column("run_id", sa.String(128), primary_key=True),
        sa.Column("attempt", sa.Integer, primary_key=True),
        sa.Column("box_id", sa.String(128), nullable=True),
        sa.Column("s3_endpoint", sa.String(512), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("syncer_box_endpoint")
    op.drop_table("syncer_artifact")
    op.drop_index("ix_syncer_checkpoint_run", "syncer_checkpoint")
    op.drop_table("syncer_checkpoint")
