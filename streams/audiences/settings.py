"""``CDP_AUDIENCES_*`` settings and the audience topology's names (Faust-free, cheap to import)."""

from __future__ import annotations

from typing import Final

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.settings import Settings, reject_unknown_env
from streams.topics import internal_topic

ENV_PREFIX: Final = "CDP_AUDIENCES_"
#: The core settings delegate every ``CDP_AUDIENCE*`` name here, so a typo such as
#: ``CDP_AUDIENCE_CONFIG`` (no S) is rejected here instead of silently ignored.
_DELEGATED: Final = "CDP_AUDIENCE"

#: Internal topic (per worker group) carrying recommendation updates and clock ticks.
AUDIENCE_REPARTITION_SUFFIX: Final = "audience-repartition"
#: Faust table of per-profile audience state (changelog ``<group>-audience_state-changelog``).
AUDIENCE_STATE_TABLE: Final = "audience_state"


class AudienceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, case_sensitive=False, extra="ignore")

    config: str | None = Field(
        None, description="Path of the audiences YAML file; unset = no audience agent."
    )
    tick_s: float = Field(
        1.0, gt=0, le=3600, description="How often window expiries are checked (clock tick)."
    )

    @model_validator(mode="after")
    def _no_unknown_env(self) -> AudienceSettings:
        reject_unknown_env(_DELEGATED, [ENV_PREFIX + f for f in type(self).model_fields])
        return self


def changelog_topic(worker_id: str) -> str:
    return f"{worker_id}-{AUDIENCE_STATE_TABLE}-changelog"


def audience_repartition_topic(settings: Settings) -> str | None:
    """The audience repartition topic of this worker group, or None when audiences are off."""
    if not AudienceSettings().config:
        return None
    return internal_topic(settings.cdp_worker_id, AUDIENCE_REPARTITION_SUFFIX)
