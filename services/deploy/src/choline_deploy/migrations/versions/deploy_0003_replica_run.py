"""a replica on a rented box records its serving run

Revision ID: deploy_0003
Revises: deploy_0002
"""

import sqlalchemy as sa
from alembic import op

revision = "deploy_0003"
down_revision = "deploy_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deploy_replica") as batch:
        batch.add_column(sa.Column("run_id", sa.String(128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deploy_replica") as batch:
        batch.drop_column("run_id")
