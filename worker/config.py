"""Settings read from the environment: every variable, its default, in one place."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from packaging.version import InvalidVersion, Version

from worker.errors import ConfigError

#: The Postgres channel the observations trigger notifies; the payload is the row id.
NOTIFY_CHANNEL = "hyacinth_observations"

#: The Dramatiq queue the listener enqueues observations on.
OBSERVATIONS_QUEUE = "observations"


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "hyacinth" / "models")


@dataclass(frozen=True)
class Settings:
    """Configuration of listener, workers and commands; build it with `from_env`."""

    database_url: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"

    supabase_url: str = ""
    supabase_service_role_key: str = field(default="", repr=False)
    local_storage_dir: str = "storage"
    models_bucket: str = "models"
    masks_bucket: str = "masks"
    storage_timeout_s: float = 20.0
    storage_retries: int = 3
    storage_retry_backoff_ms: int = 200

    presence_model_version: str = "1.0.0"
    segmentation_model_version: str = "1.0.1"
    model_cache_dir: str = field(default_factory=_default_cache_dir)
    torch_device: str = ""
    torch_num_threads: int = 0
    max_image_pixels: int = 100_000_000

    lease_s: float = 30.0
    heartbeat_s: float = 10.0
    sweep_interval_s: float = 15.0
    queued_lease_s: float = 600.0
    claim_batch_size: int = 500
    listener_give_up_s: float = 120.0
    max_retries: int = 5
    retry_min_backoff_ms: int = 1_000
    retry_max_backoff_ms: int = 60_000

    log_level: str = "INFO"

    @property
    def storage_backend(self) -> str:
        """`supabase` when SUPABASE_URL is set, else `local`."""
        return "supabase" if self.supabase_url else "local"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every setting from the environment, falling back to the defaults."""
        env = os.environ if environ is None else environ
        defaults = cls()
        values: dict[str, object] = {}
        for name, variable in ENVIRONMENT_VARIABLES.items():
            raw = env.get(variable, "").strip()
            if not raw:
                continue
            default = getattr(defaults, name)
            values[name] = _parse(variable, raw, type(default))
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        """Refuse combinations that cannot work, naming the variable to change."""
        if self.supabase_url and not self.supabase_service_role_key:
            raise ConfigError(
                "SUPABASE_URL is set but SUPABASE_SERVICE_ROLE_KEY is empty: set the "
                "service role key from the Supabase dashboard (Settings > API)"
            )
        for variable, value in (
            ("LEASE_S", self.lease_s),
            ("HEARTBEAT_S", self.heartbeat_s),
            ("SWEEP_INTERVAL_S", self.sweep_interval_s),
            ("CLAIM_BATCH_SIZE", self.claim_batch_size),
            ("MAX_IMAGE_PIXELS", self.max_image_pixels),
        ):
            if value <= 0:
                raise ConfigError(f"{variable} must be above zero, not {value}")
        for variable, version in (
            ("PRESENCE_MODEL_VERSION", self.presence_model_version),
            ("SEGMENTATION_MODEL_VERSION", self.segmentation_model_version),
        ):
            if version != "latest" and not _is_version(version):
                raise ConfigError(
                    f"{variable}={version!r} is not a version: give one published "
                    "in the models bucket, such as 1.0.0 (`hyacinth models list`), "
                    "or latest"
                )
        if self.heartbeat_s >= self.lease_s:
            raise ConfigError(
                f"HEARTBEAT_S ({self.heartbeat_s}) must be shorter than LEASE_S "
                f"({self.lease_s}), or live rows would be taken from their workers"
            )

    def require_database_url(self) -> str:
        """DATABASE_URL, or an error that says to set it."""
        if not self.database_url:
            raise ConfigError(
                "DATABASE_URL is not set: give the Postgres connection string, "
                "for example postgresql://user:password@host:5432/postgres"
            )
        return self.database_url


#: Field name -> environment variable. The README's configuration table follows it.
ENVIRONMENT_VARIABLES: dict[str, str] = {
    "database_url": "DATABASE_URL",
    "redis_url": "REDIS_URL",
    "supabase_url": "SUPABASE_URL",
    "supabase_service_role_key": "SUPABASE_SERVICE_ROLE_KEY",
    "local_storage_dir": "LOCAL_STORAGE_DIR",
    "models_bucket": "MODELS_BUCKET",
    "masks_bucket": "STORAGE_BUCKET_MASKS",
    "storage_timeout_s": "STORAGE_TIMEOUT_S",
    "storage_retries": "STORAGE_RETRIES",
    "storage_retry_backoff_ms": "STORAGE_RETRY_BACKOFF_MS",
    "presence_model_version": "PRESENCE_MODEL_VERSION",
    "segmentation_model_version": "SEGMENTATION_MODEL_VERSION",
    "model_cache_dir": "MODEL_CACHE_DIR",
    "torch_device": "TORCH_DEVICE",
    "torch_num_threads": "TORCH_NUM_THREADS",
    "max_image_pixels": "MAX_IMAGE_PIXELS",
    "lease_s": "LEASE_S",
    "heartbeat_s": "HEARTBEAT_S",
    "sweep_interval_s": "SWEEP_INTERVAL_S",
    "queued_lease_s": "QUEUED_LEASE_S",
    "claim_batch_size": "CLAIM_BATCH_SIZE",
    "listener_give_up_s": "LISTENER_GIVE_UP_S",
    "max_retries": "MAX_RETRIES",
    "retry_min_backoff_ms": "RETRY_MIN_BACKOFF_MS",
    "retry_max_backoff_ms": "RETRY_MAX_BACKOFF_MS",
    "log_level": "LOG_LEVEL",
}


def _is_version(text: str) -> bool:
    try:
        Version(text)
    except InvalidVersion:
        return False
    return True


def _parse(variable: str, raw: str, kind: type) -> object:
    if kind is str:
        return raw
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(
            f"{variable}={raw!r} is not a valid {kind.__name__}: fix or unset it"
        ) from None
    if value < 0:
        raise ConfigError(f"{variable}={raw!r} must not be negative")
    return value
