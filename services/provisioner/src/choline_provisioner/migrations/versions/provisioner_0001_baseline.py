"""baseline: the provisioner service's schema starts here

Revision ID: provisioner_0001
Revises:
"""

revision = "provisioner_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
