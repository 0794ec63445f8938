"""baseline: the deploy service's schema starts here

Revision ID: deploy_0001
Revises:
"""

revision = "deploy_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
