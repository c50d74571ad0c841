"""The `tollgate` command: one entry point, one sub-command per module in tollgate/commands."""

from __future__ import annotations

try:
    import typer
    from pydantic import ValidationError

    from tollgate.commands import (
        docs,
        explain,
        grant,
        meter,
        natsconfig,
        quota,
        replay,
        report,
        run,
        services,
        token,
        up,
    )
except KeyboardInterrupt:  # Ctrl-C while the modules load: a quiet exit, as later on
    raise SystemExit(130) from None

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Tollgate: meter usage on shared compute, keep an auditable ledger, enforce quotas.",
)
for module in (
    up, services, run, token, replay, quota, explain, grant, meter, report, docs, natsconfig,
):  # fmt: skip
    module.register(app)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except ValidationError as exc:
        # Settings are read from TOLLGATE_* variables: name the variable, not a traceback.
        problems = "\n".join(
            "  "
            + (f"TOLLGATE_{'_'.join(str(p) for p in e['loc']).upper()}: " if e["loc"] else "")
            + e["msg"].removeprefix("Value error, ")
            for e in exc.errors()
        )
        raise SystemExit(
            f"tollgate: invalid settings\n{problems}\nFix the variable or unset it."
        ) from None


if __name__ == "__main__":
    main()
