"""Writing files that readers never see half-written: temp file, fsync, then rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_synced_temp(folder: Path, data: bytes, *, prefix: str) -> Path:
    """`data` in a new temporary file in `folder`, on disk; the caller moves it."""
    handle, temp_name = tempfile.mkstemp(prefix=prefix, dir=folder)
    temp = Path(temp_name)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        # mkstemp makes the file private to its owner; objects are read by others.
        temp.chmod(0o644)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp
