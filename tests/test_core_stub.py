"""``_core.pyi`` against the built extension: the same names, and for each function the same parameters (names,
order, defaults), so the stub cannot drift from the Rust bindings."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import shared_prefix
from shared_prefix import _core

STUB = Path(shared_prefix.__file__).parent / "_core.pyi"


def _stub() -> dict:
    """Each top-level name of the stub: ``(parameter name, default source or None)`` per parameter for a
    function, ``"value"`` for an annotated constant."""
    found = {}
    for node in ast.parse(STUB.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            args = node.args.args
            defaults = [None] * (len(args) - len(node.args.defaults)) + [ast.unparse(d) for d in node.args.defaults]
            found[node.name] = [(a.arg, d) for a, d in zip(args, defaults)]
        elif isinstance(node, ast.AnnAssign):
            found[node.target.id] = "value"
    return found


def _extension() -> dict:
    found = {}
    for name in dir(_core):
        if name.startswith("__"):
            continue
        obj = getattr(_core, name)
        if callable(obj):
            params = inspect.signature(obj).parameters.values()
            found[name] = [(p.name, None if p.default is p.empty else repr(p.default)) for p in params]
        else:
            found[name] = "value"
    return found


def test_stub_declares_exactly_the_extension():
    stub, ext = _stub(), _extension()
    assert sorted(stub) == sorted(ext), (sorted(set(stub) - set(ext)), sorted(set(ext) - set(stub)))
    for name, params in ext.items():
        assert stub[name] == params, name
