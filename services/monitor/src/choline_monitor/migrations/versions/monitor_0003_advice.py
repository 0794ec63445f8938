"""the advisor's answers, the monitor's actions, and a per-run policy

Revision ID: monitor_0003
Revises: monitor_0002
"""

import sqlalchemy as sa
from alembic import op

revision = "monitor_0003"
down_revision = "monitor_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "monitor_advice",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("finding_id", sa.String(32), nullable=True),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("question", sa.Text, nullable=True),
        sa.Column("by", sa.String(128), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("source", sa.String(16), nullable=True),
        sa.Column("model", sa.String(200), nullable=True),
        sa.Column("answer", sa.Text, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("context", sa.Text, nullable=True),
        sa.Column("context_tokens", sa.Integer, nullable=True),
        sa.Column("tries", sa.Integer, nullable=False, server_default="0"),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("latency_s", sa.Float, nullable=True),
    )
    op.create_index("ix_monitor_advice_run", "monitor_advice", ["run_id", "created_at"])
    op.create_index("ix_monitor_advice_status", "monitor_advice", ["status"])
    op.create_index("ix_monitor_advice_finding", "monitor_advice", ["finding_id"])
    op.create_table(
        "monitor_action",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("finding_id", sa.String(32), nullable=True),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_monitor_action_run", "monitor_action", ["run_id", "created_at"])
    op.add_column("monitor_run", sa.Column("policy", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("monitor_run") as batch:
        batch.drop_column("policy")
    op.drop_index("ix_monitor_action_run", "monitor_action")
    op.drop_table("monitor_action")
    op.drop_index("ix_monitor_advice_finding", "monitor_advice")
    op.drop_index("ix_monitor_advice_status", "monitor_advice")
    op.drop_index("ix_monitor_advice_run", "monitor_advice")
    op.drop_table("monitor_advice")
