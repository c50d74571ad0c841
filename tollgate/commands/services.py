"""`tollgate ledger | policy | api`: one service each, against external NATS and Postgres."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer
from prometheus_client import start_http_server

from infra.bus import CredentialsError, seed_public_key
from infra.settings import Settings
from services.api.errors import ApiStartupError
from services.policy.config import ConfigError
from tollgate import bootstrap, logs


def _run_one(name: str, config: Path | None = None) -> None:
    logs.configure()
    settings = Settings()
    if config is not None:
        settings = settings.model_copy(update={"config": config})
    nats_url, database_url = settings.require_servers()
    settings = settings.model_copy(update={"nats_url": nats_url, "database_url": database_url})
    if settings.nats_nkey_seed_file is not None:
        try:  # now, not after a retry loop: a wrong file does not fix itself
            seed_public_key(settings.nats_nkey_seed_file)
        except CredentialsError as exc:
            typer.echo(f"tollgate {name}: {exc}", err=True)
            raise typer.Exit(2) from None

    if settings.metrics_port and name != "api":  # the api serves /metrics itself
        start_http_server(settings.metrics_port, addr=settings.api_host)

    async def main() -> None:
        stop = asyncio.Event()
        bootstrap.install_stop_signals(stop)
        await bootstrap.run_together(settings, [name], stop)

    try:
        asyncio.run(main())
    except ApiStartupError as exc:
        typer.echo(f"The API could not start: {exc}", err=True)
        raise typer.Exit(1) from None
    except ConfigError as exc:  # a quota file that does not validate: say where, not a trace
        typer.echo(f"tollgate {name}: {exc}", err=True)
        raise typer.Exit(2) from None


def register(app: typer.Typer) -> None:
    @app.command()
    def ledger() -> None:
        """Run the ledger: fold counter samples into the usage ledger, exactly once."""
        _run_one("ledger")

    @app.command()
    def policy(
        config: Path | None = typer.Option(
            None, help="quota YAML (default: TOLLGATE_CONFIG); reloaded on change or SIGHUP"
        ),
    ) -> None:
        """Run the policy service: answer spawn checks from the ledger's numbers."""
        _run_one("policy", config)

    @app.command()
    def api() -> None:
        """Run the HTTP API (quotas, usage, health) on TOLLGATE_API_HOST:TOLLGATE_API_PORT."""
        _run_one("api")
