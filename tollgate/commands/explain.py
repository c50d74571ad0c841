"""`tollgate explain DECISION_ID`: why the policy decided what it did, from its stored inputs."""

from __future__ import annotations

import asyncio
import io
import json
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg
import typer
from rich.console import Console
from rich.table import Table

from infra.settings import Settings
from services.policy.units import format_number

VERDICTS = {
    "terminate": "workload terminated",
    "block": "spawns blocked",
    "unblock": "spawns unblocked",
    "warning": "quota warning",
    "exceeded": "quota exceeded",
    "termination_scheduled": "termination scheduled (notice given)",
    "termination_cancelled": "scheduled termination cancelled",
}


def _verdict(row: asyncpg.Record) -> str:
    if row["kind"] == "spawn":
        return "spawn allowed" if row["allowed"] else "spawn denied"
    return VERDICTS[row["kind"]]


class DecisionNotFound(LookupError):
    """No stored decision has that id (or more than one starts with it)."""


def _when(t: datetime | str | None) -> str:
    if t is None:
        return "-"
    if isinstance(t, str):
        t = datetime.fromisoformat(t)
    return t.strftime("%Y-%m-%d %H:%M:%S UTC")


def _in_unit(q: dict[str, Any], key: str) -> str:
    value = Decimal(str(q.get(key) or 0)) / Decimal(str(q.get("factor") or 1))
    return f"{format_number(value)} {q.get('unit', '')}".strip()


async def find(conn: asyncpg.Connection, decision_id: str) -> asyncpg.Record:
    """A decision by id, or by a unique prefix of it (ids are long)."""
    rows = await conn.fetch(
        """SELECT d.*, c.source AS config_source, o.nats_subject, o.published_at
           FROM policy_decisions d
           LEFT JOIN policy_configs c ON c.version = d.policy_version
           LEFT JOIN policy_outbox o ON o.decision_id = d.decision_id
           WHERE d.decision_id LIKE $1 || '%'
           ORDER BY d.decision_id <> $1, d.decided_at LIMIT 2""",
        decision_id,
    )
    if not rows:
        raise DecisionNotFound(
            f"no decision {decision_id!r}: decision ids are printed in spawn decisions "
            "(decision_id) and are the command_id of terminations"
        )
    if len(rows) > 1 and rows[0]["decision_id"] != decision_id:
        raise DecisionNotFound(f"{decision_id!r} matches several decisions; give more of the id")
    return rows[0]


async def attempts_of(conn: asyncpg.Connection, row: asyncpg.Record) -> list[asyncpg.Record]:
    """Every terminate command of the crossing a termination belongs to, in order."""
    if row["kind"] != "terminate":
        return []
    inputs = json.loads(row["inputs"]) if row["inputs"] else {}
    crossing = inputs.get("crossing") or row["decision_id"]
    return list(
        await conn.fetch(
            """SELECT decision_id, decided_at, coalesce((inputs->>'attempt')::int, 1) AS attempt,
                      inputs->>'host' AS host, inputs->>'usage_until' AS usage_until
               FROM policy_decisions
               WHERE kind = 'terminate'
                 AND coalesce(inputs->>'crossing', decision_id) = $1
               ORDER BY attempt""",
            crossing,
        )
    )


def render(row: asyncpg.Record, attempts: list[asyncpg.Record] | None = None) -> str:
    """The decision as text: verdict, message, inputs, and each quota's numbers (and, for a
    termination, every command of its crossing: a workload that ignored them shows here)."""
    out = io.StringIO()
    console = Console(file=out, width=110, highlight=False, soft_wrap=True)
    inputs = json.loads(row["inputs"]) if row["inputs"] else {}
    console.print(f"[bold]Decision {row['decision_id']}[/]: {_verdict(row)} "
                  f"({row['reason']})")  # fmt: skip
    who = row["subject"] + (f", workload {row['workload']}" if row["workload"] else "")
    console.print(f"  at {_when(row['decided_at'])} for {who}")
    console.print(f"  {row['message']}")
    console.print("[bold]Based on[/]")
    source = f" ({row['config_source']})" if row["config_source"] else ""
    console.print(f"  policy version   {row['policy_version']}{source}")
    console.print(f"  usage as of      ledger seq {row['as_of_seq']}")
    console.print(f"  groups resolved  {', '.join(row['groups']) or '(none)'}")
    if row["fail_open"] or "failure_mode" in inputs:
        console.print(f"  failure_mode     {inputs.get('failure_mode')}: {inputs.get('why')}")
    request = inputs.get("request")
    if request:
        res = request.get("resources", {})
        mem = Decimal(str(res.get("mem_bytes", 0))) / 2**30
        console.print(
            f"  request          {res.get('cpus', 0)} cpus, {format_number(mem)} GiB, "
            f"{res.get('gpus', 0)} gpus for {request.get('expected_seconds')} s"
        )
    if row["reservation"]:
        held = json.loads(row["reservation"])
        amounts = ", ".join(f"{m} {a}" for m, a in sorted(held["amounts"].items()))
        console.print(f"  reservation      {amounts} (until {_when(held['expires'])} at most)")
    quotas = inputs.get("quotas") or ([inputs] if "metric" in inputs else [])
    if quotas and row["kind"] == "spawn":
        table = Table("quota", "metric", "window", "used", "held", "this spawn", "limit")
        for q in quotas:
            table.add_row(
                q["name"], q["metric"], q.get("window_text") or q["window"],
                _in_unit(q, "used"), _in_unit(q, "reserved"), _in_unit(q, "need"),
                _in_unit(q, "limit"),
            )  # fmt: skip
        console.print(table)
    elif quotas:
        table = Table("quota", "metric", "window", "instance", "used", "limit")
        for q in quotas:
            table.add_row(
                row["quota"] or "", q["metric"], q.get("window_text") or q["window"],
                q.get("period", ""), _in_unit(q, "used"), _in_unit(q, "limit"),
            )  # fmt: skip
        console.print(table)
    for q in quotas:
        _limit_detail(console, q)
    if inputs.get("retry_at"):
        console.print(f"  quota returns    {_when(inputs['retry_at'])}")
    if inputs.get("notice_id"):
        at = inputs.get("terminate_at") or inputs.get("notice_terminate_at")
        console.print(f"  notice           {inputs['notice_id']}, termination at {_when(at)}")
    if inputs.get("sentence"):
        console.print(f"  told the workload  Tollgate: {inputs['sentence']}")
    if row["nats_subject"]:
        sent = _when(row["published_at"]) if row["published_at"] else "not yet published"
        console.print(f"  sent on {row['nats_subject']}: {sent}")
    if attempts and len(attempts) > 1:
        _repeats(console, row, attempts)
    return out.getvalue()


def _repeats(console: Console, row: asyncpg.Record, attempts: list[asyncpg.Record]) -> None:
    hosts = sorted({a["host"] for a in attempts if a["host"]})
    ignored = len(attempts) - 1
    console.print(
        f"[bold]Not obeyed[/]: usage kept coming from host {', '.join(hosts) or '?'} after "
        f"{ignored} terminate command{'s' if ignored != 1 else ''}, so the policy sent "
        f"{len(attempts)} in all"
    )
    table = Table("#", "command id", "decided at", "host", "its usage sampled up to")
    table.columns[1].no_wrap = True
    for a in attempts:
        mark = " (this one)" if a["decision_id"] == row["decision_id"] else ""
        table.add_row(
            str(a["attempt"]), f"{a['decision_id']}{mark}", _when(a["decided_at"]),
            a["host"] or "", _when(a["usage_until"]) if a["usage_until"] else "-",
        )  # fmt: skip
    console.print(table)


def _limit_detail(console: Console, q: dict[str, Any]) -> None:
    """What a quota's limit was made of: configured limit, grace, soft mode, grants."""
    name = q.get("name") or ", ".join(q.get("rules") or [])
    if q.get("mode") == "soft":
        console.print(f"  {name}: soft limit, reported and never enforced")
    elif q.get("grace") not in (None, "0", 0):
        console.print(
            f"  {name}: {Decimal(str(q['grace'])):%} grace, enforced from "
            f"{_in_unit(q, 'enforced_limit')}"
        )
    for g in q.get("grants") or []:
        amount = _in_unit({**q, "amount": g["amount"]}, "amount")
        console.print(
            f"  {name}: limit {_in_unit(q, 'base_limit')} + grant {g['grant_id']} of {amount} "
            f"until {_when(g['expires_at'])} (by {g['granted_by']})"
        )
    for g in q.get("lapsed_grants") or []:
        ended = "revoked " + _when(g["revoked_at"]) if g.get("revoked_at") else "expired"
        console.print(f"  {name}: grant {g['grant_id']} no longer counts ({ended})")


async def explain_text(pool: asyncpg.Pool, decision_id: str) -> str:
    async with pool.acquire() as conn:
        row = await find(conn, decision_id)
        return render(row, await attempts_of(conn, row))


def explain(decision_id: str = typer.Argument(..., help="a decision id or command id")) -> None:
    """Print why the policy made a decision: verdict, inputs and each quota's numbers."""
    _, database_url = Settings().require_servers()

    async def main() -> str:
        conn = await asyncpg.connect(database_url)
        try:
            row = await find(conn, decision_id)
            return render(row, await attempts_of(conn, row))
        finally:
            await conn.close()

    try:
        typer.echo(asyncio.run(main()), nl=False)
    except DecisionNotFound as exc:
        typer.echo(f"tollgate explain: {exc}", err=True)
        raise typer.Exit(1) from None


def register(app: typer.Typer) -> None:
    app.command()(explain)
