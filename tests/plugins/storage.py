"""Fixtures: storage, a local folder and a Supabase Storage server in a thread."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.supabase_fake import FakeSupabaseStorage


@pytest.fixture(scope="session")
def supabase_storage_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[FakeSupabaseStorage]:
    """A Supabase Storage REST server in a thread, with `.url`, `.key`, `.root`."""
    key = "test-service-role-" + secrets.token_hex(16)
    server = FakeSupabaseStorage(tmp_path_factory.mktemp("supabase-storage"), key)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def local_storage_dir(tmp_path: Path) -> Path:
    """An empty LOCAL_STORAGE_DIR for one test."""
    folder = tmp_path / "storage"
    folder.mkdir()
    return folder
