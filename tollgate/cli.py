"""The `tollgate` command: one entry point, one sub-command per module in tollgate/commands."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, MutableMapping

try:
    import click
    import typer
    import typer.core
    import typer.main
    from pydantic import ValidationError
except KeyboardInterrupt:  # Ctrl-C while the modules load: a quiet exit, as later on
    raise SystemExit(130) from None

# Each command and the module in tollgate/commands that registers it, in the order `--help`
# lists them. A module is imported only when one of its commands runs (or `--help` lists
# them), so a short command such as `tollgate replay --rebuild` does not pay for loading
# the services, FastAPI and NATS (tests/unit/test_cli_lazy.py keeps this table true).
COMMANDS = {
    "up": "up", "ledger": "services", "policy": "services", "api": "services", "run": "run",
    "replay": "replay", "quota": "quota", "explain": "explain", "meter": "meter",
    "report": "report", "docs": "docs", "nats-config": "natsconfig", "token": "token",
    "grant": "grant",
}  # fmt: skip


def commands_of(module: str) -> dict[str, click.Command]:
    """The click commands that tollgate/commands/<module>.py registers."""
    try:
        found = importlib.import_module(f"tollgate.commands.{module}")
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    sub = typer.Typer(add_completion=False)
    found.register(sub)
    return dict(typer.main.get_group(sub).commands)


class LazyCommands(MutableMapping[str, click.Command]):
    """`COMMANDS` as click's command table: each module loaded on first use."""

    def __init__(self) -> None:
        self._loaded: dict[str, click.Command] = {}

    def __getitem__(self, name: str) -> click.Command:
        if name not in self._loaded:
            if name not in COMMANDS:
                raise KeyError(name)
            self._loaded.update(commands_of(COMMANDS[name]))
        return self._loaded[name]

    def __contains__(self, name: object) -> bool:
        return name in COMMANDS or name in self._loaded

    def __iter__(self) -> Iterator[str]:
        return iter({**dict.fromkeys(COMMANDS), **self._loaded})

    def __len__(self) -> int:
        return len({**dict.fromkeys(COMMANDS), **self._loaded})

    def __setitem__(self, name: str, command: click.Command) -> None:
        self._loaded[name] = command

    def __delitem__(self, name: str) -> None:
        del self._loaded[name]


class LazyGroup(typer.core.TyperGroup):
    def __init__(self, **attrs: object) -> None:
        super().__init__(**attrs)  # type: ignore[arg-type]
        self.commands = LazyCommands()


app = typer.Typer(
    cls=LazyGroup,
    no_args_is_help=True,
    add_completion=False,
    help="Tollgate: meter usage on shared compute, keep an auditable ledger, enforce quotas.",
)


@app.callback()
def _root() -> None:
    """The commands are in `COMMANDS` (a group needs a callback to exist without them)."""


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
