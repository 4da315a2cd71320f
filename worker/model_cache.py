"""The model cache: weights files in MODEL_CACHE_DIR, named by their sha256.

Downloaded weights are kept in MODEL_CACHE_DIR under the sha256 of their
content. When the meta carries a sha256, a cached file with that digest is used
without asking storage at all. When it does not (older files), storage is asked
for the object's fingerprint (its etag, size and time of writing), and a small
index under `sources/` remembers which digest that fingerprint was downloaded as:
a restarted worker downloads again only when the object was written anew.
Files are written to a temporary name and renamed, so a half-written file is
never used, and a cached file is hashed again before each load, so a damaged
one is downloaded afresh. Temporary files left by a killed process are removed
after a day.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
from pathlib import Path

from worker.errors import MissingObjectError, ModelError
from worker.files import write_synced_temp
from worker.storage import Storage

log = logging.getLogger(__name__)

_PARTIAL_PREFIX = ".partial-"
_SOURCES_FOLDER = "sources"
_SHA256_HEX = re.compile("[0-9a-f]{64}")
_PARTIAL_MAX_AGE_S = 24 * 3600


def fetch_weights(
    storage: Storage,
    bucket: str,
    path: str,
    *,
    sha256: str,
    cache_dir: Path,
    where: str,
) -> Path:
    """A local, verified copy of `path`, from the cache or downloaded into it.

    `sha256` is the digest the meta promises ("" when it has none); `where` is
    how error messages name the file.
    """
    suffix = Path(path).suffix
    source_index = None
    if sha256:
        expected = sha256
    else:
        source_index = _source_index(storage, bucket, path, cache_dir, where)
        expected = _read_index(source_index)

    if expected:
        cached = cache_dir / f"{expected}{suffix}"
        if cached.is_file() and _file_sha256(cached) == expected:
            log.info("model.cache_hit file=%s cached=%s", where, cached)
            return cached

    started_s = time.perf_counter()
    try:
        data = storage.download(bucket, path)
    except MissingObjectError:
        raise _missing(storage, where) from None
    digest = hashlib.sha256(data).hexdigest()
    if sha256 and digest != sha256:
        raise ModelError(
            f"{where} has sha256 {digest} but its model_meta.json says "
            f"{sha256}: the weights were changed or damaged; publish the "
            "version again with --force"
        )

    target = cache_dir / f"{digest}{suffix}"
    if not (target.is_file() and _file_sha256(target) == digest):
        _write_atomic(target, data)
    if source_index is not None:
        _write_atomic(source_index, digest.encode())
    log.info(
        "model.downloaded file=%s size_bytes=%d download_ms=%.0f cached=%s",
        where,
        len(data),
        (time.perf_counter() - started_s) * 1000,
        target,
    )
    return target


def _missing(storage: Storage, where: str) -> ModelError:
    return ModelError(
        f"{where} not found in {storage.backend} storage, though its "
        "model_meta.json names it: publish the version again with --force"
    )


def _source_index(
    storage: Storage, bucket: str, path: str, cache_dir: Path, where: str
) -> Path:
    """Where the digest of the object as it is now is noted, once downloaded."""
    try:
        fingerprint = storage.fingerprint(bucket, path)
    except MissingObjectError:
        raise _missing(storage, where) from None
    key = hashlib.sha256(fingerprint.encode()).hexdigest()
    return cache_dir / _SOURCES_FOLDER / key


def _read_index(index: Path) -> str:
    """The digest noted in `index`, or "" when there is none (or a damaged one)."""
    try:
        noted = index.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return noted if _SHA256_HEX.fullmatch(noted) else ""


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomic(target: Path, data: bytes) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(target.parent)
    except OSError as exc:
        raise ModelError(
            f"cannot write to MODEL_CACHE_DIR {target.parent}: "
            f"{exc.strerror or exc}; point it at a writable folder"
        ) from None

    try:
        temp = write_synced_temp(target.parent, data, prefix=_PARTIAL_PREFIX)
        try:
            os.replace(temp, target)
        finally:
            temp.unlink(missing_ok=True)
    except OSError as exc:
        raise ModelError(
            f"cannot write {target} in MODEL_CACHE_DIR: {exc.strerror or exc}; "
            "check free space and permissions"
        ) from None


def _remove_stale_partials(cache_dir: Path) -> None:
    # Young ones may belong to another process writing right now; old ones are
    # what a process killed mid-write leaves behind.
    oldest_s = time.time() - _PARTIAL_MAX_AGE_S
    for partial in cache_dir.glob(f"{_PARTIAL_PREFIX}*"):
        with contextlib.suppress(OSError):
            if partial.stat().st_mtime < oldest_s:
                partial.unlink()
