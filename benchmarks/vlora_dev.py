"""Run vlora-dev 1.0.0 (PyPI `vlora-dev`, import name `vlora` like ours) as a baseline.

It lives in its own venv and is driven through `vlora_dev_driver.py` in a subprocess that
exchanges JSON, so the two packages never meet in one interpreter. `ensure_venv` builds
the venv on first use (CPU torch first, or pip would pull a multi-GB CUDA build).

    python -m benchmarks.vlora_dev          # create the venv and print vlora-dev's version
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

VERSION = "1.0.0"
TORCH = "torch==2.13.0"
DEFAULT_ROOT = Path.home() / ".cache" / "vlora" / f"vlora-dev-{VERSION}-venv"
DRIVER = Path(__file__).with_name("vlora_dev_driver.py")


class VloraDevUnavailable(RuntimeError):
    """vlora-dev could not be installed or run; the message says why."""


def _python(root: Path) -> Path:
    return root / "bin" / "python"


def _installed(root: Path) -> bool:
    probe = "import vlora, torch; print(vlora.__version__)"
    out = subprocess.run([str(_python(root)), "-I", "-c", probe], capture_output=True, text=True,
                         cwd=tempfile.gettempdir(), env=_env())
    return out.returncode == 0 and out.stdout.strip() == VERSION


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


@functools.cache
def ensure_venv(root: Path = DEFAULT_ROOT) -> Path:
    """Return the venv's python, creating the venv with vlora-dev in it if missing."""
    root = Path(root)
    if _python(root).exists() and _installed(root):
        return _python(root)
    steps = [[sys.executable, "-m", "venv", "--clear", str(root)],
             [str(_python(root)), "-m", "pip", "install", "-q", TORCH],
             [str(_python(root)), "-m", "pip", "install", "-q", f"vlora-dev=={VERSION}"]]
    for cmd in steps:
        print(f"[vlora-dev] {' '.join(cmd)}", file=sys.stderr, flush=True)
        try:
            root.parent.mkdir(parents=True, exist_ok=True)
            out = subprocess.run(cmd, capture_output=True, text=True, env=_env())
        except OSError as e:
            raise VloraDevUnavailable(f"`{' '.join(cmd[-2:])}` failed: {e}") from e
        if out.returncode:
            tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
            raise VloraDevUnavailable(f"`{' '.join(cmd[-2:])}` failed: {' | '.join(tail)}")
    if not _installed(root):
        raise VloraDevUnavailable(f"venv {root} built but `import vlora` is not vlora-dev {VERSION}")
    return _python(root)


def call(request: dict, root: Path = DEFAULT_ROOT) -> dict:
    """Run one driver request in vlora-dev's venv and return its JSON answer.

    The child runs from a temporary folder with a cleaned environment, so our checkout's
    `vlora` is not importable there; the driver checks it imported vlora-dev itself.
    """
    python = ensure_venv(root)
    with tempfile.TemporaryDirectory(prefix="vlora-dev-") as cwd:
        out = subprocess.run([str(python), "-I", str(DRIVER)], input=json.dumps(request),
                             capture_output=True, text=True, cwd=cwd, env=_env())
    if out.returncode:
        tail = out.stderr.strip().splitlines()[-3:]
        raise VloraDevUnavailable(f"driver {request.get('op')} failed: {' | '.join(tail)}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(call({"op": "version"}))
