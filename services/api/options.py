"""Settings only the API reads: JupyterHub sign-in, rate limits, the spawn-check timeout.

Read from TOLLGATE_* variables like `infra.settings.Settings`; kept here so the API's
knobs live with the API.
"""

from __future__ import annotations

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ApiOptions(BaseSettings):
    """How the API authenticates, throttles and forwards."""

    model_config = SettingsConfigDict(env_prefix="TOLLGATE_", extra="ignore")

    jupyterhub_api_url: str | None = Field(
        default=None,
        description="JupyterHub to check hub tokens with, e.g. http://hub:8081 or its "
        "JUPYTERHUB_API_URL (http://hub:8081/hub/api); unset: hub tokens are not accepted",
    )
    jupyterhub_cache_seconds: float = Field(default=60.0, ge=0, le=3600)
    jupyterhub_timeout: float = Field(default=5.0, gt=0, le=60)
    api_rate_per_second: float = Field(
        default=20.0, ge=0, le=1e6, description="requests per second per principal; 0: no limit"
    )
    api_rate_burst: int = Field(default=100, ge=1, le=1_000_000)
    spawn_check_timeout: float = Field(default=5.0, gt=0, le=60)

    @field_validator("jupyterhub_api_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("jupyterhub_api_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"{v!r} is not an http(s) URL such as http://hub:8081")
        return v


def options_from_environment() -> ApiOptions:
    """ApiOptions from TOLLGATE_* variables, or `ValueError` naming the variable to fix."""
    try:
        return ApiOptions()
    except ValidationError as exc:
        problems = "; ".join(
            f"TOLLGATE_{'_'.join(str(p) for p in e['loc']).upper()}: "
            f"{e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise ValueError(problems) from None
