"""The observations table, its indexes and the triggers that notify the listener.

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The SQL of the database objects as this revision installs them. It is written out
# here, not imported from worker.queries, so that editing the live code can never
# change what an old revision does; test_schema checks that both still agree.
_CREATE_OBJECTS = (
    """CREATE OR REPLACE FUNCTION hyacinth_notify_observation() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Only the id: NOTIFY payloads are capped at 8000 bytes and are not trusted.
    PERFORM pg_notify('hyacinth_observations', NEW.id::text);
    RETURN NULL;
END;
$$""",
    """CREATE TRIGGER observations_notify_insert
AFTER INSERT ON observations
FOR EACH ROW WHEN (NEW.status = 'pending')
EXECUTE FUNCTION hyacinth_notify_observation()""",
    """CREATE TRIGGER observations_notify_pending
AFTER UPDATE OF status ON observations
FOR EACH ROW WHEN (NEW.status = 'pending' AND OLD.status IS DISTINCT FROM 'pending')
EXECUTE FUNCTION hyacinth_notify_observation()""",
    """CREATE OR REPLACE FUNCTION hyacinth_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$""",
    """CREATE TRIGGER observations_touch_updated_at
BEFORE UPDATE ON observations
FOR EACH ROW EXECUTE FUNCTION hyacinth_touch_updated_at()""",
)

_DROP_OBJECTS = (
    "DROP TRIGGER IF EXISTS observations_touch_updated_at ON observations",
    "DROP TRIGGER IF EXISTS observations_notify_pending ON observations",
    "DROP TRIGGER IF EXISTS observations_notify_insert ON observations",
    "DROP FUNCTION IF EXISTS hyacinth_touch_updated_at()",
    "DROP FUNCTION IF EXISTS hyacinth_notify_observation()",
)


def _timestamp(name: str, *, nullable: bool = True) -> sa.Column[object]:
    default = sa.text("now()") if not nullable else None
    return sa.Column(
        name, sa.DateTime(timezone=True), nullable=nullable, server_default=default
    )


def upgrade() -> None:
    """Create observations, its indexes, and the notify and updated_at triggers."""
    op.create_table(
        "observations",
        sa.Column(
            "id",
            sa.Uuid(),
            primary_key=True,
            server_default=sa.text("gen_random_uuid()"),
        ),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("bucket", sa.Text(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column(
            "status",
            sa.Text(),
            nullable=False,
            server_default=sa.text("'pending'::text"),
        ),
        sa.Column(
            "pred",
            postgresql.JSONB(),
            nullable=False,
            server_default=sa.text("'{}'::jsonb"),
        ),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column(
            "attempts", sa.Integer(), nullable=False, server_default=sa.text("0")
        ),
        sa.Column(
            "lost_leases", sa.Integer(), nullable=False, server_default=sa.text("0")
        ),
        sa.Column(
            "timings_ms",
            postgresql.JSONB(),
            nullable=False,
            server_default=sa.text("'{}'::jsonb"),
        ),
        _timestamp("created_at", nullable=False),
        _timestamp("updated_at", nullable=False),
        _timestamp("queued_at"),
        _timestamp("started_at"),
        _timestamp("heartbeat_at"),
        _timestamp("finished_at"),
        sa.CheckConstraint(
            "status IN ('pending', 'queued', 'processing', 'done', 'failed')",
            name="observations_status_check",
        ),
    )
    op.create_index(
        "observations_pending_idx",
        "observations",
        ["created_at"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        "observations_in_flight_idx",
        "observations",
        ["status"],
        postgresql_where=sa.text("status IN ('queued', 'processing')"),
    )
    op.create_index("observations_user_id_idx", "observations", ["user_id"])

    for statement in _CREATE_OBJECTS:
        op.execute(statement)


def downgrade() -> None:
    """Drop everything upgrade created."""
    for statement in _DROP_OBJECTS:
        op.execute(statement)

    op.drop_table("observations")
