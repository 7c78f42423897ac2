"""The building blocks sit on one level: losses, models, metrics and cluster import nothing of
the project but the shared helpers (``anchorlearn._checks``, ``anchorlearn._dist``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import anchorlearn

SRC = Path(anchorlearn.__file__).parent
SHARED = {"_checks", "_dist", "_geometry"}


def project_imports(source: str, package: str) -> set[str]:
    """The top-level subpackages or modules of ``anchorlearn`` that ``source``, a module of
    ``package`` (dotted), imports, function-level imports included."""
    package_parts = package.split(".")
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = package_parts[: len(package_parts) - node.level + 1]
            names = [".".join([*base, node.module] if node.module else base)]
            if not node.module:
                names = [f"{names[0]}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "anchorlearn" and len(parts) > 1:
                found.add(parts[1])
    return found


def module_imports(path: Path) -> set[str]:
    package = ".".join(["anchorlearn", *path.relative_to(SRC).parts[:-1]])
    return project_imports(path.read_text(), package)


@pytest.mark.parametrize("block", ["losses", "models", "metrics", "cluster"])
def test_building_blocks_import_only_the_shared_helpers(block: str) -> None:
    for path in sorted((SRC / block).rglob("*.py")):
        outside = module_imports(path) - {block} - SHARED
        assert not outside, f"{path.relative_to(SRC)} imports anchorlearn.{sorted(outside)}"


@pytest.mark.parametrize("helper", sorted(SHARED))
def test_shared_helpers_import_nothing_of_the_project(helper: str) -> None:
    assert module_imports(SRC / f"{helper}.py") == set()


def test_the_import_walk_sees_relative_absolute_and_nested_imports() -> None:
    source = (
        "import torch\nfrom ..models import etf\nfrom . import sar\nfrom .contrastive import x\n"
        "import anchorlearn.metrics.ssl\ndef f():\n    from anchorlearn.cluster import kmeans\n"
    )
    assert project_imports(source, "anchorlearn.losses") == {
        "models",
        "losses",
        "metrics",
        "cluster",
    }
    assert project_imports("from ... import _checks\n", "anchorlearn.models.encoders") == {
        "_checks"
    }
