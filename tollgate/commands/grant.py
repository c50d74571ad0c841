"""`tollgate grant add|list|revoke|verify`: grants through the API, with the admin token.

The API checks the request against the quota file, appends it to the hash-chained record
and cues the policy, so the CLI and an HTTP client get exactly the same rules and answers.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
import typer
from rich.console import Console
from rich.table import Table

from infra.settings import Settings

app = typer.Typer(no_args_is_help=True, help="Grant extra allowance on a quota, list, revoke.")


class GrantFailed(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def call(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One API request with the admin token; `GrantFailed` with the API's sentence if refused."""
    settings = Settings()
    token = settings.resolved_admin_token()
    if not token:
        raise GrantFailed(
            "no admin token: set TOLLGATE_ADMIN_TOKEN, or run where `tollgate up` keeps its "
            f"data ({settings.data_dir}/admin-token)",
            2,
        )
    url = settings.api_url_from_endpoints()
    try:
        r = httpx.request(
            method, f"{url}{path}", json=body, timeout=30,
            headers={"Authorization": f"Bearer {token}"},
        )  # fmt: skip
    except httpx.HTTPError as exc:
        raise GrantFailed(
            f"cannot reach the API at {url} ({type(exc).__name__}); start the stack with "
            "`tollgate up`, or point TOLLGATE_DATA_DIR at the one that runs",
            2,
        ) from None
    if r.status_code >= 400:
        try:
            detail = r.json()["detail"]
        except (ValueError, KeyError, TypeError):
            detail = r.text[:300]
        raise GrantFailed(f"refused ({r.status_code}): {detail}")
    return r.json()


def _run(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    try:
        return call(method, path, body)
    except GrantFailed as exc:
        typer.echo(f"tollgate grant: {exc}", err=True)
        raise typer.Exit(exc.code) from None


def _line(g: dict[str, Any]) -> str:
    return (
        f"{g['grant_id']}: {g['amount_text']} on {g['quota']} for {g['scope']} {g['target']}, "
        f"{g['state']} until {g['expires_at']} ({g['remaining']} {g['unit']} left), "
        f"granted by {g['granted_by']}: {g['reason']}"
    )


@app.command("add")
def add(
    target: str = typer.Argument(..., help="the subject (or, with --group, the group)"),
    quota: str = typer.Option(..., help="the quota's name in the quota file"),
    amount: str = typer.Option(..., help="e.g. '10 GiB*h', '50 GB', '100 core*h'"),
    reason: str = typer.Option(..., help="why; kept in the audited record"),
    expires_in: str | None = typer.Option(None, help="e.g. 7d, 12h"),
    expires_at: str | None = typer.Option(None, help="ISO time with zone, e.g. 2026-12-24T00:00Z"),
    group: bool = typer.Option(False, "--group", help="TARGET is a group pool (per: group)"),
) -> None:
    """Give extra allowance on one quota until it expires."""
    body: dict[str, Any] = {"quota": quota, "amount": amount, "reason": reason}
    if expires_in is not None:
        body["expires_in"] = expires_in
    if expires_at is not None:
        body["expires_at"] = expires_at
    kind = "groups" if group else "subjects"
    g = _run("POST", f"/v1/{kind}/{quote(target, safe='')}/grants", body)
    Console().print(f"[green]granted[/] {_line(g)}")


@app.command("list")
def list_(
    target: str = typer.Argument(..., help="the subject (or, with --group, the group)"),
    group: bool = typer.Option(False, "--group", help="TARGET is a group"),
) -> None:
    """A subject's grants (and its groups' pool grants), or a group's."""
    kind = "groups" if group else "subjects"
    found = _run("GET", f"/v1/{kind}/{quote(target, safe='')}/grants")
    if not found["grants"]:
        Console().print(f"No grants for {target}.")
        return
    table = Table(title=f"Grants of {target}", title_justify="left")
    for column in ("id", "quota", "for", "amount", "left", "state", "until", "by", "reason"):
        table.add_column(column, justify="right" if column in ("amount", "left") else "left")
    for g in found["grants"]:
        table.add_row(
            g["grant_id"], g["quota"], f"{g['scope']} {g['target']}", g["amount_text"],
            f"{g['remaining']} {g['unit']}", g["state"], g["expires_at"][:16].replace("T", " "),
            g["granted_by"], g["reason"],
        )  # fmt: skip
    Console().print(table)


@app.command("revoke")
def revoke(
    grant_id: str = typer.Argument(..., help="e.g. g-3f9c2a1b0d4e"),
    reason: str = typer.Option(..., help="why; kept in the audited record"),
) -> None:
    """End a grant now (a revocation is a record of its own)."""
    g = _run("POST", f"/v1/grants/{quote(grant_id, safe='')}/revoke", {"reason": reason})
    Console().print(f"[yellow]revoked[/] {_line(g)}")


@app.command("verify")
def verify() -> None:
    """Recompute the grants record's hash chain."""
    v = _run("GET", "/v1/audit/grants/verify")
    if v["ok"]:
        Console().print(f"[green]OK[/]: {v['records']} grant records; head hash {v['head_hash']}")
        return
    Console().print(
        f"[red]TAMPERED[/]: grant record {v['first_bad_seq']} does not hold: {v['problem']}. "
        f"The {v['records']} records before it verify. Find out who could write to the database."
    )
    raise typer.Exit(1)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="grant")
