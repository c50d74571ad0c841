"""`tollgate report`: every subject's usage per metric, as a table, CSV or JSON.

Reads `GET /v1/reports/usage` with the admin token, so it prints exactly what the API
serves (the same rollups, the same range rules) and works against a remote API too.
"""

from __future__ import annotations

import json
from decimal import Decimal
from enum import StrEnum
from typing import Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from infra.settings import Settings


class Output(StrEnum):
    TABLE = "table"
    CSV = "csv"
    JSON = "json"


class GroupBy(StrEnum):
    SUBJECT = "subject"
    WORKLOAD = "workload"
    HOST = "host"
    DAY = "day"


class ReportFailed(Exception):
    """The report could not be fetched; the message says what to do."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def fetch(settings: Settings, params: dict[str, str], csv: bool) -> httpx.Response:
    """The report from the API, or `ReportFailed` saying why not."""
    token = settings.resolved_admin_token()
    if not token:
        raise ReportFailed(
            "no admin token: set TOLLGATE_ADMIN_TOKEN, or run where `tollgate up` keeps its "
            f"data ({settings.data_dir}/admin-token)",
            2,
        )
    url = settings.api_url_from_endpoints()
    try:
        r = httpx.get(
            f"{url}/v1/reports/usage",
            params={**params, "format": "csv" if csv else "json"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
    except httpx.HTTPError as exc:
        raise ReportFailed(
            f"cannot reach the API at {url} ({type(exc).__name__}); start the stack with "
            "`tollgate up`, or point TOLLGATE_DATA_DIR at the one that runs",
            2,
        ) from None
    if r.status_code != 200:
        try:
            detail = r.json()["detail"]
        except (ValueError, KeyError, TypeError):
            detail = r.text[:300]
        raise ReportFailed(f"the API answered {r.status_code}: {detail}")
    return r


def money(value: str | None) -> str:
    """A cost as people read it: to the cent (the JSON keeps 6 places)."""
    if value is None:
        return ""
    return f"{Decimal(value).quantize(Decimal('0.01')):,}"


def render(body: dict[str, Any]) -> Table:
    """The JSON report as a table, amounts in units people read."""
    from services.api.humanize import human

    group = body["group_by"]
    table = Table(title=f"Usage from {body['from']} to {body['to']}", title_justify="left")
    table.add_column("subject")
    if group != "subject":
        table.add_column(group)
    table.add_column("metric")
    table.add_column("total", justify="right")
    table.add_column("exact", justify="right", style="dim")
    table.add_column("events", justify="right")
    currency = body.get("currency")
    if currency:
        table.add_column(f"cost ({currency})", justify="right")
    for row in body["rows"]:
        total = Decimal(row["total"])
        cells = [row["subject"]] + ([str(row[group])] if group != "subject" else [])
        cells += [row["metric"], human(row["metric"], total), f"{row['total']} {row['unit']}",
                  f"{row['events']:,}"]  # fmt: skip
        if currency:
            cells.append(money(row.get("cost")))
        table.add_row(*cells)
    totals = ", ".join(
        f"{t['metric']} {human(t['metric'], Decimal(t['total']))}" for t in body["totals"]
    )
    table.caption = f"{body['subjects']} subjects · ledger seq {body['as_of_seq']}" + (
        f" · all together: {totals}" if totals else ""
    )
    if currency:
        table.caption += f" · cost {money(body.get('total_cost'))} {currency}"
    table.caption_justify = "left"
    return table


def report(
    from_: str | None = typer.Option(
        None,
        "--from",
        help="ISO-8601 start with zone, e.g. 2026-11-01T00:00:00Z (default: 30 days ago)",
    ),
    to: str | None = typer.Option(
        None, "--to", help="ISO-8601 end with zone (default: now, to where quota windows end)"
    ),
    group_by: GroupBy = typer.Option(GroupBy.SUBJECT, "--group-by", help="split further by this"),
    metric: str | None = typer.Option(None, "--metric", help="only this metric"),
    output: Output = typer.Option(Output.TABLE, "--format", "-f", help="table, csv or json"),
) -> None:
    """Every subject's usage per metric over a range (admin token), from the API."""
    params = {"group_by": group_by.value}
    for key, value in (("from", from_), ("to", to), ("metric", metric)):
        if value is not None:
            params[key] = value
    try:
        r = fetch(Settings(), params, csv=output is Output.CSV)
    except ReportFailed as exc:
        typer.echo(f"tollgate report: {exc}", err=True)
        raise typer.Exit(exc.code) from None
    if output is Output.CSV:
        typer.echo(r.text, nl=False)
    elif output is Output.JSON:
        typer.echo(json.dumps(r.json(), indent=2))
    else:
        body = r.json()
        console = Console()
        if not body["rows"]:
            console.print(f"No usage from {body['from']} to {body['to']}.")
            return
        console.print(render(body))


def register(app: typer.Typer) -> None:
    app.command()(report)
