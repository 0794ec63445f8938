"""control commands applied by a run's attempts (replayed by later attempts)

Revision ID: syncer_0004
Revises: syncer_0003
"""

import sqlalchemy as sa
from alembic import op

revision = "syncer_0004"
down_revision = "syncer_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "syncer_control",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("control_id", sa.String(128), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("tick", sa.Integer, nullable=False, server_default="0"),
        sa.Column("ok", sa.Boolean, nullable=False),
        sa.Column("ack", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("run_id", "control_id", name="uq_syncer_control"),
    )
    op.create_index("ix_syncer_control_run", "syncer_control", ["run_id"])


def downgrade() -> None:
    op.drop_table("syncer_control")
