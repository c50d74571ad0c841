"""`tollgate quota SUBJECT`: where a subject stands against each of its quotas, as a table."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import typer
from rich.console import Console
from rich.table import Table

from contracts.spawn import QuotaStatus
from infra.settings import Settings
from services.policy.config import ConfigError, PolicyConfig, load_config, parse_config
from services.policy.quotas import SubjectQuotas, subject_quotas
from services.policy.units import format_number

STATE_STYLE = {"ok": "green", "warning": "yellow", "exceeded": "bold red"}


async def _config(conn: asyncpg.Connection, path: Path | None) -> tuple[PolicyConfig, str]:
    """The quota file given, else the configuration the policy last ran with."""
    if path is not None:
        return load_config(path), str(path)
    row = await conn.fetchrow(
        "SELECT version, source, body FROM policy_configs ORDER BY last_seen DESC LIMIT 1"
    )
    if row is None:
        raise ConfigError(
            "no quota configuration known: the policy has not run against this database yet. "
            "Pass --config quotas.yaml (or set TOLLGATE_CONFIG)."
        )
    return parse_config(row["body"], row["source"]), f"{row['source']} as the policy runs it"


async def gather(
    database_url: str, subject: str, path: Path | None, max_skew: timedelta
) -> tuple[SubjectQuotas, str, list[asyncpg.Record]]:
    conn = await asyncpg.connect(database_url, server_settings={"timezone": "UTC"})
    try:
        config, where = await _config(conn, path)
        blocks = await conn.fetch(
            "SELECT quota, until FROM policy_marks WHERE subject = $1 AND kind = 'block'", subject
        )
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        found = await subject_quotas(pool, config, subject, max_skew=max_skew)
    finally:
        await pool.close()
    return found, where, list(blocks)


def _when(t: datetime | None) -> str:
    return "-" if t is None else t.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def render(subject: str, found: SubjectQuotas, where: str, blocks: list[asyncpg.Record]) -> Table:
    table = Table(title=f"Quotas of {subject}", title_justify="left")
    for column in ("quota", "metric", "window"):
        table.add_column(column)
    for column in ("used", "limit", "remaining"):
        table.add_column(column, justify="right")
    table.add_column("state")
    table.add_column("returns")
    table.add_column("runs out at this rate")
    for q, st in zip(found.quotas, found.statuses, strict=True):
        unit = f" {st.unit}" if st.unit else ""
        table.add_row(
            st.name, st.metric, q.window.describe(),
            f"{format_number(st.used)}{unit}", f"{format_number(st.limit)}{unit}",
            f"{format_number(st.remaining)}{unit}",
            f"[{STATE_STYLE[st.state]}]{st.state}[/]", _when(st.retry_at),
            _when(st.projected_exhaustion_at),
        )  # fmt: skip
    as_of = _when(found.as_of) if found.as_of else "no usage yet"
    table.caption = (
        f"groups: {', '.join(found.groups) or '(none)'} · quotas from {where} · usage as of "
        f"ledger seq {found.as_of_seq} ({as_of})"
        + "".join(f"\nspawns blocked by {b['quota']} until {_when(b['until'])}" for b in blocks)
        + "".join(_limit_lines(st) for st in found.statuses)
    )
    table.caption_justify = "left"
    return table


def _limit_lines(st: QuotaStatus) -> str:
    """Grants in a quota's limit, and what being over it means (grace, soft)."""
    unit = f" {st.unit}" if st.unit else ""
    out = "".join(
        f"\n{st.name}: includes grant {g.grant_id} of {format_number(g.amount)}{unit} "
        f"until {_when(g.expires_at)}"
        for g in st.grants
    )
    if st.note:
        out += f"\n{st.name}: {st.note}"
    return out


def quota(
    subject: str = typer.Argument(..., help="whose quotas, e.g. alice"),
    config: Path | None = typer.Option(
        None, help="quota YAML (default: TOLLGATE_CONFIG, else what the policy last ran with)"
    ),
) -> None:
    """Show a subject's quotas: used, limit, remaining, state and when quota returns."""
    settings = Settings()
    _, database_url = settings.require_servers()
    try:
        found, where, blocks = asyncio.run(
            gather(database_url, subject, config or settings.config, settings.max_clock_skew)
        )
    except ConfigError as exc:
        typer.echo(f"tollgate quota: {exc}", err=True)
        raise typer.Exit(1) from None
    console = Console()
    if not found.quotas:
        console.print(f"No quota applies to {subject} (groups: {', '.join(found.groups) or '-'}).")
        return
    console.print(render(subject, found, where, blocks))


def register(app: typer.Typer) -> None:
    app.command()(quota)
