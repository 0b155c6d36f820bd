"""The extension links the libtorch of one torch minor version; loaded under another it would fail on missing
symbols or misbehave. The build records its version (``_build_info``), checked here before the extension loads."""

from __future__ import annotations

import torch

REBUILD = "pip install --no-build-isolation --force-reinstall --no-deps <path to shared_prefix>"


def minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def built_for() -> str:
    try:
        from ._build_info import TORCH_VERSION
    except ImportError:
        raise ImportError("shared_prefix: this installation has no record of the torch its extension was built "
                          f"against (_build_info.py); build it through pip or make: {REBUILD}") from None
    return TORCH_VERSION


def check_torch() -> None:
    """Before the extension loads: the installed torch is the one it was built for."""
    built = built_for()
    running = minor(torch.__version__)
    if running != built:
        raise ImportError(f"shared_prefix: the extension was built for torch {built} but torch "
                          f"{torch.__version__} is installed; rebuild it against this torch: {REBUILD}")


def check_extension(extension_torch: str) -> None:
    """After it loads: the extension is the build the record describes (not one left from another build)."""
    if minor(extension_torch) != built_for():
        raise ImportError(f"shared_prefix: the extension was built for torch {extension_torch} but the build record "
                          f"says {built_for()}; rebuild: {REBUILD}")
