"""`tollgate up`: the whole system on one machine, embedded servers unless told otherwise."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from pathlib import Path

import asyncpg
import typer
from rich.console import Console

from infra.bus import close_quietly
from infra.settings import Settings
from infra.tasks import cancel_and_wait
from services.api.errors import ApiStartupError
from tollgate import bootstrap, logs
from tollgate.embedded import (
    EmbeddedNats,
    EmbeddedPostgres,
    EmbeddedServerError,
    StartAborted,
    port_free,
)
from tollgate.supervise import Server, ServerLost, Supervisor, force_stop, stop_servers

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


def _stop_signals(stop: asyncio.Event, servers: Sequence[Server], endpoints: Path) -> None:
    """The first Ctrl-C (or SIGTERM) stops cleanly; a second one exits at once (128+signal)."""
    loop = asyncio.get_running_loop()
    signalled = False

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signalled
        if not signalled:
            signalled = True
            again = "Ctrl-C" if sig == signal.SIGINT else sig.name
            console.print(f"Stopping… ({again} again stops at once)")
            stop.set()
            return
        force_stop(servers)
        with contextlib.suppress(OSError):
            endpoints.unlink()
        console.print(
            f"Stopped at once (second {sig.name}, exit {128 + sig}): NATS and Postgres were "
            "told to quit without waiting; nothing acked is lost."
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)


async def _start(server: EmbeddedNats | EmbeddedPostgres, stop: asyncio.Event) -> None:
    # In a thread, so that Ctrl-C is heard while a server starts (initdb takes seconds).
    await asyncio.to_thread(server.start, abort=stop.is_set)


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
    servers: list[Server] = []
    _stop_signals(stop, servers, settings.endpoints_file)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if not port_free(settings.api_port, settings.api_host):
        raise SystemExit(
            f"Port {settings.api_port} on {settings.api_host} is already in use. Stop whatever "
            "listens there or choose another port with TOLLGATE_API_PORT=8081."
        )
    try:
        if not settings.nats_url:
            nats = EmbeddedNats(settings.data_dir / "nats")
            servers.append(nats)
            await _start(nats, stop)
            settings = settings.model_copy(update={"nats_url": nats.url})
        if not settings.database_url:
            postgres = EmbeddedPostgres(settings.data_dir / "postgres")
            servers.append(postgres)
            await _start(postgres, stop)
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
        extra: list[Callable[[asyncio.Event], Awaitable[None]]] = []
        if demo:
            extra.append(lambda s: _demo(settings, s))
        _banner(settings, api_url, token_from_env, demo)
        await _serve(settings, stop, extra, Supervisor(servers))
    except StartAborted:
        pass  # Ctrl-C while a server was starting: stop what did start, quietly
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            settings.endpoints_file.unlink()
        await stop_servers(servers, grace=5.0)
        console.print("Stopped. Data kept in " + str(settings.data_dir), soft_wrap=True)


async def _serve(
    settings: Settings,
    stop: asyncio.Event,
    extra: list[Callable[[asyncio.Event], Awaitable[None]]],
    supervisor: Supervisor,
) -> None:
    """The services and the supervisor of their servers, until `stop` or a lost server."""
    services = asyncio.create_task(
        bootstrap.run_together(settings, ["ledger", "policy", "api"], stop, extra)
    )
    supervising = asyncio.create_task(supervisor.run(stop))
    try:
        await asyncio.wait([services, supervising], return_when=asyncio.FIRST_COMPLETED)
        lost = supervising.exception() if supervising.done() else None
        if isinstance(lost, ServerLost):  # said now, not after the stop it causes
            console.print(f"[red]An embedded server is gone.[/] {lost}", soft_wrap=True)
    finally:
        stop.set()
        # The services first: they stop within bootstrap.STOP_GRACE whatever the servers do.
        await asyncio.gather(services, supervising, return_exceptions=True)
    supervising.result()  # raises ServerLost
    services.result()


async def _demo(settings: Settings, stop: asyncio.Event) -> None:
    from tollgate.demo import run_fleet

    nc = await bootstrap.open_nats(settings, "tollgate-demo", stop)
    fleet = asyncio.create_task(run_fleet(nc, settings.prefix, stop))
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([fleet, stopping], return_when=asyncio.FIRST_COMPLETED)
        # A simulated fleet has nothing to finish: a publish waiting on NATS is let go.
        await cancel_and_wait([fleet])
        if not fleet.cancelled():
            fleet.result()  # a fleet that failed says why
    finally:
        stopping.cancel()
        await close_quietly(nc)


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
        except ServerLost:
            raise typer.Exit(1) from None  # said when it happened, by _serve
        except EmbeddedServerError as exc:
            console.print(f"[red]Could not start an embedded server:[/] {exc}")
            raise typer.Exit(1) from None
        except ApiStartupError as exc:
            console.print(f"[red]The API could not start:[/] {exc}")
            raise typer.Exit(1) from None
