"""metric rollups, attempts read model, webhooks and their deliveries

Revision ID: api_0003
Revises: api_0002
"""

import sqlalchemy as sa
from alembic import op

revision = "api_0003"
down_revision = "api_0002"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    # where each attempt resumed from (AttemptStarted): decides which points are superseded
    op.create_table(
        "api_attempt",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("attempt", sa.Integer, primary_key=True),
        sa.Column("resumed_from_step", sa.BigInteger, nullable=False),
        sa.Column("box_id", sa.String(64), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    )
    # min/max/last/count per (run, key, resolution, bucket of 16^k steps), superseded points excluded
    op.create_table(
        "api_metric_rollup",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("res", sa.Integer, primary_key=True),
        sa.Column("bucket", sa.BigInteger, primary_key=True),
        sa.Column("n", sa.BigInteger, nullable=False),
        sa.Column("nonfinite", sa.BigInteger, nullable=False),
        sa.Column("vmin", sa.Float, nullable=True),
        sa.Column("vmax", sa.Float, nullable=True),
        sa.Column("first_step", sa.BigInteger, nullable=False),
        sa.Column("last_step", sa.BigInteger, nullable=False),
        sa.Column("last_attempt", sa.Integer, nullable=False),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
        sa.Column("last_value", sa.Float, nullable=True),
        sa.Column("last_raw", sa.String(8), nullable=True),
        sqlite_with_rowid=False,
    )
    # run events the webhooks need to tell a recovery from a start
    with op.batch_alter_table("api_run_state") as batch:
        batch.add_column(sa.Column("ever_running", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("recovering", sa.Boolean, nullable=False, server_default=sa.false()))
    op.create_table(
        "api_webhook",
        sa.Column("id", sa.String(16), primary_key=True),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("url_enc", sa.Text, nullable=False),
        sa.Column("url_display", sa.String(300), nullable=False),
        sa.Column("secret_enc", sa.Text, nullable=False),
        sa.Column("events", sa.Text, nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("description", sa.String(256), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_api_webhook_owner", "api_webhook", ["owner"])
    op.create_table(
        "api_webhook_delivery",
        sa.Column("id", sa.String(16), primary_key=True),
        sa.Column("webhook_id", sa.String(16), nullable=False),
        sa.Column("event_id", sa.String(128), nullable=False),
        sa.Column("event_type", sa.String(32), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("state", sa.String(12), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status", sa.Integer, nullable=True),
        sa.Column("last_error", sa.String(300), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("webhook_id", "event_id", name="uq_api_webhook_delivery_event"),
    )
    op.create_index("ix_api_webhook_delivery_due", "api_webhook_delivery", ["state", "next_at"])
    op.create_index("ix_api_webhook_delivery_hook", "api_webhook_delivery", ["webhook_id", "created_at"])
    op.create_table(
        "api_webhook_attempt",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("delivery_id", sa.String(16), nullable=False),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.Integer, nullable=True),
        sa.Column("error", sa.String(300), nullable=True),
        sa.Column("duration_ms", sa.Integer, nullable=False),
    )
    op.create_index("ix_api_webhook_attempt_delivery", "api_webhook_attempt", ["delivery_id", "n"])


def downgrade() -> None:
    op.drop_index("ix_api_webhook_attempt_delivery", "api_webhook_attempt")
    op.drop_table("api_webhook_attempt")
    op.drop_index("ix_api_webhook_delivery_hook", "api_webhook_delivery")
    op.drop_index("ix_api_webhook_delivery_due", "api_webhook_delivery")
    op.drop_table("api_webhook_delivery")
    op.drop_index("ix_api_webhook_owner", "api_webhook")
    op.drop_table("api_webhook")
    with op.batch_alter_table("api_run_state") as batch:
        batch.drop_column("recovering")
        batch.drop_column("ever_running")
    op.drop_table("api_metric_rollup")
    op.drop_table("api_attempt")
