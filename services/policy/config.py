"""The quota configuration (SPEC 3): YAML validated into typed rules with pointed errors."""

from __future__ import annotations

import hashlib
import re
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from contracts._base import METRIC_RE
from contracts.durations import parse_duration

from .prices import COST, Pricebook, PriceRule, parse_money
from .units import Amount, UnitError, parse_amount

_REASON = re.compile(r"^[a-z][a-z0-9_]{0,99}$")


_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def parse_fraction(value: Any) -> Decimal:
    """A grace allowance: '10%' or a fraction such as 0.1, between 0 and 10 (1000%)."""
    if isinstance(value, Decimal):
        fraction = value
    elif isinstance(value, str) and (m := _PERCENT.match(value)):
        fraction = Decimal(m[1]) / 100
    elif isinstance(value, int | float) and not isinstance(value, bool):
        fraction = Decimal(str(value))
    else:
        raise ValueError(f"{value!r} is not a grace allowance; write a percentage such as '10%'")
    if not 0 <= fraction <= 10:
        raise ValueError(f"grace must be between 0% and 1000%, got {fraction:%}")
    return fraction.normalize()


Enforcement = Literal["spawn", "terminate"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Window(_Strict):
    """Exactly one of: rolling, calendar (+tz), workload_hour, lifetime."""

    rolling: timedelta | None = None
    calendar: Literal["day", "week", "month"] | None = None
    tz: str = "UTC"
    workload_hour: bool = False
    lifetime: bool = False

    @field_validator("rolling", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        return None if v is None else parse_duration(v)

    @field_validator("tz")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{v!r} is not a time zone; use an IANA name like 'UTC'") from None
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> Window:
        chosen = [
            self.rolling is not None, self.calendar is not None, self.workload_hour, self.lifetime,
        ]  # fmt: skip
        if sum(chosen) != 1:
            raise ValueError(
                "a window is exactly one of {rolling: 30d}, {calendar: month, tz: UTC}, "
                "{workload_hour: true} or {lifetime: true}"
            )
        return self

    def describe(self) -> str:
        """How the window reads in a message: 'in the last 30 days', 'this month'."""
        if self.rolling is not None:
            days = self.rolling / timedelta(days=1)
            if days >= 1 and days == int(days):
                return f"in the last {int(days)} day{'s' if days != 1 else ''}"
            hours = self.rolling / timedelta(hours=1)
            return f"in the last {hours:g} hour{'s' if hours != 1 else ''}"
        if self.calendar is not None:
            return f"this {self.calendar}" + ("" if self.tz == "UTC" else f" ({self.tz})")
        if self.workload_hour:
            return "in this hour of the workload"
        return "in total"

    def key(self) -> str:
        """A short, stable label: 'rolling:30d', 'calendar:month:UTC', 'workload_hour'."""
        if self.rolling is not None:
            return f"rolling:{int(self.rolling.total_seconds())}s"
        if self.calendar is not None:
            return f"calendar:{self.calendar}:{self.tz}"
        return "workload_hour" if self.workload_hour else "lifetime"


class AppliesTo(_Strict):
    groups: list[str] = Field(default_factory=list)
    users: list[str] = Field(default_factory=list)
    all: bool = False

    @model_validator(mode="after")
    def _something(self) -> AppliesTo:
        if not (self.groups or self.users or self.all):
            raise ValueError("applies_to needs groups, users or all: true")
        return self


class Termination(_Strict):
    reason: str | None = None
    grace_seconds: Decimal = Field(default=Decimal(30), ge=0, le=86400)
    # Notice before termination: 0 kills at the crossing (the default), more tells the
    # workload first and terminates only if it is still over when the notice runs out.
    notice_seconds: Decimal = Field(default=Decimal(0), ge=0, le=7 * 86400)

    @field_validator("reason")
    @classmethod
    def _reason(cls, v: str | None) -> str | None:
        if v is not None and not _REASON.match(v):
            raise ValueError(
                f"{v!r} is not a reason; write a lower-case word with underscores such as "
                "'log_quota_exceeded' (hosts report it when the workload stops)"
            )
        return v


class QuotaRule(_Strict):
    """One quota as configured."""

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.\-]+$")
    metric: str
    limit: str | int
    window: Window
    applies_to: AppliesTo = Field(default_factory=lambda: AppliesTo(all=True))
    per: Literal["subject", "workload", "group"] = "subject"
    combine: Literal["max", "min", "sum"] = "max"
    enforce: list[Enforcement] = Field(default_factory=lambda: list[Enforcement](["spawn"]))
    warn_at: list[Decimal] = Field(default_factory=list)
    termination: Termination = Field(default_factory=Termination)
    mode: Literal["hard", "soft"] = Field(
        default="hard", description="soft: warn and report past the limit, never deny or terminate"
    )
    grace: Decimal = Field(
        default=Decimal(0), description="deny and terminate only past limit x (1 + grace)"
    )
    _amount: Amount = PrivateAttr()

    @field_validator("grace", mode="before")
    @classmethod
    def _percent(cls, v: Any) -> Any:
        return parse_fraction(v)

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if v != COST and not METRIC_RE.match(v):
            raise ValueError(
                f"{v!r} is not a metric name like 'mem.alloc.byte_seconds' (or cost, for a "
                "budget in money over every priced metric)"
            )
        return v

    @field_validator("warn_at")
    @classmethod
    def _fractions(cls, v: list[Decimal]) -> list[Decimal]:
        for f in v:
            if not 0 < f < 1:
                raise ValueError(f"warn_at values are fractions between 0 and 1, got {f}")
        return sorted(v)

    @model_validator(mode="after")
    def _parse_limit(self) -> QuotaRule:
        if self.metric == COST:
            return self  # in money: parsed once the file's currency is known (PolicyConfig)
        try:
            self._amount = parse_amount(self.limit, self.metric)
        except UnitError as exc:
            raise ValueError(f"limit: {exc}") from None
        return self

    def price_limit(self, currency: str | None) -> None:
        """Parse a cost quota's limit in the prices' currency."""
        self._amount = parse_money(self.limit, currency)

    @model_validator(mode="after")
    def _coherent(self) -> QuotaRule:
        if self.window.workload_hour and self.per != "workload":
            raise ValueError(
                "window: {workload_hour: true} counts hours of one workload's life, "
                "so it needs per: workload"
            )
        if self.per == "group" and not self.applies_to.groups:
            raise ValueError(
                "per: group shares one pool among a group's members; "
                "name the groups in applies_to: {groups: [...]}"
            )
        if self.metric == COST and self.per == "workload":
            raise ValueError(
                "a metric: cost quota is per: subject or per: group (a budget of people, "
                "not of one workload)"
            )
        if self.mode == "soft" and self.grace:
            raise ValueError(
                "grace has no effect on a soft quota (a soft quota never denies or terminates); "
                "drop grace, or say mode: hard"
            )
        if self.per == "workload" and "spawn" in self.enforce:
            raise ValueError(
                "enforce: spawn cannot apply to a per: workload quota (a new workload has "
                "used nothing yet); use enforce: [terminate], or per: subject to refuse spawns"
            )
        return self

    @property
    def amount(self) -> Amount:
        return self._amount


class Reissue(_Strict):
    """Terminating again while a terminated workload's usage keeps arriving (README:
    "Enforcement that does not give up"): after `after`, then doubling up to `max`."""

    after: timedelta = timedelta(seconds=30)
    max: timedelta = timedelta(minutes=5)
    settle: timedelta = Field(
        default=timedelta(seconds=10),
        description="usage sampled this long after a command's grace (or a stop) still "
        "counts as the workload's last breath, not as proof that it runs",
    )
    enabled: bool = True

    @field_validator("after", "max", "settle", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        return parse_duration(v) if isinstance(v, str | int) else v

    @model_validator(mode="after")
    def _sane(self) -> Reissue:
        if self.after <= timedelta(0):
            raise ValueError("after must be at least 1s (it paces repeated terminate commands)")
        if self.max < self.after:
            raise ValueError(f"max ({self.max}) must not be shorter than after ({self.after})")
        return self


class PolicyConfig(_Strict):
    """The whole quota configuration."""

    groups: dict[str, list[str]] = Field(default_factory=dict)
    quotas: list[QuotaRule] = Field(default_factory=list)
    failure_mode: Literal["open", "closed"] = "open"
    max_staleness: timedelta = timedelta(seconds=60)
    reissue: Reissue = Field(default_factory=Reissue)
    help: str | None = Field(
        default=None, description="appended to denials, e.g. 'ask your admin to join power'"
    )
    version: str = "unversioned"
    prices: list[PriceRule] = Field(
        default_factory=list, description="what usage costs, for metric: cost quotas and reports"
    )
    _pricebook: Pricebook = PrivateAttr()

    @field_validator("max_staleness", mode="before")
    @classmethod
    def _staleness(cls, v: Any) -> Any:
        return parse_duration(v) if isinstance(v, str | int) else v

    @field_validator("prices")
    @classmethod
    def _one_currency(cls, v: list[PriceRule]) -> list[PriceRule]:
        Pricebook.of(v)  # raises, naming the currencies or the repeated prices
        return v

    @model_validator(mode="after")
    def _priced(self) -> PolicyConfig:
        self._pricebook = Pricebook.of(self.prices)
        for q in self.quotas:
            if q.metric == COST:
                try:
                    q.price_limit(self._pricebook.currency)
                except UnitError as exc:
                    raise ValueError(f"quota {q.name}: limit: {exc}") from None
        return self

    @property
    def pricebook(self) -> Pricebook:
        return self._pricebook

    @model_validator(mode="after")
    def _unique_names(self) -> PolicyConfig:
        names = [q.name for q in self.quotas]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"quota names must be unique; repeated: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _one_combine_per_limit(self) -> PolicyConfig:
        # Rules on one metric, window and scope combine into one limit; they must agree how.
        first: dict[tuple[str, str, str], QuotaRule] = {}
        for q in self.quotas:
            other = first.setdefault((q.metric, q.window.key(), q.per), q)
            if other.combine != q.combine:
                raise ValueError(
                    f"quotas {other.name} and {q.name} limit the same {q.metric} "
                    f"({q.window.key()}, per {q.per}) but say combine: {other.combine} and "
                    f"combine: {q.combine}; give them the same combine"
                )
        return self

    def groups_of(self, subject: str, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
        """Static groups from the config plus groups a request or workload brought."""
        found = {g for g, members in self.groups.items() if subject in members}
        return sorted(found | set(extra))


class ConfigError(ValueError):
    """The quota file is unreadable or invalid; the message points at the field."""


def parse_config(text: str, source: str = "<config>") -> PolicyConfig:
    """Validate YAML text; errors name the field path and what is allowed there."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with groups and quotas")
    data["version"] = hashlib.sha256(text.encode()).hexdigest()[:12]
    try:
        return PolicyConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = err["loc"]
            where = ".".join(str(p) for p in loc) or "quotas"
            if len(loc) >= 2 and loc[0] == "quotas" and isinstance(loc[1], int):
                quotas = data.get("quotas") or []
                name = quotas[loc[1]].get("name") if loc[1] < len(quotas) else None
                if isinstance(name, str):
                    where = ".".join([f"quotas[{name}]", *(str(p) for p in loc[2:])])
            lines.append(f"  {where}: {err['msg'].removeprefix('Value error, ')}")
        raise ConfigError(
            f"{source} is not a valid quota configuration:\n" + "\n".join(lines)
        ) from None


def load_config(path: Path) -> PolicyConfig:
    """Read and validate a quota file."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read quota configuration {path}: {exc.strerror}") from None
    return parse_config(text, str(path))


def load_or_empty(path: Path | None) -> PolicyConfig:
    """The configured quotas, or an empty configuration when no file is configured."""
    if path is None:
        return parse_config("{}", "<no quota file>")
    return load_config(path)
