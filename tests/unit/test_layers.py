"""The package layers: services and infra never import the `tollgate` composition root."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in _imports(path):
            if name.split(".")[0] in forbidden:
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


def test_services_do_not_import_the_composition_root() -> None:
    assert _offenders("services", ("tollgate",)) == []


def test_infra_imports_neither_services_nor_the_composition_root() -> None:
    assert _offenders("infra", ("tollgate", "services")) == []


def test_contracts_import_nothing_of_ours_but_contracts() -> None:
    assert _offenders("contracts", ("tollgate", "services", "infra")) == []
