"""Checks on what a subspace file holds: every value read is validated before use, and a
bad one raises SubspaceError naming what it is (files may come from anyone)."""

from __future__ import annotations

import re
import sys
from typing import Any

import torch

from vlora.errors import SubspaceError
from vlora.quantize import BITS, METHODS, TRANSFORMS, QuantizedTensor, dequantize
from vlora.task import ModuleBasis

_BAD_ID = re.compile(r"[\x00-\x1f\x7f/\\]")
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def validate_task_id(task_id: object) -> str:
    """A task id is a non-empty string of at most 256 characters, without path separators
    or control characters, and not ``.`` or ``..``."""
    if not isinstance(task_id, str) or not task_id or len(task_id) > 256 \
            or _BAD_ID.search(task_id) or task_id in (".", ".."):
        raise SubspaceError(f"invalid task id {task_id!r}: use 1-256 printable characters "
                            "without '/', '\\' or control characters")
    return task_id



def get_tensor(tensors: dict[str, torch.Tensor], key: str, meta: dict[str, Any] | None
         ) -> tuple[torch.Tensor, QuantizedTensor | None]:
    if not meta:
        return tensors[key], None
    bits, method, block, shape = check_quant(meta, f"quantized tensor {key}")
    q = QuantizedTensor(tensors[key + "::codes"], tensors[key + "::scales"], tuple(shape), bits,
                        method, block, meta.get("transform"))
    blocks = -(-shape[0] * shape[1] // block)
    if q.codes.dtype != torch.uint8 or q.codes.shape != (blocks * block * bits // 8,) \
            or q.scales.dtype != torch.float32 or q.scales.shape != (blocks,):
        raise SubspaceError(f"quantized tensor {key}: codes disagree with the manifest")
    return dequantize(q), q


def check_quant(meta: dict[str, Any], what: str) -> tuple[int, str, int, list[int]]:
    """``(bits, method, block, shape)`` of quantization metadata, each checked."""
    bits, method, block, shape = (meta.get(k) for k in ("bits", "method", "block", "shape"))
    if bits not in BITS or type(bits) is not int or method not in METHODS \
            or method == "nf4" and bits != 4 or type(block) is not int or not 0 < block <= 1 << 20 \
            or block * bits % 8 \
            or not isinstance(shape, list) or len(shape) != 2 \
            or not all(type(d) is int and 0 <= d < 1 << 31 for d in shape) \
            or meta.get("transform") not in TRANSFORMS:
        raise SubspaceError(f"{what}: bad quantization metadata {meta!r}")
    return bits, method, block, shape



def tensor(x: Any, what: str, shape: tuple[int, ...] | None = None, ndim: int = 2) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOATS or x.ndim != ndim \
            or shape is not None and tuple(x.shape) != shape:
        raise SubspaceError(f"{what}: a {getattr(x, 'dtype', type(x))} tensor of shape "
                            f"{tuple(getattr(x, 'shape', ()))} (expected {ndim}-D float"
                            f"{'' if shape is None else f' {shape}'})")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise SubspaceError(f"{what}: contains NaN or Inf")
    return x


def stored_gram(g: torch.Tensor) -> torch.Tensor:
    """A basis's Gram as written: its diagonal ``(k,)`` when it is diagonal (the bases of
    a fit are its eigenvectors, see :func:`vlora.linalg.principal_axes`), else ``(k, k)``."""
    g = g.detach().cpu()
    diagonal = torch.diagonal(g).contiguous()
    return diagonal if torch.equal(g, torch.diag(diagonal)) else g.contiguous()


def gram(x: Any, what: str, k: int) -> torch.Tensor:
    if isinstance(x, torch.Tensor) and x.ndim == 1:
        return torch.diag(tensor(x, what, (k,), ndim=1))
    return tensor(x, what, (k, k))


def number(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 <= x <= sys.float_info.max:
        raise SubspaceError(f"{what} is {str(x)[:40]} (a finite number >= 0 expected)")
    return float(x)


def flag(x: Any, what: str) -> bool:
    if not isinstance(x, bool):
        raise SubspaceError(f"{what} is {str(x)[:40]} (true or false expected)")
    return x


def dropped(x: Any, modules: dict[str, ModuleBasis], what: str) -> dict[str, float]:
    if not isinstance(x, dict) or any(not isinstance(m, str) or m in modules for m in x):
        raise SubspaceError(f"{what}: dropped_sq is not a map of modules outside the subspace")
    return {m: number(v, f"{what} dropped_sq") for m, v in x.items()}


