"""runs, attempts, boxes, schedules

Revision ID: provisioner_0002
Revises: provisioner_0001
"""

import sqlalchemy as sa
from alembic import op

revision = "provisioner_0002"
down_revision = "provisioner_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(128), nullable=False, index=True),
        sa.Column("name", sa.String(256)),
        sa.Column("spec_json", sa.Text, nullable=False),
        sa.Column("state", sa.String(32), nullable=False, index=True),
        sa.Column("reason", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("retries_used", sa.Integer, nullable=False, server_default="0"),
        sa.Column("lost_hosts", sa.Text, nullable=False, server_default="[]"),
        sa.Column("pending_action", sa.String(32)),
        sa.Column("start_at", sa.DateTime(timezone=True)),
        sa.Column("cost", sa.Float, nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_owner", sa.String(64)),
        sa.Column("lease_until", sa.DateTime(timezone=True)),
        sa.Column("version", sa.Integer, nullable=False, server_default="1"),
    )
    op.create_table(
        "attempts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(64), nullable=False, index=True),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("box_id", sa.String(64)),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("running_at", sa.DateTime(timezone=True)),
        sa.Column("ended_at", sa.DateTime(timezone=True)),
        sa.Column("end_reason", sa.Text),
        sa.Column("exit_code", sa.Integer),
        sa.Column("traceback_tail", sa.Text),
        sa.Column("resumed_from_step", sa.Integer),
        sa.Column("last_step", sa.Integer),
        sa.Column("cost", sa.Float, nullable=False, server_default="0"),
        sa.UniqueConstraint("run_id", "n", name="uq_attempt_run_n"),
    )
    op.create_table(
        "boxes",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("run_id", sa.String(64), nullable=False, index=True),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("state", sa.String(32), nullable=False, index=True),
        sa.Column("instance_id", sa.String(128)),
        sa.Column("offer_id", sa.String(128)),
        sa.Column("host_id", sa.String(256)),
        sa.Column("price_per_hour", sa.Float, nullable=False, server_default="0"),
        sa.Column("ssh_host", sa.String(256)),
        sa.Column("ssh_port", sa.Integer),
        sa.Column("ssh_user", sa.String(128)),
        sa.Column("workdir", sa.Text),
        sa.Column("nats_port", sa.Integer),
        sa.Column("s3_port", sa.Integer),
        sa.Column("pid", sa.Integer),
        sa.Column("reason", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ready_at", sa.DateTime(timezone=True)),
        sa.Column("destroyed_at", sa.DateTime(timezone=True)),
        sa.Column("last_heartbeat_at", sa.DateTime(timezone=True)),
        sa.Column("version", sa.Integer, nullable=False, server_default="1"),
        sa.UniqueConstraint("run_id", "attempt", name="uq_box_run_attempt"),
    )
    op.create_table(
        "schedules",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("start_at", sa.DateTime(timezone=True)),
        sa.Column("max_price", sa.Float),
        sa.Column("last_checked_at", sa.DateTime(timezone=True)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    for table in ("schedules", "boxes", "attempts", "runs"):
        op.drop_table(table)
