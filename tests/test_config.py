"""Settings from the environment: defaults, parsing, and refusals that name the fix."""

from __future__ import annotations

import pytest

from worker.config import ENVIRONMENT_VARIABLES, Settings
from worker.errors import ConfigError


def test_an_empty_environment_gives_the_documented_defaults() -> None:
    settings = Settings.from_env({})

    assert settings.presence_model_version == "1.0.0"
    assert settings.segmentation_model_version == "1.0.1"
    assert settings.models_bucket == "models"
    assert settings.masks_bucket == "masks"
    assert settings.storage_backend == "local"
    assert (settings.lease_s, settings.heartbeat_s) == (30.0, 10.0)


def test_every_setting_is_read_from_its_variable() -> None:
    settings = Settings.from_env(
        {
            "STORAGE_BUCKET_MASKS": "plant-masks",
            "SEGMENTATION_MODEL_VERSION": "latest",
            "PRESENCE_MODEL_VERSION": "1.10.0",
            "LEASE_S": "45",
            "CLAIM_BATCH_SIZE": " 250 ",
            "TORCH_NUM_THREADS": "",
        }
    )

    assert settings.masks_bucket == "plant-masks"
    assert settings.segmentation_model_version == "latest"
    assert settings.presence_model_version == "1.10.0"
    assert settings.lease_s == 45.0
    assert settings.claim_batch_size == 250
    assert settings.torch_num_threads == 0
    assert set(ENVIRONMENT_VARIABLES) == set(Settings.__dataclass_fields__)


@pytest.mark.parametrize(
    ("environ", "names"),
    [
        ({"LEASE_S": "soon"}, "LEASE_S='soon'"),
        ({"CLAIM_BATCH_SIZE": "-5"}, "CLAIM_BATCH_SIZE='-5'"),
        ({"SWEEP_INTERVAL_S": "0"}, "SWEEP_INTERVAL_S must be above zero"),
        ({"HEARTBEAT_S": "30"}, "HEARTBEAT_S (30.0) must be shorter than LEASE_S"),
        ({"SUPABASE_URL": "https://x.supabase.co"}, "SUPABASE_SERVICE_ROLE_KEY"),
        ({"PRESENCE_MODEL_VERSION": "../1.0.0"}, "PRESENCE_MODEL_VERSION='../1.0.0'"),
        ({"SEGMENTATION_MODEL_VERSION": "newest"}, "SEGMENTATION_MODEL_VERSION"),
    ],
)
def test_a_bad_setting_is_refused_naming_the_variable(
    environ: dict[str, str], names: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(environ)

    assert names in str(caught.value)


def test_the_service_role_key_stays_out_of_the_settings_repr() -> None:
    key = "service-role-key-" + "k" * 24
    settings = Settings.from_env(
        {"SUPABASE_URL": "https://x.supabase.co", "SUPABASE_SERVICE_ROLE_KEY": key}
    )

    assert settings.supabase_service_role_key == key
    assert key not in repr(settings)
