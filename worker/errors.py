"""The error hierarchy: one root, kept apart by what the caller should do next.

- `PhotoError`: the photo itself is unusable (corrupt, not an image, too large).
  Permanent: retrying gives the same answer; the observation fails.
- `MissingObjectError`: an object is not in storage. Permanent.
- `ObjectExistsError`: an upload would overwrite an object without `upsert`. Permanent.
- `StoragePathError`: an object path would leave its bucket (`..`, absolute). Permanent.
- `StorageError`: storage could not be reached or answered badly. Transient: retry.
- `StorageRefusedError`: storage refused the request (bad key, bad request). Permanent.
- `ModelError`: a model is misconfigured (bad meta, wrong weights, digest mismatch).
  Permanent for the observation; the operator fixes the model or the version.
- `ConfigError`: a setting is missing or wrong; the process cannot start.
"""

from __future__ import annotations


class HyacinthError(Exception):
    """Root of every error this package raises on purpose."""

    #: Whether trying the same work again later may succeed.
    transient: bool = False


class ConfigError(HyacinthError):
    """A setting is missing or invalid; the message names the variable."""


class PhotoError(HyacinthError):
    """The photo cannot be used: corrupt, truncated, not an image, or too large."""


class MissingObjectError(HyacinthError):
    """The object is not in the bucket; never retried."""


class ObjectExistsError(HyacinthError):
    """An upload without upsert found an object already at that path."""


class StoragePathError(HyacinthError):
    """An object path is empty, absolute or would leave its bucket; never retried."""


class StorageRefusedError(HyacinthError):
    """Storage refused the request itself (rejected key, bad request); not retried."""


class StorageError(HyacinthError):
    """Storage failed in a way that may pass: network, timeout, server error."""

    transient = True


class ModelError(HyacinthError):
    """A model cannot be found, verified or loaded; the message names what to fix."""


class DatabaseError(HyacinthError):
    """The database could not be reached or refused the work; transient."""

    transient = True
