"""Bytes and errors of a subspace, beside the baseline of no sharing (docs/DESIGN.md).

Stored bytes are the directory's: :func:`file_bytes` encodes the subspace as ``save``
writes it and counts every file, headers and manifest included (the heads' file shown
apart). The baseline is per-adapter truncated SVD at the same bytes per adapter, in the
same number format, its rounding error counted (:mod:`vlora.baseline`); it needs each
original adapter, so it is measured when a task is stored with its original at hand
(:func:`record_baselines`) and kept with the task.
"""

from __future__ import annotations

import math
import os
import stat
from typing import TYPE_CHECKING, Any

import torch

from vlora import linalg
from vlora.adapter import LoRAWeights
from vlora.task import ModuleBasis, TaskProjection
from vlora.validate import stored_gram

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


def _private_bytes(t: TaskProjection, m: str) -> int:
    if m not in t.private:
        return 0
    if t.quant and f"{m}::P" in t.quant:
        return t.quant[f"{m}::P"].nbytes() + t.quant[f"{m}::Q"].nbytes()
    return BYTES * sum(x.numel() for x in t.private[m])


def _bytes(b: ModuleBasis, m: str, tasks: list[TaskProjection]) -> tuple[int, int, int]:
    """``(basis bytes, shared task bytes, private bytes)`` of module ``m``'s numbers as
    stored: bases (quantized or float32) with their Grams; every task's coordinates; every
    task's private part. File headers and the manifest are not in these."""
    basis = (sum(q.nbytes() for q in b.quant.values()) if b.quant
             else BYTES * (b.d_out * b.k_out + b.d_in * b.k_in)) + _gram_bytes(b)
    return basis, sum(_coord_bytes(t, m) for t in tasks), sum(_private_bytes(t, m) for t in tasks)


def file_bytes(sub: SharedSubspace) -> dict[str, int]:
    """Bytes of each file :meth:`~SharedSubspace.save` writes for ``sub``: ``bases``,
    ``coords``, ``extras`` (the heads) and ``manifest``, exactly as on disk."""
    from vlora.atomic import safetensors_blob
    from vlora.layout import encode
    from vlora.storage import FORMAT, manifest_text
    data, manifest = encode(sub)
    out, files = {}, {}
    for kind, tensors in data.items():
        out[kind] = len(safetensors_blob(tensors, metadata={"format": "pt"}))
        files[kind] = {"name": f"{kind}-000001.safetensors", "sha256": "0" * 64, "bytes": out[kind]}
    out["manifest"] = len(manifest_text({"format": FORMAT, **manifest, "generation": 1,
                                         "files": files}))
    return out


def stored_bytes(sub: SharedSubspace) -> int:
    """What ``sub``'s directory holds on disk, heads apart: its bases and coordinates files
    and its manifest, headers included (a first save; a later one may name its files with
    a longer generation number, a byte or two). What a fit to a byte target compares."""
    sizes = file_bytes(sub)
    return sizes["bases"] + sizes["coords"] + sizes["manifest"]


def task_stored_bytes(t: TaskProjection) -> int:
    """The numbers one task stores (heads apart): its coordinates and private parts."""
    return sum(_coord_bytes(t, m) + _private_bytes(t, m) for m in t.modules)


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
    return BYTES * sum(t.original_ranks.get(m, 0) * (b.d_out + b.d_in) for m, b in sub.modules.items())


def adapter_lora_bytes(sub: SharedSubspace, adapter: LoRAWeights) -> int:
    """The float32 bytes of an adapter's LoRA factors in ``sub``'s modules."""
    return BYTES * sum(adapter.lora_a[m].shape[0] * (b.d_out + b.d_in)
                       for m, b in sub.modules.items() if m in adapter.lora_a)


def ratio_target(sub: SharedSubspace, new_lora_bytes: float) -> float:
    """The bytes ``sub`` may hold once a task of ``new_lora_bytes`` LoRA bytes (float32, in
    its modules) is added, at its present compression ratio."""
    before = sum(lora_bytes(sub, sub.get_task(t)) for t in sub.tasks)
    stored = stored_bytes(sub)
    return stored * (before + new_lora_bytes) / before if before else float(stored)


def growth_headroom(sub: SharedSubspace, new: TaskProjection) -> float:
    """Bytes that adding ``new`` (a projection on ``sub``'s bases) may add beyond what
    adding it alone adds (its numbers, its manifest entry and figures), so that ``sub``
    keeps its compression ratio: the byte target of an add."""
    from vlora.subspace import SharedSubspace
    tasks = [sub.get_task(t) for t in sub.tasks]
    with_new = SharedSubspace(sub.modules, [*tasks, new], weighting=sub.weighting,
                              base_model=sub.base_model, missing_modules=sub.missing_modules)
    with_new.quantization, with_new.fit_report = sub.quantization, sub.fit_report
    return ratio_target(sub, lora_bytes(sub, new)) - stored_bytes(with_new)


def directory_bytes(path: str | os.PathLike) -> int:
    """Bytes of every regular file under ``path`` (links not followed): what a folder takes
    on disk, heads, manifest and lock included."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            st = os.lstat(os.path.join(root, f))
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


def record_baselines(sub: SharedSubspace, originals: dict[str, LoRAWeights]) -> None:
    """Measure the baseline of each task of ``originals`` (its original adapter) at this
    subspace's bytes per task and number format, and keep it with the task
    (``TaskProjection.baseline``, saved in the manifest): :func:`compression_stats` reports
    it without the originals at hand."""
    from vlora.baseline import svd_quantized
    per_task = stored_bytes(sub) / max(len(sub), 1)
    bits = sub.quantization["bits"] if sub.quantization else None
    for tid, adapter in originals.items():
        _, error, _ = svd_quantized(adapter, per_task, bits)
        sub.get_task(tid).baseline = {"bytes": float(per_task), "error": error,
                                      "bits": float(bits or 32)}


def _baseline(t: TaskProjection, shapes: dict[str, tuple[int, int]], per_task: float,
              bits: int | None) -> float | None:
    """A task's baseline error: as recorded (:func:`record_baselines`), else, for files of
    vlora 0.1 that kept each task's spectrum, float SVD without its rounding error."""
    if t.baseline is not None:
        return t.baseline["error"]
    if t.spectrum:
        per_number = (bits / 8 + 4 / 64) if bits else BYTES
        return svd_baseline_error(t.spectrum, shapes, per_task / per_number, sum(t.dropped_sq.values()))
    return None


def compression_stats(sub: SharedSubspace) -> dict[str, Any]:
    """Bytes per module and in total (the directory's, exactly: :func:`file_bytes`), the
    compression ratio, the mean / max relative dW error over tasks, and beside them
    per-adapter truncated SVD at equal bytes (:mod:`vlora.baseline`, as recorded)."""
    tasks = [sub.get_task(t) for t in sub.tasks]
    modules, shapes = {}, {}
    for m, b in sub.modules.items():
        shapes[m] = (b.d_out, b.d_in)
        basis_bytes, task_bytes, private_bytes = _bytes(b, m, tasks)
        modules[m] = {
            "d_out": b.d_out, "d_in": b.d_in, "k_out": b.k_out, "k_in": b.k_in,
            "basis_bytes": basis_bytes, "task_bytes": task_bytes, "private_bytes": private_bytes,
            "private_ranks": sum(t.private_ranks()[m] for t in tasks),
            "original_bytes": BYTES * sum(t.original_ranks.get(m, 0) for t in tasks) * (b.d_out + b.d_in),
            "mean_error": (sum(t.module_errors()[m] for t in tasks) / len(tasks)) if tasks else 0.0,
        }
    total = {k: sum(v[k] for v in modules.values())
             for k in ("basis_bytes", "task_bytes", "private_bytes", "original_bytes")}
    files = file_bytes(sub)
    stored = files["bases"] + files["coords"] + files["manifest"]
    errors = [t.error for t in tasks]
    bits = sub.quantization["bits"] if sub.quantization else None
    per_task = stored / len(tasks) if tasks else 0.0
    svd = {t.task_id: _baseline(t, shapes, per_task, bits) for t in tasks}
    known = [e for e in svd.values() if e is not None]
    energy = sum(t.total_norm_sq for t in tasks)
    return {
        "num_tasks": len(tasks), "num_modules": len(modules), "modules": modules,
        **total, "stored_bytes": stored, "files": files,
        "overhead_bytes": stored - total["basis_bytes"] - total["task_bytes"] - total["private_bytes"],
        "extra_bytes": files["extras"],
        "compression_ratio": total["original_bytes"] / stored if stored else float("inf"),
        "mean_error": sum(errors) / len(errors) if errors else 0.0,
        "max_error": max(errors, default=0.0),
        "errors_are_bounds": any(t.error_is_bound for t in tasks),
        "private_energy_share": sum(t.private_energy() for t in tasks) / energy if energy else 0.0,
        "tasks_with_private": sum(bool(t.private) for t in tasks),
        "svd_bits": bits or 32,
        "svd_bytes_per_task": per_task,
        "svd_recorded_bytes": [t.baseline["bytes"] for t in tasks if t.baseline],
        "svd_mean_error": sum(known) / len(known) if known else None,
        "svd_max_error": max(known, default=None),
        "svd_tasks": len(known),
        "task_errors": {t.task_id: e for t, e in zip(tasks, errors)},
        "svd_task_errors": svd,
    }
