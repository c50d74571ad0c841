"""`tollgate` loads only the module of the command it runs (tollgate/cli.py's COMMANDS)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tollgate.cli import COMMANDS, commands_of

ROOT = Path(__file__).resolve().parents[2]
MODULES = sorted(set(COMMANDS.values()))


@pytest.mark.parametrize("module", MODULES)
def test_each_module_registers_exactly_the_commands_the_table_names(module: str) -> None:
    named = {c for c, m in COMMANDS.items() if m == module}
    assert set(commands_of(module)) == named


def test_every_command_module_is_in_the_table() -> None:
    shipped = {p.stem for p in (ROOT / "tollgate" / "commands").glob("*.py")} - {"__init__"}
    assert shipped == set(MODULES)


def test_replay_does_not_load_the_services_the_bus_or_the_web_framework() -> None:
    probe = (
        "import sys\n"
        "from tollgate.cli import app\n"
        "import typer.main\n"
        "group = typer.main.get_command(app)\n"
        "assert group.get_command(None, 'replay') is not None\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('nats', 'fastapi', 'faststream', 'uvicorn', 'httpx') or m.startswith("
        "('services.policy', 'services.api', 'tollgate.commands.up')))\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout
