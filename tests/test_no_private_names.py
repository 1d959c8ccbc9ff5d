"""Every test uses cmerge's public names only (a test of a private name
pins an implementation detail and breaks on every refactoring)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
CHECKED = sorted(TESTS.rglob("*.py"))


def private_uses(source: str) -> list[str]:
    """``from cmerge.x import _name`` and ``module._name`` where ``module`` was imported from cmerge."""
    tree = ast.parse(source)
    modules, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cmerge"):
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
                else:
                    modules.add(alias.asname or alias.name)   # may be a module (``from cmerge.suites import bench``)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("cmerge"):
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_the_checker_sees_both_forms():
    assert private_uses("from cmerge.suites.bench import _add_new, record\n") == [
        "line 1: from cmerge.suites.bench import _add_new"]
    assert private_uses("from cmerge.suites import text_data as td\ntd._water_fill([1], 1)\n") == [
        "line 2: td._water_fill"]
    assert private_uses("import cmerge.suites.bench\nx = ClassSpec._replace\n") == []


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: p.name)
def test_no_private_cmerge_names(path):
    assert private_uses(path.read_text()) == []
