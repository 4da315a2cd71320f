"""Storage: the same behaviour from the local folder and from Supabase Storage."""

from __future__ import annotations

import logging
import socket
import threading
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.supabase_fake import FakeSupabaseStorage
from worker.config import Settings
from worker.errors import (
    ConfigError,
    HyacinthError,
    MissingObjectError,
    ObjectExistsError,
    StorageError,
    StoragePathError,
    StorageRefusedError,
)
from worker.storage import LocalStorage, Storage, open_storage
from worker.supabase_storage import SupabaseStorage

#: Every byte value and every kind of line ending, so no layer may mangle them.
PAYLOAD = bytes(range(256)) + b"\r\n\n\r--boundary\r\n\r\n" + bytes(range(255, -1, -1))


@dataclass
class Backend:
    """A Storage under test, a fresh bucket, and where its objects land on disk."""

    storage: Storage
    bucket: str
    files_root: Path
    server: FakeSupabaseStorage | None

    def stored_file(self, path: str) -> Path:
        """The file holding the object at `path`."""
        return self.files_root / self.bucket / path


def supabase_settings(server: FakeSupabaseStorage, **overrides: object) -> Settings:
    """Settings pointing at the test server, with quick retries."""
    values: dict[str, object] = {
        "supabase_url": server.url,
        "supabase_service_role_key": server.key,
        "storage_retries": 3,
        "storage_retry_backoff_ms": 1,
        "storage_timeout_s": 2.0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def supabase_server(
    supabase_storage_server: FakeSupabaseStorage,
) -> Iterator[FakeSupabaseStorage]:
    """The session's server with no pending faults and an empty request log."""
    supabase_storage_server.reset()
    yield supabase_storage_server
    supabase_storage_server.reset()


@pytest.fixture
def supabase_storage(supabase_server: FakeSupabaseStorage) -> Iterator[SupabaseStorage]:
    """A SupabaseStorage talking to the test server."""
    storage = SupabaseStorage.from_settings(supabase_settings(supabase_server))
    yield storage
    storage.close()


@pytest.fixture
def bucket() -> str:
    """A bucket name no other test uses."""
    return f"bucket-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["local", "supabase"])
def backend(
    request: pytest.FixtureRequest, local_storage_dir: Path, bucket: str
) -> Backend:
    """Each behaviour test runs once per backend."""
    if request.param == "local":
        storage = open_storage(Settings(local_storage_dir=str(local_storage_dir)))
        return Backend(storage, bucket, local_storage_dir, None)

    server: FakeSupabaseStorage = request.getfixturevalue("supabase_server")
    storage = request.getfixturevalue("supabase_storage")
    return Backend(storage, bucket, server.root, server)


def test_open_storage_picks_the_backend_from_settings(
    local_storage_dir: Path, supabase_storage_server: FakeSupabaseStorage
) -> None:
    local = open_storage(Settings(local_storage_dir=str(local_storage_dir)))
    remote = open_storage(supabase_settings(supabase_storage_server))

    assert (local.backend, remote.backend) == ("local", "supabase")
    assert isinstance(local, LocalStorage)
    assert isinstance(remote, SupabaseStorage)


@pytest.mark.parametrize("path", ["photos/2024/a b.jpg", "ünï cödé/x+y=z;@,?#.png"])
def test_round_trip_keeps_every_byte(backend: Backend, path: str) -> None:
    backend.storage.upload(backend.bucket, path, PAYLOAD, content_type="image/jpeg")

    assert backend.storage.download(backend.bucket, path) == PAYLOAD
    assert backend.stored_file(path).read_bytes() == PAYLOAD
    assert backend.storage.list(backend.bucket, path.split("/")[0]) == [
        path.split("/")[1]
    ]


def test_empty_object_round_trips(backend: Backend) -> None:
    backend.storage.upload(backend.bucket, "empty.bin", b"", content_type="text/plain")

    assert backend.storage.download(backend.bucket, "empty.bin") == b""


def test_overwrite_is_refused_without_upsert(backend: Backend) -> None:
    backend.storage.upload(backend.bucket, "meta.json", b"first", content_type="a/b")

    with pytest.raises(ObjectExistsError, match=r"meta\.json"):
        backend.storage.upload(
            backend.bucket, "meta.json", b"second", content_type="a/b"
        )

    assert backend.storage.download(backend.bucket, "meta.json") == b"first"


def test_overwrite_is_allowed_with_upsert(backend: Backend) -> None:
    backend.storage.upload(backend.bucket, "meta.json", b"first", content_type="a/b")

    backend.storage.upload(
        backend.bucket, "meta.json", b"second", content_type="a/b", upsert=True
    )

    assert backend.storage.download(backend.bucket, "meta.json") == b"second"


def test_upsert_creates_a_missing_object(backend: Backend) -> None:
    backend.storage.upload(
        backend.bucket, "new/one.txt", b"made", content_type="text/plain", upsert=True
    )

    assert backend.storage.download(backend.bucket, "new/one.txt") == b"made"


def test_concurrent_creates_of_one_path_have_one_winner(backend: Backend) -> None:
    outcomes: list[str] = []
    lock = threading.Lock()

    def create(number: int) -> None:
        try:
            backend.storage.upload(
                backend.bucket, "race.bin", b"writer %d" % number, content_type="a/b"
            )
            outcome = "created"
        except ObjectExistsError:
            outcome = "refused"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=create, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(outcomes) == ["created"] + ["refused"] * 5
    assert backend.storage.download(backend.bucket, "race.bin").startswith(b"writer ")


def test_list_gives_files_and_folders_directly_under_a_prefix(
    backend: Backend,
) -> None:
    for path in (
        "presence/1.0.0/presence_mobilenetv2.pt",
        "presence/1.0.0/model_meta.json",
        "presence/1.10.0/model_meta.json",
        "segmentation/1.0.1/model_meta.json",
        "readme.txt",
    ):
        backend.storage.upload(backend.bucket, path, b"x", content_type="a/b")

    storage, bucket = backend.storage, backend.bucket
    assert storage.list(bucket) == ["presence", "readme.txt", "segmentation"]
    assert storage.list(bucket, "presence") == ["1.0.0", "1.10.0"]
    assert storage.list(bucket, "presence/") == ["1.0.0", "1.10.0"]
    assert storage.list(bucket, "presence/1.0.0") == [
        "model_meta.json",
        "presence_mobilenetv2.pt",
    ]
    assert storage.list(bucket, "absent") == []
    assert storage.list(f"{bucket}-never-written") == []


def test_list_reads_past_one_page(backend: Backend) -> None:
    names = [f"mask-{number:03d}.png" for number in range(105)]
    for name in names:
        backend.storage.upload(backend.bucket, f"masks/{name}", b"", content_type="a/b")

    assert backend.storage.list(backend.bucket, "masks") == names


def test_exists(backend: Backend) -> None:
    backend.storage.upload(backend.bucket, "a/b.txt", b"x", content_type="text/plain")

    assert backend.storage.exists(backend.bucket, "a/b.txt")
    assert not backend.storage.exists(backend.bucket, "a/c.txt")
    assert not backend.storage.exists(backend.bucket, "a")


def test_fingerprint_changes_when_the_object_is_written_anew(
    backend: Backend,
) -> None:
    storage, bucket = backend.storage, backend.bucket
    storage.upload(bucket, "m/w.pt", b"first", content_type="x")

    first = storage.fingerprint(bucket, "m/w.pt")
    again = storage.fingerprint(bucket, "m/w.pt")
    storage.upload(bucket, "m/w.pt", b"second", content_type="x", upsert=True)
    rewritten = storage.fingerprint(bucket, "m/w.pt")

    assert first == again
    assert rewritten != first
    with pytest.raises(MissingObjectError):
        storage.fingerprint(bucket, "m/nothing.pt")


def test_missing_object_is_a_permanent_error_naming_it(backend: Backend) -> None:
    with pytest.raises(MissingObjectError, match=r"nowhere/photo\.jpg") as caught:
        backend.storage.download(backend.bucket, "nowhere/photo.jpg")

    assert not caught.value.transient


def test_missing_object_is_asked_for_once(
    supabase_server: FakeSupabaseStorage, supabase_storage: SupabaseStorage, bucket: str
) -> None:
    with pytest.raises(MissingObjectError):
        supabase_storage.download(bucket, "gone.jpg")

    assert len(supabase_server.requests("GET", f"{bucket}/gone.jpg")) == 1


def test_a_missing_bucket_is_refused_once_and_says_to_create_it(
    supabase_server: FakeSupabaseStorage,
    supabase_storage: SupabaseStorage,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(supabase_server, "buckets", {"photos"})

    with pytest.raises(StorageRefusedError, match=f"no bucket '{bucket}'") as read:
        supabase_storage.download(bucket, "gone.jpg")
    with pytest.raises(StorageRefusedError, match="STORAGE_BUCKET_MASKS") as write:
        supabase_storage.upload(bucket, "m.png", b"png", content_type="image/png")

    assert not read.value.transient and not write.value.transient
    assert "create it" in str(read.value)
    assert len(supabase_server.requests("GET", f"{bucket}/gone.jpg")) == 1


@pytest.mark.parametrize(
    "path",
    [
        "../escape.txt",
        "a/../../escape.txt",
        "%2e%2e/escape.txt",
        "/etc/passwd",
        "",
        "a\x00b",
        "a//b",
        "a\\..\\b",
    ],
)
def test_paths_leaving_the_bucket_are_refused(backend: Backend, path: str) -> None:
    with pytest.raises(StoragePathError, match="not allowed") as caught:
        backend.storage.upload(backend.bucket, path, b"x", content_type="a/b")

    assert not caught.value.transient
    assert repr(path)[1:-1] in str(caught.value)
    with pytest.raises(StoragePathError):
        backend.storage.download(backend.bucket, path)
    assert not (backend.files_root / "escape.txt").exists()
    assert not (backend.files_root.parent / "escape.txt").exists()


@pytest.mark.parametrize("prefix", ["../", "presence/../..", "/", "/presence"])
def test_list_prefixes_leaving_the_bucket_are_refused(
    backend: Backend, prefix: str
) -> None:
    with pytest.raises(StoragePathError, match="list prefix"):
        backend.storage.list(backend.bucket, prefix)


@pytest.mark.parametrize("bucket_name", ["", "..", "a/b"])
def test_bad_bucket_names_are_refused(backend: Backend, bucket_name: str) -> None:
    with pytest.raises(StoragePathError, match="bucket name"):
        backend.storage.download(bucket_name, "x.txt")


def test_local_refuses_a_symlink_out_of_the_bucket(
    local_storage_dir: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"secret")
    (local_storage_dir / "models").mkdir()
    (local_storage_dir / "models" / "link").symlink_to(outside)
    storage = LocalStorage(local_storage_dir)

    with pytest.raises(StoragePathError, match="symbolic link"):
        storage.download("models", "link/secret.txt")
    with pytest.raises(StoragePathError, match="symbolic link"):
        storage.upload("models", "link/new.txt", b"x", content_type="a/b")

    assert not (outside / "new.txt").exists()


def test_local_upload_leaves_no_temporary_files_and_lists_none(
    local_storage_dir: Path,
) -> None:
    storage = LocalStorage(local_storage_dir)
    storage.upload("masks", "m/one.png", b"png", content_type="image/png")
    with pytest.raises(ObjectExistsError):
        storage.upload("masks", "m/one.png", b"png", content_type="image/png")
    storage.upload("masks", "m/one.png", b"png2", content_type="image/png", upsert=True)

    assert [p.name for p in (local_storage_dir / "masks" / "m").iterdir()] == [
        "one.png"
    ]
    (local_storage_dir / "masks" / "m" / ".hyacinth-upload-abc123").write_bytes(b"ha")
    assert storage.list("masks", "m") == ["one.png"]


def test_local_path_through_a_file_is_refused(local_storage_dir: Path) -> None:
    storage = LocalStorage(local_storage_dir)
    storage.upload("models", "file", b"x", content_type="a/b")

    with pytest.raises(StoragePathError, match="folder"):
        storage.upload("models", "file/inside", b"y", content_type="a/b")
    with pytest.raises(MissingObjectError):
        storage.download("models", "file/inside")


def test_supabase_upload_sends_content_type_and_upsert(
    supabase_server: FakeSupabaseStorage, supabase_storage: SupabaseStorage, bucket: str
) -> None:
    supabase_storage.upload(bucket, "m.png", b"png", content_type="image/png")
    supabase_storage.upload(
        bucket, "m.png", b"png", content_type="image/png", upsert=True
    )

    info = httpx.get(
        f"{supabase_server.url}/storage/v1/object/info/{bucket}/m.png",
        headers={
            "apikey": supabase_server.key,
            "Authorization": f"Bearer {supabase_server.key}",
        },
    ).json()
    assert info["content_type"] == "image/png"
    assert len(supabase_server.requests("POST", f"{bucket}/m.png")) == 2


def test_transient_failures_are_retried_until_success(
    supabase_server: FakeSupabaseStorage, supabase_storage: SupabaseStorage, bucket: str
) -> None:
    supabase_storage.upload(bucket, "photo.jpg", PAYLOAD, content_type="image/jpeg")
    supabase_server.reset()
    supabase_server.fail_next(2, status=503)

    assert supabase_storage.download(bucket, "photo.jpg") == PAYLOAD
    assert len(supabase_server.requests("GET", f"{bucket}/photo.jpg")) == 3


@pytest.mark.parametrize("status", [500, 502, 429])
def test_server_errors_and_rate_limits_are_retried(
    supabase_server: FakeSupabaseStorage,
    supabase_storage: SupabaseStorage,
    bucket: str,
    status: int,
) -> None:
    supabase_server.fail_next(1, status=status, body=b"<html>upstream trouble</html>")

    supabase_storage.upload(bucket, "a.txt", b"a", content_type="text/plain")

    assert supabase_storage.download(bucket, "a.txt") == b"a"
    assert len(supabase_server.requests("POST", f"{bucket}/a.txt")) == 2


def test_dropped_connections_are_retried(
    supabase_server: FakeSupabaseStorage, supabase_storage: SupabaseStorage, bucket: str
) -> None:
    supabase_storage.upload(bucket, "a.txt", b"a", content_type="text/plain")
    supabase_server.drop_next(2)

    assert supabase_storage.download(bucket, "a.txt") == b"a"
    assert len(supabase_server.requests("GET", f"{bucket}/a.txt")) == 3


def test_timeouts_are_retried(
    supabase_server: FakeSupabaseStorage, bucket: str
) -> None:
    storage = SupabaseStorage.from_settings(
        supabase_settings(supabase_server, storage_timeout_s=0.2)
    )
    storage.upload(bucket, "a.txt", b"a", content_type="text/plain")
    supabase_server.stall_next(1, 1.0, match="a.txt")

    assert storage.download(bucket, "a.txt") == b"a"
    assert len(supabase_server.requests("GET", f"{bucket}/a.txt")) == 2
    storage.close()


def test_an_upload_whose_answer_was_lost_is_not_reported_as_a_conflict(
    supabase_server: FakeSupabaseStorage, bucket: str
) -> None:
    storage = SupabaseStorage.from_settings(
        supabase_settings(supabase_server, storage_timeout_s=0.2)
    )
    supabase_server.stall_next(1, 1.0, match="late.txt", after=True)

    storage.upload(bucket, "late.txt", b"mine", content_type="text/plain")

    assert storage.download(bucket, "late.txt") == b"mine"
    assert len(supabase_server.requests("POST", f"{bucket}/late.txt")) == 2
    storage.close()


def test_persistent_failures_end_in_a_transient_storage_error(
    supabase_server: FakeSupabaseStorage,
    supabase_storage: SupabaseStorage,
    bucket: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    supabase_server.fail_next(10, status=503)
    caplog.set_level(logging.INFO, logger="worker.supabase_storage")

    with pytest.raises(StorageError, match=r"photo\.jpg") as caught:
        supabase_storage.download(bucket, "photo.jpg")

    assert caught.value.transient
    assert len(supabase_server.requests("GET", f"{bucket}/photo.jpg")) == 4
    events = [record.getMessage().split()[0] for record in caplog.records]
    assert events == ["storage.retry"] * 3 + ["storage.gave_up"]
    assert caplog.records[-1].levelno == logging.WARNING


def test_no_retries_when_storage_retries_is_zero(
    supabase_server: FakeSupabaseStorage, bucket: str
) -> None:
    storage = SupabaseStorage.from_settings(
        supabase_settings(supabase_server, storage_retries=0)
    )
    supabase_server.fail_next(1, status=503)

    with pytest.raises(StorageError):
        storage.download(bucket, "photo.jpg")

    assert len(supabase_server.requests("GET", f"{bucket}/photo.jpg")) == 1
    storage.close()


def test_a_rejected_key_is_refused_once_and_names_the_setting(
    supabase_server: FakeSupabaseStorage, bucket: str
) -> None:
    storage = SupabaseStorage(supabase_server.url, "wrong-key-" + "z" * 30)

    with pytest.raises(StorageRefusedError, match="SUPABASE_SERVICE_ROLE_KEY") as e:
        storage.download(bucket, "photo.jpg")

    assert not e.value.transient
    assert len(supabase_server.requests("GET", f"{bucket}/photo.jpg")) == 1
    storage.close()


def test_an_invalid_supabase_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="SUPABASE_URL"):
        SupabaseStorage("ftp://example.invalid", "some-key-long-enough")


def test_the_key_never_shows_in_errors_or_logs(
    supabase_server: FakeSupabaseStorage,
    bucket: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong_key = "wrong-service-role-" + uuid.uuid4().hex
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    storage = SupabaseStorage.from_settings(supabase_settings(supabase_server))
    wrong = SupabaseStorage(supabase_server.url, wrong_key, retry_backoff_ms=1)
    unreachable = SupabaseStorage(
        closed_url, supabase_server.key, retries=1, retry_backoff_ms=1
    )
    storage.upload(bucket, "here.txt", b"x", content_type="text/plain")
    supabase_server.fail_next(10, status=503, match="flaky.txt")

    errors: list[HyacinthError] = []
    attempts: list[Callable[[], object]] = [
        lambda: storage.download(bucket, "missing.txt"),
        lambda: storage.upload(bucket, "here.txt", b"y", content_type="text/plain"),
        lambda: storage.download(bucket, "flaky.txt"),
        lambda: wrong.download(bucket, "here.txt"),
        lambda: wrong.list(bucket),
        lambda: unreachable.download(bucket, "here.txt"),
        lambda: unreachable.upload(bucket, "z.txt", b"z", content_type="a/b"),
    ]
    for attempt in attempts:
        with pytest.raises(HyacinthError) as caught:
            attempt()
        errors.append(caught.value)

    kinds = [type(error).__name__ for error in errors]
    assert kinds == [
        "MissingObjectError",
        "ObjectExistsError",
        "StorageError",
        "StorageRefusedError",
        "StorageRefusedError",
        "StorageError",
        "StorageError",
    ]
    for error in errors:
        shown = "".join(traceback.format_exception(error)) + repr(error)
        assert supabase_server.key not in shown
        assert wrong_key not in shown
    logged = caplog.text + "".join(record.getMessage() for record in caplog.records)
    assert "storage.retry" in logged
    assert supabase_server.key not in logged
    assert wrong_key not in logged
    for each in (storage, wrong, unreachable):
        each.close()


def test_the_fake_server_answers_like_supabase(
    supabase_server: FakeSupabaseStorage, bucket: str
) -> None:
    headers = {
        "apikey": supabase_server.key,
        "Authorization": f"Bearer {supabase_server.key}",
    }
    base = f"{supabase_server.url}/storage/v1/object"

    missing = httpx.get(f"{base}/{bucket}/nothing.txt", headers=headers)
    created = httpx.post(
        f"{base}/{bucket}/a/one.txt", headers=headers, files={"file": ("one.txt", b"1")}
    )
    duplicate = httpx.post(
        f"{base}/{bucket}/a/one.txt", headers=headers, files={"file": ("one.txt", b"2")}
    )
    listed = httpx.post(f"{base}/list/{bucket}", headers=headers, json={"prefix": ""})
    unauthorized = httpx.get(f"{base}/{bucket}/a/one.txt")

    assert (missing.status_code, missing.json()["statusCode"]) == (400, "404")
    assert missing.json()["error"] == "not_found"
    assert created.json()["Key"] == f"{bucket}/a/one.txt"
    assert (duplicate.status_code, duplicate.json()["statusCode"]) == (400, "409")
    assert duplicate.json()["error"] == "Duplicate"
    assert listed.json()[0]["name"] == "a"
    assert listed.json()[0]["id"] is None
    assert unauthorized.status_code in (401, 403)
    assert (supabase_server.root / bucket / "a" / "one.txt").read_bytes() == b"1"
