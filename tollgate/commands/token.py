"""`tollgate token issue`: mint a signed bearer token for the HTTP API."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from enum import StrEnum
from urllib.parse import quote

import typer

from infra.settings import Settings


class SignedRole(StrEnum):
    # The admin token is static (TOLLGATE_ADMIN_TOKEN), so it is not offered here.
    USER = "user"
    AUDITOR = "auditor"
    INTEGRATOR = "integrator"


def _ttl(text: str) -> timedelta:
    from services.policy.config import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def issue(
    subject: str = typer.Option(..., "--subject", "-s", help="who the token acts as, e.g. alice"),
    role: SignedRole = typer.Option(
        SignedRole.USER,
        "--role",
        "-r",
        help="what it may do (admins use TOLLGATE_ADMIN_TOKEN instead)",
    ),
    ttl: str = typer.Option("30d", "--ttl", help="how long it is valid: 30d, 12h, 90min"),
) -> None:
    """Print a signed API token on stdout (how to use it goes to stderr)."""
    # Imported here so `tollgate --help` does not load the API's dependencies.
    from services.api.tokens import issue_token

    settings = Settings()
    lifetime = _ttl(ttl)
    now = datetime.now(UTC)
    secret_file = settings.data_dir / "token-secret"
    if not settings.token_secret and not secret_file.exists():
        # Most likely run from another directory than `tollgate up`: say so, since its
        # tokens would otherwise be refused later with a puzzling "signature" error.
        typer.echo(
            f"No signing secret at {secret_file}: creating one. Tokens signed with it work "
            "only with an API that uses this data directory (TOLLGATE_DATA_DIR) or the same "
            "TOLLGATE_TOKEN_SECRET.",
            err=True,
        )
    try:
        token = issue_token(
            settings.resolved_token_secret(create=True), subject, role, lifetime, now
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(token)
    api = settings.api_url_from_endpoints()
    until = (now + lifetime).strftime("%Y-%m-%d %H:%M UTC")
    path = quote(subject, safe="@")
    typer.echo(
        f"Token for {subject} ({role.value}), valid until {until}. Use it like this:\n"
        f"  curl -H 'Authorization: Bearer {token}' {api}/v1/subjects/{path}/quotas",
        err=True,
    )


def register(app: typer.Typer) -> None:
    token_app = typer.Typer(no_args_is_help=True, help="Mint bearer tokens for the HTTP API.")
    token_app.command("issue")(issue)
    app.add_typer(token_app, name="token")
