"""model versions (bundles registered from successful runs or pushed)

Revision ID: syncer_0005
Revises: syncer_0004
"""

import sqlalchemy as sa
from alembic import op

revision = "syncer_0005"
down_revision = "syncer_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "syncer_model",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("key", sa.String(1200), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("run_id", sa.String(128), nullable=True),
        sa.Column("source", sa.String(32), nullable=True),
        sa.Column("card", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("owner", "name", "version", name="uq_syncer_model_version"),
        sa.UniqueConstraint("owner", "name", "sha256", name="uq_syncer_model_bytes"),
    )
    op.create_index("ix_syncer_model_owner_name", "syncer_model", ["owner", "name"])


def downgrade() -> None:
    op.drop_table("syncer_model")
