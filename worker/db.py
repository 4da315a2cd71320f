"""The observations table as SQLAlchemy models, and DATABASE_URL for each driver."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import (
    CheckConstraint,
    DateTime,
    Engine,
    Index,
    Integer,
    Text,
    Uuid,
    create_engine,
    event,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.schema import DDL

from worker import queries
from worker.config import Settings
from worker.errors import ConfigError

#: Every status a row can be in, in the order a row moves through them.
STATUSES = ("pending", "queued", "processing", "done", "failed")

#: Statuses a row does not leave without an operator's reprocess.
FINAL_STATUSES = ("done", "failed")

_SCHEMES = {
    "postgres": "postgresql",
    "postgresql": "postgresql",
    "postgresql+psycopg": "postgresql",
    "postgresql+psycopg2": "postgresql",
}

#: Sent with every connection so a stuck socket is noticed in about a minute
#: instead of the kernel's two hours.
KEEPALIVE_ARGS: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}


class Base(DeclarativeBase):
    """Declarative base of the worker's tables."""


class Observation(Base):
    """One photo sent by an observer, and what the models found in it."""

    __tablename__ = "observations"

    id: Mapped[uuid.UUID] = mapped_column(
        Uuid, primary_key=True, server_default=text("gen_random_uuid()")
    )
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    bucket: Mapped[str] = mapped_column(Text, nullable=False)
    path: Mapped[str] = mapped_column(Text, nullable=False)
    status: Mapped[str] = mapped_column(
        Text, nullable=False, server_default=text("'pending'::text")
    )
    pred: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, server_default=text("'{}'::jsonb")
    )
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(
        Integer, nullable=False, server_default=text("0")
    )
    #: Times a worker died holding this row (its lease expired); reset on reprocess.
    lost_leases: Mapped[int] = mapped_column(
        Integer, nullable=False, server_default=text("0")
    )
    timings_ms: Mapped[dict[str, float]] = mapped_column(
        JSONB, nullable=False, server_default=text("'{}'::jsonb")
    )
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=text("now()")
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=text("now()")
    )
    queued_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )
    started_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )
    heartbeat_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )
    finished_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )

    __table_args__ = (
        CheckConstraint(
            "status IN ('pending', 'queued', 'processing', 'done', 'failed')",
            name="observations_status_check",
        ),
        # The listener's claim reads the oldest pending rows; only those are indexed.
        Index(
            "observations_pending_idx",
            "created_at",
            postgresql_where=text("status = 'pending'"),
        ),
        # The safety sweep looks only at rows in flight, a handful at any time.
        Index(
            "observations_in_flight_idx",
            "status",
            postgresql_where=text("status IN ('queued', 'processing')"),
        ),
        Index("observations_user_id_idx", "user_id"),
    )


# The same triggers the migrations install, for schemas built with create_all.
for _statement in queries.SCHEMA_OBJECTS_CREATE:
    event.listen(Observation.__table__, "after_create", DDL(_statement))  # type: ignore[no-untyped-call]


def _split(database_url: str) -> tuple[str, str]:
    """The normalized scheme and the rest of the URL, or an error naming the scheme."""
    scheme, separator, rest = database_url.strip().partition("://")
    normalized = _SCHEMES.get(scheme.lower())
    if not separator or normalized is None:
        raise ConfigError(
            f"DATABASE_URL must start with postgres:// or postgresql://, not "
            f"{scheme.lower() + '://' if separator else 'something else'}: use the "
            "connection string from the database provider"
        )
    _check_parses(rest)
    return normalized, rest


def _check_parses(rest: str) -> None:
    """Refuse a URL libpq cannot read, without quoting the password it holds."""
    try:
        conninfo_to_dict(f"postgresql://{rest}")
        return
    except psycopg.ProgrammingError as error:
        reason = " ".join(str(error).split())

    # Raised out here, so that the error quoting the password is not its context.
    try:
        password = urlsplit(f"postgresql://{rest}").password
    except ValueError:
        password = None
    if password:
        reason = reason.replace(password, "***")
    raise ConfigError(
        f"DATABASE_URL cannot be read ({reason}): percent-encode spaces and "
        "the characters @ : / % # ? in the user name and password"
    )


def psycopg_conninfo(database_url: str) -> str:
    """DATABASE_URL as a libpq URL for psycopg's own connections."""
    scheme, rest = _split(database_url)
    return f"{scheme}://{rest}"


def sqlalchemy_url(database_url: str) -> str:
    """DATABASE_URL with the psycopg 3 driver named, query parameters kept."""
    _, rest = _split(database_url)
    return f"postgresql+psycopg://{rest}"


def database_ports(database_url: str) -> list[int]:
    """Every TCP port DATABASE_URL names, as libpq reads it (`?port=`, multi-host)."""
    port_list = conninfo_to_dict(psycopg_conninfo(database_url)).get("port") or ""
    return [int(port) for port in str(port_list).split(",") if port.strip().isdigit()]


def redacted_url(database_url: str) -> str:
    """DATABASE_URL without its password, fit for logs and error messages."""
    parts = urlsplit(psycopg_conninfo(database_url))
    if parts.password is None:
        return urlunsplit(parts)
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def make_engine(settings: Settings, *, application_name: str) -> Engine:
    """A pooled engine on DATABASE_URL for workers and commands."""
    url = sqlalchemy_url(settings.require_database_url())

    # Workers may sit behind a transaction pooler (port 6543 on Supabase), where
    # server-side prepared statements break; psycopg prepares none with None.
    connect_args: dict[str, Any] = {
        **KEEPALIVE_ARGS,
        "application_name": application_name,
        "connect_timeout": 10,
        "prepare_threshold": None,
    }
    return create_engine(
        url,
        connect_args=connect_args,
        pool_pre_ping=True,
        pool_size=4,
        max_overflow=8,
        pool_recycle=1800,
    )
