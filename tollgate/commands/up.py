"""`tollgate up`: the whole system on one machine, embedded servers unless told otherwise."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from importlib import resources
from pathlib import Path

import asyncpg
import typer
from rich.console import Console

from services.api.errors import ApiStartupError
from tollgate import bootstrap, logs
from tollgate.embedded import EmbeddedNats, EmbeddedPostgres, EmbeddedServerError
from tollgate.settings import Settings

log = logging.getLogger("tollgate.up")
console = Console(stderr=True)
DATABASE = "tollgate"


async def _ensure_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _banner(settings: Settings, api_url: str, token_from_env: bool, demo: bool) -> None:
    console.print(f"[bold green]Tollgate is up.[/] API: [bold]{api_url}[/]  (docs: {api_url}/docs)")
    console.print(f"  Web page:  {api_url}/  (sign in with a token from `tollgate token issue`)")
    console.print(f"  NATS:      {settings.nats_url}")
    console.print(f"  Postgres:  {settings.database_url}")
    token_file = settings.data_dir / "admin-token"
    where = "from TOLLGATE_ADMIN_TOKEN" if token_from_env else f"in {token_file}"
    console.print(f"  Admin token: {where}")
    console.print(f"  Endpoints written to {settings.endpoints_file}")
    user = "bob" if demo else "<subject>"
    token = "$TOLLGATE_ADMIN_TOKEN" if token_from_env else f"$(cat {token_file})"
    console.print(
        f'  Try: curl -H "Authorization: Bearer {token}" {api_url}/v1/subjects/{user}/usage',
        soft_wrap=True,
    )
    console.print("  Ctrl-C stops everything; data stays in " + str(settings.data_dir))


async def _up(settings: Settings, demo: bool) -> None:
    stop = asyncio.Event()
    bootstrap.install_stop_signals(stop)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if not _port_free(settings.api_host, settings.api_port):
        raise SystemExit(
            f"Port {settings.api_port} on {settings.api_host} is already in use. Stop whatever "
            "listens there or choose another port with TOLLGATE_API_PORT=8081."
        )
    nats = postgres = None
    try:
        if not settings.nats_url:
            nats = EmbeddedNats(settings.data_dir / "nats").start()
            settings = settings.model_copy(update={"nats_url": nats.url})
        if not settings.database_url:
            postgres = EmbeddedPostgres(settings.data_dir / "postgres").start()
            await _ensure_database(postgres.url(), DATABASE)
            settings = settings.model_copy(update={"database_url": postgres.url(DATABASE)})
        if demo and settings.config is None:
            demo_config = resources.files("tollgate") / "demo-quotas.yaml"
            settings = settings.model_copy(update={"config": Path(str(demo_config))})
        token_from_env = bool(settings.admin_token)
        settings = settings.model_copy(update={"admin_token": settings.ensure_admin_token()})
        settings.resolved_token_secret(create=True)
        api_url = f"http://{settings.api_host}:{settings.api_port}"
        settings.endpoints_file.write_text(
            json.dumps(
                {"nats_url": settings.nats_url, "database_url": settings.database_url,
                 "api_url": api_url},
                indent=2,
            )
            + "\n"
        )  # fmt: skip
        extra = []
        if demo:
            extra.append(lambda s: _demo(settings, s))
        _banner(settings, api_url, token_from_env, demo)
        await bootstrap.run_together(settings, ["ledger", "policy", "api"], stop, extra)
    finally:
        console.print("Stopping…")
        with contextlib.suppress(OSError):
            settings.endpoints_file.unlink()
        if nats is not None:
            nats.stop()
        if postgres is not None:
            postgres.stop()
        console.print("Stopped. Data kept in " + str(settings.data_dir))


async def _demo(settings: Settings, stop: asyncio.Event) -> None:
    from tollgate.demo import run_fleet

    nc = await bootstrap.open_nats(settings, "tollgate-demo", stop)
    try:
        await run_fleet(nc, settings.prefix, stop)
    finally:
        await nc.close()


def register(app: typer.Typer) -> None:
    @app.command()
    def up(
        demo: bool = typer.Option(False, "--demo", help="add a simulated fleet"),
    ) -> None:
        """Run ledger, policy and api on this machine (embedded NATS and Postgres unless
        TOLLGATE_NATS_URL / TOLLGATE_DATABASE_URL are set)."""
        logs.configure()
        try:
            asyncio.run(_up(Settings(), demo))
        except EmbeddedServerError as exc:
            console.print(f"[red]Could not start an embedded server:[/] {exc}")
            raise typer.Exit(1) from None
        except ApiStartupError as exc:
            console.print(f"[red]The API could not start:[/] {exc}")
            raise typer.Exit(1) from None
