"""The `tollgate` command: one entry point, one sub-command per module in tollgate/commands."""

from __future__ import annotations

import typer

from tollgate.commands import docs, explain, meter, quota, replay, report, run, services, token, up

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Tollgate: meter usage on shared compute, keep an auditable ledger, enforce quotas.",
)
for module in (up, services, run, token, replay, quota, explain, meter, report, docs):
    module.register(app)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
