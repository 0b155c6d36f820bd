"""Build backend (PEP 517, wrapping maturin) and build command: the extension for the torch it will run with.

The Rust core links one libtorch, through one tch line: tch 0.24 for torch 2.11 (``Cargo.toml``), tch 0.26 for torch
2.12 to 2.15 (``tch26/Cargo.toml``). The torch it builds against is the one importable by the interpreter running
the build, so installing into an existing environment goes without build isolation (which would hide that torch):

    pip install maturin && pip install --no-build-isolation .

Any other torch, or none, fails at once with what to do. Around maturin this module

- puts the building interpreter first on ``PATH`` as ``python``/``python3`` (torch-sys and our build script ask
  the ``python`` on ``PATH`` for torch, which for a venv that is not activated is another interpreter), and its
  scripts directory (``maturin``);
- keeps one cargo target directory per torch version (``<CARGO_TARGET_DIR or target>/torch-X.Y``): torch-sys does
  not rebuild when the installed torch changes;
- records the torch version in ``shared_prefix/_build_info.py``, which the package checks on import: inside the
  wheel, or in the source tree for editable builds (whose package is the tree);
- labels the wheel with the torch version (``0.1.0+torch2.13``).

Command line (``make build``, ``make wheel``): ``python build_backend/shared_prefix_build.py develop`` builds into the
running interpreter's environment; ``… wheel DIR`` writes a labelled wheel to DIR.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# torch major.minor -> the manifest of its tch line. tch 0.26 binds 2.13; with the patched torch-sys (C++20, linalg
# wrappers) it also compiles against 2.12, 2.14 and 2.15, and the core tests pass on each.
MANIFESTS = {"2.11": "Cargo.toml", "2.12": "tch26/Cargo.toml", "2.13": "tch26/Cargo.toml",
             "2.14": "tch26/Cargo.toml", "2.15": "tch26/Cargo.toml"}
SUPPORTED = ", ".join(MANIFESTS)
INSTALL = "pip install maturin && pip install --no-build-isolation <path to shared_prefix>"


class UnsupportedTorch(RuntimeError):
    pass


def torch_version() -> str:
    """``major.minor`` of the torch the running interpreter imports, if supported."""
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                           text=True)
    if probe.returncode != 0:
        raise UnsupportedTorch(
            f"shared_prefix builds against the torch of the environment it installs into, and {sys.executable} "
            f"cannot import torch (with pip's build isolation no installed torch is visible). Install torch "
            f"({SUPPORTED}) first, then: {INSTALL}")
    full = probe.stdout.strip().splitlines()[-1]
    minor = ".".join(full.split("+")[0].split(".")[:2])
    if minor not in MANIFESTS:
        raise UnsupportedTorch(f"shared_prefix supports torch {SUPPORTED}; this environment has torch {full}")
    return minor


def build_environment(minor: str, shims: Path) -> dict:
    """The environment maturin and cargo run in for torch ``minor`` (``shims``: a directory for the launchers)."""
    for name in ("python", "python3"):
        # A script, not a symlink: a venv's interpreter started through a link elsewhere would not find its venv.
        shim = shims / name
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        shim.chmod(0o755)
    env = dict(os.environ)
    scripts = str(Path(sys.executable).parent)  # where pip put maturin for this interpreter
    env["PATH"] = os.pathsep.join([str(shims), scripts, env.get("PATH", "")])
    env["PYTHON_SYS_EXECUTABLE"] = sys.executable
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix  # the environment `maturin develop` installs into, activated or not
    env["LIBTORCH_USE_PYTORCH"] = "1"
    # torch-sys accepts only the exact release its tch line names (2.11.0, 2.13.0); the minor was checked above.
    env["LIBTORCH_BYPASS_VERSION_CHECK"] = "1"
    base = os.environ.get("CARGO_TARGET_DIR") or str(ROOT / "target")
    env["CARGO_TARGET_DIR"] = str(Path(base) / f"torch-{minor}")
    return env


BUILD_INFO = "shared_prefix/_build_info.py"


def build_info(minor: str) -> str:
    return ('"""Written by build_backend/shared_prefix_build.py: the torch the extension was built against."""\n\n'
            f'TORCH_VERSION = "{minor}"\n')


def write_build_info(minor: str) -> None:
    """For editable builds: the package is the source tree."""
    (ROOT / "python" / BUILD_INFO).write_text(build_info(minor))


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def label_wheel(path: Path, minor: str) -> Path:
    """The wheel at ``path`` with ``+torchX.Y`` added to its version (file name, dist-info and metadata) and its
    build record (replacing any the source tree held)."""
    name, version, rest = path.name.split("-", 2)
    labelled = f"{version.split('+')[0]}+torch{minor}"
    target = path.with_name(f"{name}-{labelled}-{rest}")
    old_info, new_info = f"{name}-{version}.dist-info/", f"{name}-{labelled}.dist-info/"
    with zipfile.ZipFile(path) as src:
        files = [(item.filename, src.read(item.filename)) for item in src.infolist()
                 if item.filename != BUILD_INFO]
    files.insert(0, (BUILD_INFO, build_info(minor).encode()))
    records = []
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
        for filename, data in files:
            if filename.startswith(old_info):
                filename = new_info + filename[len(old_info):]
            if filename == new_info + "RECORD":
                continue
            if filename == new_info + "METADATA":
                data = data.replace(f"\nVersion: {version}\n".encode(), f"\nVersion: {labelled}\n".encode(), 1)
            out.writestr(filename, data)
            records.append(_record_line(filename, data))
        out.writestr(new_info + "RECORD", "\n".join(records + [f"{new_info}RECORD,,"]) + "\n")
    if target != path:
        path.unlink()
    return target


def _maturin_hook(hook: str, directory: str, config_settings, **kw) -> str:
    minor = torch_version()
    import maturin

    if hook == "build_editable":
        write_build_info(minor)
    settings = dict(config_settings or {})
    settings["build-args"] = f"--manifest-path {ROOT / MANIFESTS[minor]} " + str(settings.get("build-args", ""))
    with tempfile.TemporaryDirectory() as shims:
        saved = dict(os.environ)
        os.environ.update(build_environment(minor, Path(shims)))
        try:
            filename = getattr(maturin, hook)(directory, settings, **kw)
        finally:
            os.environ.clear()
            os.environ.update(saved)
    return label_wheel(Path(directory) / filename, minor).name


# -- PEP 517 hooks ----------------------------------------------------------------------------------------------
def get_requires_for_build_wheel(config_settings=None):
    return ["maturin>=1.7,<2"]


get_requires_for_build_editable = get_requires_for_build_wheel


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return _maturin_hook("build_wheel", wheel_directory, config_settings)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return _maturin_hook("build_editable", wheel_directory, config_settings)


def build_sdist(sdist_directory, config_settings=None):
    import maturin

    return maturin.build_sdist(sdist_directory, config_settings)


# -- command line -----------------------------------------------------------------------------------------------
def main(argv: list) -> int:
    if not argv or argv[0] not in ("develop", "wheel"):
        print(__doc__.split("\n\n")[-1].strip(), file=sys.stderr)
        return 2
    try:
        minor = torch_version()
    except UnsupportedTorch as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    manifest = str(ROOT / MANIFESTS[minor])
    with tempfile.TemporaryDirectory() as shims:
        env = build_environment(minor, Path(shims))
        if argv[0] == "develop":
            write_build_info(minor)
            cmd = ["maturin", "develop", "--release", "--manifest-path", manifest, *argv[1:]]
            return subprocess.run(cmd, env=env, cwd=ROOT).returncode
        out = Path(argv[1] if len(argv) > 1 else "dist").resolve()
        with tempfile.TemporaryDirectory() as staging:
            cmd = ["maturin", "build", "--release", "--manifest-path", manifest, "--interpreter", sys.executable,
                   "--out", staging, *argv[2:]]
            code = subprocess.run(cmd, env=env, cwd=ROOT).returncode
            if code != 0:
                return code
            out.mkdir(parents=True, exist_ok=True)
            for built in Path(staging).glob("*.whl"):
                labelled = label_wheel(built, minor)
                final = out / labelled.name
                final.write_bytes(labelled.read_bytes())
                print(f"wrote {final}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
