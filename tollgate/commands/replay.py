"""`tollgate replay`: read the ledger in order, verify its hash chain, rebuild its projections."""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING

import asyncpg
import typer
from rich.console import Console

from infra.settings import Settings
from services.ledger.replay import event_line, events_after, rebuild_rollups

if TYPE_CHECKING:
    from services.policy.grants import ChainCheck

# What only --verify needs (the progress bar, the grants record) is imported there: the
# command is also a quick check that scripts run often (`--rebuild --check`), and its start
# counts in the bench's P6.
console = Console(stderr=True)


async def _connect() -> asyncpg.Connection:
    s = Settings().with_endpoints()
    if not s.database_url:
        raise SystemExit(
            "Tollgate does not know where Postgres is: start the stack with `tollgate up` "
            "(it writes .tollgate/endpoints.json) or set TOLLGATE_DATABASE_URL."
        )
    return await asyncpg.connect(s.database_url, server_settings={"timezone": "UTC"})


async def _dump(after: int, limit: int | None) -> int:
    conn = await _connect()
    try:
        out = sys.stdout
        async for event in events_after(conn, after, limit):
            out.write(event_line(event))
        return 0
    finally:
        await conn.close()


async def _verify() -> int:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from services.ledger.replay import verify_chain
    from services.policy import grantstore

    conn = await _connect()
    try:
        total = await conn.fetchval("SELECT last_seq FROM ledger_head WHERE id = 1") or 0
        with Progress(
            TextColumn("verifying hash chain"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=console, transient=True,
        ) as bar:  # fmt: skip
            task = bar.add_task("verify", total=total)
            verdict = await verify_chain(conn, lambda n: bar.advance(task, n))
        grants = await grantstore.verify_chain(conn)
    finally:
        await conn.close()
    grants_ok = _report_grants(grants)
    if verdict.ok:
        console.print(
            f"[green]OK[/]: {verdict.batches} batches, {verdict.events} events; "
            f"head hash {verdict.head_hash}"
        )
        return 0 if grants_ok else 1
    console.print(
        f"[red]TAMPERED[/]: batch {verdict.first_bad_batch} is the first that does not hold: "
        f"{verdict.problem}. The {verdict.batches} batches before it verify "
        f"({verdict.events} events). Restore that batch's events from a backup or the usage "
        "feed, and find out who could write to the database."
    )
    return 1


def _report_grants(v: ChainCheck) -> bool:
    """The grants record's chain verdict, one line (it is verified beside the ledger)."""
    if v.ok:
        console.print(f"[green]OK[/]: grants record, {v.records} records; head hash {v.head_hash}")
        return True
    console.print(
        f"[red]TAMPERED[/]: grant record {v.first_bad_seq} does not hold: {v.problem}. The "
        f"{v.records} grant records before it verify. Find out who could write to the database."
    )
    return False


async def _rebuild(check_only: bool) -> int:
    conn = await _connect()
    helpers: list[asyncpg.Connection] = []
    try:
        # As many more processes as Postgres would give one parallel query.
        more = int(await conn.fetchval("SELECT current_setting('max_parallel_workers_per_gather')"))
        helpers = list(await asyncio.gather(*(_connect() for _ in range(more))))
        with console.status("rebuilding hourly rollups from the events"):
            result = await rebuild_rollups(conn, apply=not check_only, helpers=helpers)
    finally:
        for c in [conn, *helpers]:
            await c.close()
    if result.identical:
        console.print(f"[green]identical[/]: {result.rows} rollup rows match the events")
        return 0
    what = "would change" if check_only else "rebuilt"
    console.print(
        f"[yellow]{what}[/]: {result.missing} rows were missing or different and "
        f"{result.extra} rows had no events behind them ({result.rows} rows now)"
    )
    return 1 if check_only else 0


def register(app: typer.Typer) -> None:
    @app.command()
    def replay(
        after: int = typer.Option(0, help="print events with a ledger sequence above this"),
        limit: int | None = typer.Option(None, min=1, help="at most this many events"),
        verify: bool = typer.Option(False, "--verify", help="recompute the hash chain"),
        rebuild: bool = typer.Option(
            False, "--rebuild", help="rebuild the hourly rollups from the events"
        ),
        check: bool = typer.Option(
            False, "--check", help="with --rebuild: compare only, change nothing"
        ),
    ) -> None:
        """Print ledger events as NDJSON in order, or verify / rebuild the ledger."""
        if verify:
            code = asyncio.run(_verify())
        elif rebuild:
            code = asyncio.run(_rebuild(check))
        else:
            code = asyncio.run(_dump(after, limit))
        raise typer.Exit(code)
