"""``python scripts/check_torch_mismatch.py BUILT``: with a shared_prefix built for torch BUILT first on the path,
importing it under the running (other) torch must raise ImportError naming both versions and the rebuild
command, before the extension is loaded. Exits 0 when it does."""

import sys

import torch

built = ".".join(sys.argv[1].split(".")[:2])
running = torch.__version__
try:
    import shared_prefix  # noqa: F401
except ImportError as e:
    message = str(e)
    assert f"built for torch {built}" in message and running in message and "--no-build-isolation" in message, message
    assert "shared_prefix._core" not in sys.modules, "the extension was loaded before the check"
    print(f"ok: {message}")
    raise SystemExit(0)
raise SystemExit(f"shared_prefix built for torch {built} imported under torch {running} without an error")
