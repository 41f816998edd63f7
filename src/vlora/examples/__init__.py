"""Example PEFT LoRA adapters shipped with vlora (real, trained by ``vlora.testbed``).

Eight adapters of ``sentence-transformers/all-MiniLM-L6-v2`` (r=8 on
``query``/``value``, classifier head in ``modules_to_save``), one per task,
seed 42, stored in float32. Each folder holds ``adapter_model.safetensors``,
``adapter_config.json``, ``metrics.json`` (accuracy vs majority class) and
``eval.json`` (a held-out split of up to 200 examples to re-score them).
"""

from __future__ import annotations

from importlib.resources import as_file, files
from pathlib import Path


def examples_root() -> Path:
    """Folder holding one sub-folder per example adapter."""
    res = files(__name__) / "adapters"
    # Installed packages are plain folders; as_file covers zipped installs too
    # (the path then stays valid for the life of the process).
    if isinstance(res, Path):
        return res
    return Path(as_file(res).__enter__())


def example_adapter_dirs() -> list[Path]:
    """Sorted folders of the shipped example adapters."""
    root = examples_root()
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and (p / "adapter_model.safetensors").is_file())


def example_adapter_dir(task: str) -> Path:
    """Folder of the example adapter trained on ``task``."""
    path = examples_root() / task
    if not (path / "adapter_model.safetensors").is_file():
        names = ", ".join(p.name for p in example_adapter_dirs())
        raise FileNotFoundError(f"no example adapter {task!r}; shipped: {names}")
    return path
