"""The schema: migrations equal the models, the triggers notify, URLs are normalized."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, pool

from tests.plugins.services import alembic_config
from worker.config import NOTIFY_CHANNEL
from worker.db import (
    Base,
    database_ports,
    psycopg_conninfo,
    redacted_url,
    sqlalchemy_url,
)
from worker.errors import ConfigError

CATALOG_QUERIES = {
    "columns": """
        SELECT column_name, data_type, is_nullable, column_default
        FROM information_schema.columns
        WHERE table_schema = 'public' AND table_name = 'observations'
        ORDER BY column_name
    """,
    "constraints": """
        SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint
        WHERE conrelid = to_regclass('public.observations') ORDER BY conname
    """,
    "indexes": """
        SELECT indexname, indexdef FROM pg_indexes
        WHERE schemaname = 'public' AND tablename = 'observations' ORDER BY indexname
    """,
    "triggers": """
        SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger
        WHERE tgrelid = to_regclass('public.observations') AND NOT tgisinternal
        ORDER BY tgname
    """,
    "row_security": """
        SELECT relname, relrowsecurity, relforcerowsecurity FROM pg_class
        WHERE oid = to_regclass('public.observations')
    """,
    "policies": """
        SELECT policyname, cmd, roles, qual, with_check FROM pg_policies
        WHERE schemaname = 'public' AND tablename = 'observations'
        ORDER BY policyname
    """,
    "functions": """
        SELECT proname, prosrc FROM pg_proc
        WHERE pronamespace = 'public'::regnamespace ORDER BY proname
    """,
}


def catalog(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """What the database says the observations table is made of."""
    with psycopg.connect(psycopg_conninfo(url)) as connection:
        return {
            name: connection.execute(query).fetchall()
            for name, query in CATALOG_QUERIES.items()
        }


def insert_observation(db: psycopg.Connection[Any]) -> uuid.UUID:
    """One row as the app inserts it."""
    row = db.execute(
        "INSERT INTO observations (user_id, bucket, path) VALUES (%s, %s, %s) "
        "RETURNING id",
        (uuid.uuid4(), "photos", "u/1.jpg"),
    ).fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


def test_migrations_produce_the_schema_of_the_models(empty_database_url: str) -> None:
    command.upgrade(alembic_config(empty_database_url), "head")

    engine = create_engine(sqlalchemy_url(empty_database_url), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={"compare_type": True, "compare_server_default": True},
        )
        differences = compare_metadata(context, Base.metadata)
    engine.dispose()

    assert differences == []


def test_migrations_and_create_all_build_the_same_catalog(
    empty_database_url: str, database_url: str, postgres_service: Any
) -> None:
    built = postgres_service.create_database()
    try:
        engine = create_engine(sqlalchemy_url(built), poolclass=pool.NullPool)
        Base.metadata.create_all(engine)
        engine.dispose()

        migrated, from_models = catalog(database_url), catalog(built)
    finally:
        postgres_service.drop_database(built)

    assert migrated == from_models
    assert [name for name, _ in migrated["triggers"]] == [
        "observations_notify_insert",
        "observations_notify_pending",
        "observations_touch_updated_at",
    ]
    assert "observations_status_check" in dict(migrated["constraints"])
    # Plain PostgreSQL: row-level security on, and no Supabase roles to grant to.
    assert migrated["row_security"] == [("observations", True, False)]
    assert migrated["policies"] == []


def test_downgrade_removes_everything_and_upgrade_restores_it(
    database_url: str,
) -> None:
    config = alembic_config(database_url)

    command.downgrade(config, "base")
    emptied = catalog(database_url)
    command.upgrade(config, "head")

    assert emptied == {name: [] for name in CATALOG_QUERIES}
    assert len(catalog(database_url)["triggers"]) == 3


def test_defaults_of_a_row_inserted_as_the_app_does(
    db: psycopg.Connection[Any],
) -> None:
    observation_id = insert_observation(db)

    row = db.execute(
        "SELECT status, pred, error, attempts, timings_ms, created_at, updated_at "
        "FROM observations WHERE id = %s",
        (observation_id,),
    ).fetchone()

    assert row is not None
    status, pred, error, attempts, timings_ms, created_at, updated_at = row
    assert (status, pred, error, attempts, timings_ms) == ("pending", {}, None, 0, {})
    assert created_at == updated_at


def test_status_outside_the_five_is_refused(db: psycopg.Connection[Any]) -> None:
    observation_id = insert_observation(db)

    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute(
            "UPDATE observations SET status = 'finished' WHERE id = %s",
            (observation_id,),
        )


def test_update_moves_updated_at(db: psycopg.Connection[Any]) -> None:
    observation_id = insert_observation(db)

    db.execute(
        "UPDATE observations SET status = 'queued', "
        "updated_at = '2000-01-01T00:00:00Z' WHERE id = %s",
        (observation_id,),
    )
    row = db.execute(
        "SELECT updated_at > created_at FROM observations WHERE id = %s",
        (observation_id,),
    ).fetchone()

    assert row == (True,)


def test_insert_and_return_to_pending_notify_with_the_id_only(
    database_url: str, db: psycopg.Connection[Any]
) -> None:
    with psycopg.connect(psycopg_conninfo(database_url), autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")

        observation_id = insert_observation(db)
        db.execute(
            "UPDATE observations SET status = 'done' WHERE id = %s", (observation_id,)
        )
        db.execute(
            "UPDATE observations SET error = 'x' WHERE id = %s", (observation_id,)
        )
        db.execute(
            "UPDATE observations SET status = 'pending' WHERE id = %s",
            (observation_id,),
        )
        db.execute(
            "UPDATE observations SET status = 'pending' WHERE id = %s",
            (observation_id,),
        )
        payloads = [
            (notify.channel, notify.payload)
            for notify in listener.notifies(timeout=0.5)
        ]

    assert payloads == [(NOTIFY_CHANNEL, str(observation_id))] * 2


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (
            "postgres://u:p@db.example.com:5432/postgres?sslmode=require",
            "postgresql+psycopg://u:p@db.example.com:5432/postgres?sslmode=require",
        ),
        (
            "postgresql://u:p@h/db?sslmode=require&application_name=x",
            "postgresql+psycopg://u:p@h/db?sslmode=require&application_name=x",
        ),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg2://u@h/db", "postgresql+psycopg://u@h/db"),
    ],
)
def test_database_url_gets_the_psycopg_driver(given: str, expected: str) -> None:
    assert sqlalchemy_url(given) == expected
    assert psycopg_conninfo(given) == "postgresql" + expected.removeprefix(
        "postgresql+psycopg"
    )


def test_database_url_of_another_kind_is_refused_without_its_password() -> None:
    with pytest.raises(ConfigError, match="mysql://") as caught:
        sqlalchemy_url("mysql://user:hunter22@h/db")

    assert "hunter22" not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgres://postgres:hunter2 secret@db.example.com/postgres",
        "postgresql://postgres:50%off-secret@db.example.com/postgres",
    ],
)
def test_database_url_libpq_cannot_read_is_refused_without_its_password(
    url: str,
) -> None:
    with pytest.raises(ConfigError, match="percent-encode") as caught:
        psycopg_conninfo(url)

    assert "secret" not in str(caught.value)
    assert caught.value.__context__ is None


def test_redacted_url_and_port() -> None:
    url = "postgres://postgres.ref:s3cret@aws-0-eu.pooler.supabase.com:6543/postgres"

    assert "s3cret" not in redacted_url(url)
    assert redacted_url(url).startswith("postgresql://postgres.ref:***@aws-0-eu")
    assert database_ports(url) == [6543]
    assert database_ports("postgresql://postgres:@/postgres?host=/tmp/x") == []
    assert database_ports("postgresql://u@pooler.example/db?port=6543") == [6543]
    assert database_ports("postgresql://u@h1:5432,h2:6543/db") == [5432, 6543]
