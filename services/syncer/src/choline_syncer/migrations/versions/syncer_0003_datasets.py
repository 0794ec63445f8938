"""datasets: verified packs, the chunk index, dataset versions

Revision ID: syncer_0003
Revises: syncer_0002
"""

import sqlalchemy as sa
from alembic import op

revision = "syncer_0003"
down_revision = "syncer_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "syncer_dataset_pack",
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("chunks", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "syncer_dataset_chunk",
        sa.Column("sha", sa.String(64), primary_key=True),
        sa.Column("pack", sa.String(64), primary_key=True),
        sa.Column("pos", sa.BigInteger, nullable=False),
        sa.Column("length", sa.Integer, nullable=False),
    )
    op.create_index("ix_syncer_dataset_chunk_pack", "syncer_dataset_chunk", ["pack"])
    op.create_table(
        "syncer_dataset_version",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("manifest", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("files", sa.Integer, nullable=False),
        sa.Column("chunks", sa.Integer, nullable=False),
        sa.Column("packs", sa.Text, nullable=False),
        sa.Column("source", sa.String(1024), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_syncer_dataset_version_name", "syncer_dataset_version", ["owner", "name", "id"])
    op.create_index("ix_syncer_dataset_version_manifest", "syncer_dataset_version", ["manifest"])


def downgrade() -> None:
    op.drop_index("ix_syncer_dataset_version_manifest", "syncer_dataset_version")
    op.drop_index("ix_syncer_dataset_version_name", "syncer_dataset_version")
    op.drop_table("syncer_dataset_version")
    op.drop_index("ix_syncer_dataset_chunk_pack", "syncer_dataset_chunk")
    op.drop_table("syncer_dataset_chunk")
    op.drop_table("syncer_dataset_pack")
