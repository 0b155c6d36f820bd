"""The test suite's own rules."""

from __future__ import annotations

import ast
from pathlib import Path


def test_no_test_module_imports_another():
    """What several test modules share lives in ``helpers`` (or the fixtures of ``conftest``); a test module
    importing another would run that module's imports and couple their tests."""
    here = Path(__file__).parent
    modules = {p.stem for p in here.glob("test_*.py")}
    found = []
    for path in sorted(here.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            found += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in modules]
    assert not found, found
