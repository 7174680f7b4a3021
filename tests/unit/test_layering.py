"""The layers of docs/architecture.md: imports point down only. Fails on any upward import.

An AST scan of every module of the project's own packages (module-level and function-level imports
alike, since a deferred import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: package -> the project packages it may import (besides itself). The table of docs/architecture.md.
ALLOWED: dict[str, set[str]] = {
    "cli": {"flows", "supervisor", "serving", "registry", "featurestore", "models", "recloop", "expectations",
            "bench"},
    "bench": {"flows", "supervisor", "serving", "registry", "featurestore", "models", "recloop", "expectations",
              "cli"},
    "flows": {"supervisor", "serving", "registry", "featurestore", "models", "recloop", "expectations"},
    "supervisor": {"registry", "recloop"},
    "serving": {"registry", "featurestore", "models", "recloop"},
    "registry": {"models", "recloop"},
    "featurestore": {"recloop"},
    "models": set(),
    "recloop": set(),
    "expectations": {"recloop"},
    "feature_repo": set(),
}
#: Libraries a lower layer must not touch (models/ stays pure: no orchestration, registry or store).
FORBIDDEN_LIBS: dict[str, set[str]] = {
    "models": {"mlflow", "prefect", "feast", "bentoml", "great_expectations"},
    "recloop": {"mlflow", "prefect", "feast", "bentoml", "torch"},
    "featurestore": {"mlflow", "prefect", "bentoml", "torch"},
    "registry": {"prefect", "feast", "bentoml"},
    "serving": {"prefect"},
}


def imported_roots(path: Path) -> set[str]:
    """Top-level names imported anywhere in ``path`` (absolute imports only)."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def violations(root: Path = ROOT) -> list[str]:
    """'<file>: <package> imports <name>' for every import the layer table forbids."""
    found = []
    for package, allowed in ALLOWED.items():
        for path in sorted((root / package).rglob("*.py")):
            for name in imported_roots(path):
                upward = name in ALLOWED and name != package and name not in allowed
                if upward or name in FORBIDDEN_LIBS.get(package, set()):
                    found.append(f"{path.relative_to(root)}: {package} imports {name}")
    return found


def test_imports_point_down_only() -> None:
    assert violations() == []


def test_every_project_package_has_a_layer() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} | {"feature_repo"}
    assert packages - {"tests"} <= set(ALLOWED), f"add the new package to ALLOWED: {packages - set(ALLOWED)}"


@pytest.mark.parametrize(("package", "line"), [("models", "from registry import store"),
                                                ("recloop", "import models.ranking"),
                                                ("serving", "from flows.deploy import deploy_flow"),
                                                ("models", "import mlflow")])
def test_an_upward_import_is_caught(tmp_path: Path, package: str, line: str) -> None:
    (tmp_path / package).mkdir()
    (tmp_path / package / "bad.py").write_text(f"def f():\n    {line}\n")
    assert len(violations(tmp_path)) == 1
