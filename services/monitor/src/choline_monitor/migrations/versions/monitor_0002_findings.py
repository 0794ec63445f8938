"""findings and the per-run watch state

Revision ID: monitor_0002
Revises: monitor_0001
"""

import sqlalchemy as sa
from alembic import op

revision = "monitor_0002"
down_revision = "monitor_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "monitor_finding",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=True),
        sa.Column("detector", sa.String(32), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("episode", sa.Integer, nullable=False),
        sa.Column("step", sa.Integer, nullable=True),
        sa.Column("data_ts", sa.Float, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("evidence", sa.Text, nullable=False),
        sa.Column("supersedes", sa.String(32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("run_id", "detector", "episode", name="uq_monitor_finding_episode"),
    )
    op.create_index("ix_monitor_finding_run", "monitor_finding", ["run_id", "data_ts"])
    op.create_index("ix_monitor_finding_unpublished", "monitor_finding", ["published_at"])
    op.create_table(
        "monitor_run",
        sa.Column("run_id", sa.String(128), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False, server_default="0"),
        sa.Column("overrides", sa.Text, nullable=True),
        sa.Column("state", sa.Text, nullable=True),
        sa.Column("closed", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("monitor_run")
    op.drop_index("ix_monitor_finding_unpublished", "monitor_finding")
    op.drop_index("ix_monitor_finding_run", "monitor_finding")
    op.drop_table("monitor_finding")
