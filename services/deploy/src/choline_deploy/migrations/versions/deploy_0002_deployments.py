"""deployments and their replicas

Revision ID: deploy_0002
Revises: deploy_0001
"""

import sqlalchemy as sa
from alembic import op

revision = "deploy_0002"
down_revision = "deploy_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deploy_deployment",
        sa.Column("owner", sa.String(128), primary_key=True),
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("previous_version", sa.Integer, nullable=True),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("config", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "deploy_replica",
        sa.Column("replica_id", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("url", sa.String(512), nullable=True),
        sa.Column("pid", sa.Integer, nullable=True),
        sa.Column("box_id", sa.String(128), nullable=True),
        sa.Column("restarts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_deploy_replica_deployment", "deploy_replica", ["owner", "name"])


def downgrade() -> None:
    op.drop_table("deploy_replica")
    op.drop_table("deploy_deployment")
