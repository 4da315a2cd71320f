"""Row-level security on observations, and the policies of the app's signed-in users.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out, not imported from worker.queries, for the reason 0001 gives.
_CREATE_OBJECTS = (
    "ALTER TABLE observations ENABLE ROW LEVEL SECURITY",
    """DO $$
BEGIN
    IF to_regrole('authenticated') IS NOT NULL
        AND to_regprocedure('auth.uid()') IS NOT NULL THEN
        CREATE POLICY observations_insert_own ON observations
            FOR INSERT TO authenticated
            WITH CHECK (user_id = (SELECT auth.uid()) AND status = 'pending');
        CREATE POLICY observations_select_own ON observations
            FOR SELECT TO authenticated
            USING (user_id = (SELECT auth.uid()));
    END IF;
END;
$$""",
)

_DROP_OBJECTS = (
    "DROP POLICY IF EXISTS observations_select_own ON observations",
    "DROP POLICY IF EXISTS observations_insert_own ON observations",
    "ALTER TABLE observations DISABLE ROW LEVEL SECURITY",
)


def upgrade() -> None:
    """Turn row-level security on; on Supabase, let observers add and read their own."""
    for statement in _CREATE_OBJECTS:
        op.execute(statement)


def downgrade() -> None:
    """Drop the policies and turn row-level security off."""
    for statement in _DROP_OBJECTS:
        op.execute(statement)
