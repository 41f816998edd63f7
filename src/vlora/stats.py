"""Bytes and errors of a subspace, beside the baseline of no sharing (DESIGN.md section 6).

The baseline is per-adapter truncated SVD at the same total bytes: each adapter
gets ``total bytes / N`` and spends them on its own largest singular triplets
(greedily over modules), computed exactly from each task's stored spectrum. For a
quantized subspace the baseline's numbers cost what vlora's do (``bits / 8`` bytes plus
one float32 scale per block): a float32 baseline would get 5x fewer numbers than a 6-bit
subspace and look far worse than it is. Its own rounding error is not counted (the
spectrum alone cannot give it), which favours the baseline.
"""

from __future__ import annotations

import math
import os
import stat
from typing import TYPE_CHECKING, Any

import torch

from vlora import linalg
from vlora.storage import SPECTRUM_DTYPE, stored_gram
from vlora.task import ModuleBasis, TaskProjection

if TYPE_CHECKING:
    from vlora.subspace import SharedSubspace

BYTES = 4  # float32, the storage dtype of bases and coordinates unless quantized


def svd_baseline_error(spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
                       numbers: float, dropped_sq: float = 0.0) -> float:
    """Relative dW error of one adapter truncated per module by SVD, with ``numbers``
    floats to spend: a rank-1 term of a module costs ``d_out + d_in``. ``dropped_sq``:
    the energy of the adapter's modules outside ``spectra``, lost as in the subspace."""
    gains = {m: s.square() for m, s in spectra.items() if s.numel()}
    costs = {m: float(sum(shapes[m])) for m in gains}
    ks = linalg.allocate_budget(gains, costs, numbers, minimum=0)
    total = sum(float(g.sum()) for g in gains.values()) + dropped_sq
    lost = sum(float(g[ks[m]:].sum()) for m, g in gains.items()) + dropped_sq
    return math.sqrt(lost / total) if total > 0 else 0.0


def _coord_bytes(t, m: str) -> int:
    if t.quant:
        return t.quant[f"{m}::B"].nbytes() + t.quant[f"{m}::A"].nbytes()
    return BYTES * (t.coords_b[m].numel() + t.coords_a[m].numel())


def _gram_bytes(b: ModuleBasis) -> int:
    """The Grams as :func:`~vlora.storage.save_subspace` writes them (kept for incremental
    absorbs): k float64 numbers per side for the diagonal ones of a fit."""
    return sum(x.numel() * x.element_size() for x in (stored_gram(b.G_u), stored_gram(b.G_v)))


def _spectrum_bytes(t: TaskProjection, m: str) -> int:
    return t.spectrum[m].numel() * SPECTRUM_DTYPE.itemsize


def _bytes(b: ModuleBasis, m: str, tasks: list[TaskProjection]) -> tuple[int, int]:
    """``(basis bytes, task bytes)`` of module ``m`` as stored: bases (quantized or float32)
    with their Grams; every task's coordinates and spectrum."""
    basis = (sum(q.nbytes() for q in b.quant.values()) if b.quant
             else BYTES * (b.d_out * b.k_out + b.d_in * b.k_in)) + _gram_bytes(b)
    return basis, sum(_coord_bytes(t, m) + _spectrum_bytes(t, m) for t in tasks)


def stored_bytes(sub: SharedSubspace) -> int:
    """What ``sub`` stores (heads apart), without :func:`compression_stats`' errors and
    baselines: what a fit to a byte budget compares, once per candidate."""
    tasks = [sub.get_task(t) for t in sub.tasks]
    return sum(sum(_bytes(b, m, tasks)) for m, b in sub.modules.items())


def task_stored_bytes(t: TaskProjection) -> int:
    """What one task stores (heads apart): its coordinates and spectra."""
    return sum(_coord_bytes(t, m) + _spectrum_bytes(t, m) for m in t.modules)


def side_bytes(sub: SharedSubspace, d: int, k: int, ranks: list[int]) -> int:
    """What one side of a module stores at ``k`` directions of length ``d``: its basis
    ``(d, k)``, its Gram's diagonal (k float64) and each task's ``(k, r)`` coordinates for
    ``r`` in ``ranks``, each tensor as ``sub`` stores it (a quantized one in whole blocks:
    a direction more may take a block more, or nothing but its Gram entry)."""
    q = sub.quantization

    def tensor(n: int, quantized: bool) -> int:
        if not quantized:
            return BYTES * n
        blocks = -(-n // q["block"])
        return blocks * (q["block"] * q["bits"] // 8 + 4)

    return (tensor(d * k, q is not None) + 8 * k
            + sum(tensor(k * r, bool(q and q["coordinates"])) for r in ranks))


def lora_bytes(sub: SharedSubspace, t: TaskProjection) -> int:
    """The float32 bytes of a task's original LoRA factors in the subspace's modules (what
    the compression ratio counts)."""
    return BYTES * sum(t.spectrum[m].numel() * (b.d_out + b.d_in) for m, b in sub.modules.items())


def growth_headroom(sub: SharedSubspace, new: TaskProjection) -> float:
    """Bytes that adding ``new`` (a projection on ``sub``'s bases) may add beyond its own
    coordinates, so that ``sub`` keeps its compression ratio: the byte target of an add."""
    tasks = [sub.get_task(t) for t in sub.tasks]
    before = sum(lora_bytes(sub, t) for t in tasks)
    stored = stored_bytes(sub)
    target = stored * (before + lora_bytes(sub, new)) / before if before else stored
    return target - stored - task_stored_bytes(new)


def directory_bytes(path: str | os.PathLike) -> int:
    """Bytes of every regular file under ``path`` (links not followed): what a folder takes
    on disk, heads, manifest and lock included."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            st = os.lstat(os.path.join(root, f))
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


def compression_stats(sub: SharedSubspace) -> dict[str, Any]:
    """Bytes per module and in total, the compression ratio, and the mean / max relative
    dW error over tasks next to per-adapter truncated SVD at equal bytes."""
    tasks = [sub.get_task(t) for t in sub.tasks]
    modules, shapes = {}, {}
    for m, b in sub.modules.items():
        shapes[m] = (b.d_out, b.d_in)
        # the original rank: the spectrum has one value per rank-1 term of the original dW
        ranks = [t.spectrum[m].numel() for t in tasks]
        basis_bytes, task_bytes = _bytes(b, m, tasks)
        modules[m] = {
            "d_out": b.d_out, "d_in": b.d_in, "k_out": b.k_out, "k_in": b.k_in,
            "basis_bytes": basis_bytes, "task_bytes": task_bytes,
            "original_bytes": BYTES * sum(r * (b.d_out + b.d_in) for r in ranks),
            "mean_error": (sum(t.module_errors()[m] for t in tasks) / len(tasks)) if tasks else 0.0,
        }
    total = {k: sum(v[k] for v in modules.values())
             for k in ("basis_bytes", "task_bytes", "original_bytes")}
    stored = total["basis_bytes"] + total["task_bytes"]
    errors = [t.error for t in tasks]
    q = next((b.quant["U"] for b in sub.modules.values() if b.quant), None)
    per_number = q.bytes_per_number if q else BYTES
    per_task_numbers = stored / per_number / len(tasks) if tasks else 0.0
    svd = [svd_baseline_error(t.spectrum, shapes, per_task_numbers, sum(t.dropped_sq.values()))
           for t in tasks]
    return {
        "num_tasks": len(tasks), "num_modules": len(modules), "modules": modules,
        **total, "stored_bytes": stored,
        "extra_bytes": sum(x.numel() * x.element_size() for t in tasks for x in t.extra.values()),
        "compression_ratio": total["original_bytes"] / stored if stored else float("inf"),
        "mean_error": sum(errors) / len(errors) if errors else 0.0,
        "max_error": max(errors, default=0.0),
        "errors_are_bounds": any(t.error_is_bound for t in tasks),
        "svd_bits": q.bits if q else 32,
        "svd_numbers_per_task": per_task_numbers,
        "svd_mean_error": sum(svd) / len(svd) if svd else 0.0,
        "svd_max_error": max(svd, default=0.0),
        "task_errors": {t.task_id: e for t, e in zip(tasks, errors)},
        "svd_task_errors": {t.task_id: e for t, e in zip(tasks, svd)},
    }
