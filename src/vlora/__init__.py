"""vlora: many LoRA adapters of one base model as one shared subspace plus a few numbers per task.

See DESIGN.md for the mathematics. The public API::

    from vlora import load_adapter, save_adapter, SharedSubspace
"""

from importlib.metadata import PackageNotFoundError, version

from vlora.adapter import LoRAWeights
from vlora.errors import (
    AdapterError,
    BudgetError,
    IncompatibleAdaptersError,
    SubspaceError,
    TaskNotFoundError,
    UnsupportedAdapterError,
    VLoRAError,
)
from vlora.io import load_adapter, load_adapter_from_hub, save_adapter
from vlora.model import VLoRAModel
from vlora.router import AdapterMatchRouter, TaskRouter
from vlora.subspace import AbsorbReport, SharedSubspace
from vlora.task import TaskProjection
from vlora.training import SubspaceTrainer, lora_equivalent_lr, orthogonal_init
from vlora.vllm_check import check_vllm_adapter

try:
    __version__ = version("vlora")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "AbsorbReport", "AdapterError", "AdapterMatchRouter", "BudgetError", "IncompatibleAdaptersError",
    "LoRAWeights", "SharedSubspace", "SubspaceError", "SubspaceTrainer", "TaskNotFoundError",
    "TaskProjection", "TaskRouter", "UnsupportedAdapterError", "VLoRAError", "VLoRAModel",
    "__version__", "check_vllm_adapter", "load_adapter", "load_adapter_from_hub", "lora_equivalent_lr",
    "orthogonal_init",
    "save_adapter",
]
