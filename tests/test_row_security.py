"""Row-level security: what the app's users may do to observations through Supabase.

Supabase's API runs each request as the role `anon` or `authenticated`, with the
user's id behind `auth.uid()`. The fixture below builds that much of Supabase in a
plain database (the two roles, the `auth` schema, the table grants Supabase gives
them by default) and migrates it, so the policies of migration 0002 are the ones
under test.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from alembic import command

from tests.plugins.services import PostgresService, alembic_config
from worker.config import NOTIFY_CHANNEL
from worker.db import psycopg_conninfo

# Roles belong to the server, not to a database: created once, left for the next run.
SUPABASE_ROLES = """
DO $$
BEGIN
    CREATE ROLE anon NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END;
$$;
DO $$
BEGIN
    CREATE ROLE authenticated NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END;
$$
"""

SUPABASE_AUTH_SCHEMA = """
CREATE SCHEMA auth;
CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $$
    SELECT nullif(current_setting('request.jwt.claim.sub', true), '')::uuid
$$;
GRANT USAGE ON SCHEMA auth TO anon, authenticated
"""

SUPABASE_TABLE_GRANTS = "GRANT ALL ON observations TO anon, authenticated"


@pytest.fixture
def supabase_database_url(postgres_service: PostgresService) -> Iterator[str]:
    """A fresh database shaped like a Supabase project's, migrated to head."""
    url = postgres_service.create_database()
    with psycopg.connect(psycopg_conninfo(url), autocommit=True) as connection:
        connection.execute(SUPABASE_ROLES)
        connection.execute(SUPABASE_AUTH_SCHEMA)

    command.upgrade(alembic_config(url), "head")

    with psycopg.connect(psycopg_conninfo(url), autocommit=True) as connection:
        connection.execute(SUPABASE_TABLE_GRANTS)
    yield url
    postgres_service.drop_database(url)


@pytest.fixture
def owner(supabase_database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """The connection the listener and workers have: the table's owner."""
    conninfo = psycopg_conninfo(supabase_database_url)
    with psycopg.connect(conninfo, autocommit=True) as connection:
        yield connection


def api_connection(
    database_url: str, role: str, user_id: uuid.UUID | None = None
) -> psycopg.Connection[Any]:
    """A connection acting as Supabase's API does for `role` and the signed-in user."""
    connection = psycopg.connect(psycopg_conninfo(database_url), autocommit=True)
    connection.execute(f"SET ROLE {role}")
    if user_id is not None:
        connection.execute(
            "SELECT set_config('request.jwt.claim.sub', %s, false)", (str(user_id),)
        )
    return connection


def insert(
    db: psycopg.Connection[Any], user_id: uuid.UUID, status: str = "pending"
) -> Any:
    """Insert an observation of `user_id` as the app does; returns its id."""
    row = db.execute(
        "INSERT INTO observations (user_id, bucket, path, status) "
        "VALUES (%s, 'photos', %s, %s) RETURNING id",
        (user_id, f"{user_id}/1.jpg", status),
    ).fetchone()
    assert row is not None
    return row[0]


def test_an_observer_adds_own_rows_and_reads_only_those(
    supabase_database_url: str, owner: psycopg.Connection[Any]
) -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    insert(owner, bob)

    with api_connection(supabase_database_url, "authenticated", alice) as app:
        alices_row = insert(app, alice)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level"):
            insert(app, bob)
        visible = app.execute("SELECT id FROM observations").fetchall()

    assert visible == [(alices_row,)]


def test_an_observer_cannot_write_results_or_touch_rows_after_insert(
    supabase_database_url: str, owner: psycopg.Connection[Any]
) -> None:
    alice = uuid.uuid4()

    with api_connection(supabase_database_url, "authenticated", alice) as app:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level"):
            insert(app, alice, status="done")
        row_id = insert(app, alice)
        updated = app.execute(
            "UPDATE observations SET status = 'done', pred = '{\"x\": 1}'"
        ).rowcount
        deleted = app.execute("DELETE FROM observations").rowcount

    row = owner.execute(
        "SELECT status, pred FROM observations WHERE id = %s", (row_id,)
    ).fetchone()
    assert (updated, deleted) == (0, 0)
    assert row == ("pending", {})


def test_the_anonymous_role_sees_and_adds_nothing(
    supabase_database_url: str, owner: psycopg.Connection[Any]
) -> None:
    insert(owner, uuid.uuid4())

    with api_connection(supabase_database_url, "anon") as anonymous:
        visible = anonymous.execute("SELECT count(*) FROM observations").fetchone()
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level"):
            insert(anonymous, uuid.uuid4())

    assert visible == (0,)


def test_an_observers_insert_notifies_the_listener_which_sees_the_row(
    supabase_database_url: str, owner: psycopg.Connection[Any]
) -> None:
    alice = uuid.uuid4()
    owner.execute(f"LISTEN {NOTIFY_CHANNEL}")

    with api_connection(supabase_database_url, "authenticated", alice) as app:
        row_id = insert(app, alice)
    payloads = [notify.payload for notify in owner.notifies(timeout=0.5)]
    claimed = owner.execute(
        "UPDATE observations SET status = 'queued' WHERE id = %s", (row_id,)
    ).rowcount

    assert payloads == [str(row_id)]
    assert claimed == 1


def test_downgrade_removes_the_policies_and_upgrade_restores_them(
    supabase_database_url: str, owner: psycopg.Connection[Any]
) -> None:
    policies = "SELECT policyname FROM pg_policies ORDER BY policyname"
    config = alembic_config(supabase_database_url)

    command.downgrade(config, "0001")
    after_downgrade = owner.execute(policies).fetchall()
    command.upgrade(config, "head")

    assert after_downgrade == []
    assert owner.execute(policies).fetchall() == [
        ("observations_insert_own",),
        ("observations_select_own",),
    ]
