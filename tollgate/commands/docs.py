"""`tollgate docs`: write the contract documents (AsyncAPI for NATS, OpenAPI for HTTP)."""

from __future__ import annotations

from pathlib import Path

import typer

ASYNCAPI = "asyncapi.yaml"
METER_ASYNCAPI = "asyncapi-meter.yaml"
OPENAPI = "openapi.json"


def docs(
    out: Path = typer.Option(Path("docs"), "--out", help="directory to write the documents to"),
    check: bool = typer.Option(
        False, "--check", help="write nothing; exit 1 if the files differ from the code"
    ),
) -> None:
    """Write docs/asyncapi.yaml, docs/asyncapi-meter.yaml and docs/openapi.json from the code
    that serves them."""
    from tollgate.apidocs import asyncapi_yaml, meter_asyncapi_yaml, openapi_json

    wanted = {
        out / ASYNCAPI: asyncapi_yaml(),
        out / METER_ASYNCAPI: meter_asyncapi_yaml(),
        out / OPENAPI: openapi_json(),
    }
    stale = [p for p, text in wanted.items() if not p.exists() or p.read_text() != text]
    if check:
        for path in stale:
            typer.echo(f"{path} is out of date: run `tollgate docs` and commit it", err=True)
        raise typer.Exit(1 if stale else 0)
    out.mkdir(parents=True, exist_ok=True)
    for path, text in wanted.items():
        path.write_text(text)
        typer.echo(f"{'wrote' if path in stale else 'unchanged'} {path}")


def register(app: typer.Typer) -> None:
    app.command("docs")(docs)
