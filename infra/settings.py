"""One settings object for every service and command, read from TOLLGATE_* variables."""

from __future__ import annotations

import json
import secrets
from datetime import timedelta
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts._base import DEFAULT_PREFIX, check_prefix
from contracts.durations import DEFAULT_MAX_CLOCK_SKEW, parse_duration

MAX_CLOCK_SKEW_LIMIT = timedelta(days=3660)


class Settings(BaseSettings):
    """Where the servers are and how the services behave. Built once, in the composition root."""

    model_config = SettingsConfigDict(env_prefix="TOLLGATE_", extra="ignore")

    nats_url: str | None = None
    nats_nkey_seed_file: Path | None = Field(
        default=None, description="this identity's nkey seed, from `tollgate nats-config`"
    )
    database_url: str | None = None
    data_dir: Path = Path(".tollgate")
    prefix: str = DEFAULT_PREFIX
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    config: Path | None = Field(default=None, description="quota YAML")
    admin_token: str | None = None
    token_secret: str | None = None
    host: str | None = Field(default=None, description="this host's name, for meters")
    metrics_port: int | None = Field(
        default=None, description="serve Prometheus /metrics here (standalone services)"
    )
    # Ledger tuning.
    ledger_batch: int = Field(default=1000, ge=1, le=10_000)
    ledger_fetch_timeout: float = Field(default=0.5, gt=0)
    ledger_ack_wait: float = Field(default=30.0, ge=1, le=3600)
    duplicate_window_seconds: int = Field(default=20 * 60, ge=1)
    max_payload_bytes: int = Field(default=1 << 20, ge=1024)
    # How far a sample's sampled_at may stray from when JetStream stored it before the
    # ledger places its usage at the edge of that window instead (README: clock skew).
    max_clock_skew: timedelta = Field(default=DEFAULT_MAX_CLOCK_SKEW)
    # Running at scale: samples (by host) and policy (by subject) in `partitions` parts,
    # this instance owning `partition`; every stream kept on `stream_replicas` servers.
    partitions: int = Field(default=1, ge=1, le=1024)
    partition: int = Field(default=0, ge=0)
    stream_replicas: int = Field(default=1, ge=1, le=5)

    @field_validator(
        "nats_url", "database_url", "config", "admin_token", "token_secret", "host",
        "nats_nkey_seed_file", mode="before",
    )  # fmt: skip
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        # `TOLLGATE_CONFIG=` in a shell or compose file means "not set", not the path ".".
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("max_clock_skew", mode="before")
    @classmethod
    def _skew(cls, v: object) -> object:
        # Written like the quota file's durations: '5min', '300s', '1h', or plain seconds.
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v.strip())
        if isinstance(v, str | int) and not isinstance(v, bool):
            v = parse_duration(v)
        if isinstance(v, timedelta) and not timedelta(0) < v <= MAX_CLOCK_SKEW_LIMIT:
            raise ValueError(
                f"{v.total_seconds():g} seconds is not a clock-skew tolerance: give one above "
                "zero and at most "
                "3660 days (ten years), e.g. '5min'"
            )
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        return check_prefix(v)

    @model_validator(mode="after")
    def _partition_in_range(self) -> Settings:
        if self.partition >= self.partitions:
            raise ValueError(
                f"TOLLGATE_PARTITION={self.partition} is not one of the "
                f"{self.partitions} partitions (TOLLGATE_PARTITIONS={self.partitions}): set "
                f"TOLLGATE_PARTITION to a number from 0 to {self.partitions - 1}, one per "
                "ledger/policy instance, or raise TOLLGATE_PARTITIONS"
            )
        return self

    @property
    def endpoints_file(self) -> Path:
        return self.data_dir / "endpoints.json"

    def with_endpoints(self) -> Settings:
        """Fill NATS/Postgres/API URLs from `endpoints.json` left by `tollgate up`, if unset."""
        if self.nats_url and self.database_url:
            return self
        try:
            found = json.loads(self.endpoints_file.read_text())
        except (OSError, ValueError):
            return self
        return self.model_copy(
            update={
                "nats_url": self.nats_url or found.get("nats_url"),
                "database_url": self.database_url or found.get("database_url"),
            }
        )

    def api_url_from_endpoints(self) -> str:
        try:
            found = json.loads(self.endpoints_file.read_text())
            return str(found["api_url"])
        except (OSError, ValueError, KeyError):
            return f"http://{self.api_host}:{self.api_port}"

    def require_servers(self) -> tuple[str, str]:
        """Both server URLs, or an error that says how to provide them."""
        s = self.with_endpoints()
        if not s.nats_url or not s.database_url:
            raise SystemExit(
                "Tollgate does not know where NATS and Postgres are. Start the stack with "
                "`tollgate up` (it writes .tollgate/endpoints.json), or set "
                "TOLLGATE_NATS_URL and TOLLGATE_DATABASE_URL."
            )
        return s.nats_url, s.database_url

    def resolved_admin_token(self) -> str | None:
        """TOLLGATE_ADMIN_TOKEN, else the token `tollgate up` wrote to the data directory."""
        if self.admin_token:
            return self.admin_token
        path = self.data_dir / "admin-token"
        return path.read_text().strip() if path.exists() else None

    def resolved_token_secret(self, create: bool = False) -> str:
        """The key user tokens are signed with: TOLLGATE_TOKEN_SECRET or a file in data_dir."""
        if self.token_secret:
            return self.token_secret
        return _secret_file(self.data_dir / "token-secret", create)

    def ensure_admin_token(self) -> str:
        if self.admin_token:
            return self.admin_token
        return _secret_file(self.data_dir / "admin-token", create=True)


def _secret_file(path: Path, create: bool) -> str:
    if path.exists():
        return path.read_text().strip()
    if not create:
        raise SystemExit(
            f"No secret at {path}. Start the stack with `tollgate up` first, or set "
            "TOLLGATE_TOKEN_SECRET / TOLLGATE_ADMIN_TOKEN."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    path.touch(mode=0o600)
    path.write_text(value + "\n")
    return value
