"""users, tokens, submitted runs, run states, and the logs and metrics store

Revision ID: api_0002
Revises: api_0001
"""

import sqlalchemy as sa
from alembic import op

revision = "api_0002"
down_revision = "api_0001"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "api_user",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("is_admin", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "api_token",
        sa.Column("id", sa.String(16), primary_key=True),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("token_hash", name="uq_api_token_hash"),
    )
    op.create_index("ix_api_token_user_id", "api_token", ["user_id"])
    op.create_table(
        "api_run",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("name", sa.String(256), nullable=True),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("client_key", sa.String(128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("owner", "client_key", name="uq_api_run_client_key"),
    )
    op.create_index("ix_api_run_owner", "api_run", ["owner", "created_at"])
    op.create_table(
        "api_run_state",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("attempt", sa.Integer, nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "api_log_line",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stream", sa.String(8), nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.UniqueConstraint("run_id", "attempt", "seq", name="uq_api_log_line"),
    )
    op.create_index("ix_api_log_line_follow", "api_log_line", ["run_id", "id"])
    op.create_table(
        "api_metric_point",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("step", sa.BigInteger, nullable=False),
        sa.Column("value", sa.Float, nullable=True),
        sa.Column("raw", sa.String(8), nullable=True),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("epoch", sa.Integer, nullable=True),
        sa.Column("superseded", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.UniqueConstraint("run_id", "attempt", "seq", "key", name="uq_api_metric_point"),
    )
    op.create_index("ix_api_metric_point_series", "api_metric_point", ["run_id", "key", "step"])


def downgrade() -> None:
    op.drop_index("ix_api_metric_point_series", "api_metric_point")
    op.drop_table("api_metric_point")
    op.drop_index("ix_api_log_line_follow", "api_log_line")
    op.drop_table("api_log_line")
    op.drop_table("api_run_state")
    op.drop_index("ix_api_run_owner", "api_run")
    op.drop_table("api_run")
    op.drop_index("ix_api_token_user_id", "api_token")
    op.drop_table("api_token")
    op.drop_table("api_user")
