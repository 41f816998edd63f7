"""Building a subspace from thousands of adapter folders in bounded memory.

Pass 1 reads the adapters a chunk at a time and updates, per module and side, a
truncated stack SVD of width ``k + oversample`` with the incremental rule of
DESIGN.md ("Absorbing"): peak memory is the bases plus one chunk. It equals the
batch start fit whenever the stack rank fits in ``k + oversample`` (nothing was
ever truncated). Pass 2 reads the files again to compute each task's coordinates.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vlora import linalg
from vlora.devices import fit_device
from vlora.errors import IncompatibleAdaptersError
from vlora.inputs import check_rank, one_base_model, warn_base_models
from vlora.io import load_adapter
from vlora.progress import track
from vlora.task import ModuleBasis, adapter_weight

if TYPE_CHECKING:
    from vlora.subspace import SharedSubspace

F64 = torch.float64


def _on(device: torch.device | None, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return xs if device is None else tuple(x.to(device) for x in xs)


def from_adapters_streaming(cls: type[SharedSubspace], paths: Sequence[str | os.PathLike],
                            task_ids: Sequence[str] | None = None,
                            num_components: int | tuple[int, int] = 16,
                            variance_threshold: float | None = None, oversample: int = 8,
                            chunk_size: int = 16, weighting: str = "task",
                            pseudo_rank: int | None = None, progress: bool = False,
                            device: str | torch.device | None = None) -> SharedSubspace:
    """Stream ``paths`` twice to build a subspace; see the module docstring.

    Args:
        paths: adapter folders of one base model (every one with the same modules).
        task_ids: unique ids (default: folder names).
        num_components: the largest k per module and side (int or ``(k_out, k_in)``).
        variance_threshold: optionally a smaller k keeping this share of the tracked energy.
        oversample: extra directions tracked during the pass so that truncation errs less.
        chunk_size: adapters read and folded in at a time.
        device: where pass 1's linear algebra runs (``"cpu"``, ``"cuda"``), float64 there as
            on the CPU; the tracked bases stay there between chunks and come back to the
            CPU at the end. Pass 2 (projection) runs on the CPU. None: the CPU, as before.

    Raises:
        DeviceError: (a ValueError) ``device`` is CUDA and CUDA is not available.
    """
    device = fit_device(device)
    check_rank(pseudo_rank, "pseudo_rank")
    ids = list(task_ids) if task_ids is not None else [Path(p).name for p in paths]
    if len(ids) != len(paths):
        raise ValueError(f"{len(ids)} task ids for {len(paths)} adapters")
    dupes = sorted({t for t in ids if ids.count(t) > 1})
    if dupes:
        raise ValueError(f"duplicate task ids: {dupes}")
    if not paths:
        raise ValueError("from_adapters_streaming needs at least one adapter")
    k_out, k_in = num_components if isinstance(num_components, tuple) else (num_components,) * 2
    state: dict[str, list[torch.Tensor]] = {}  # module -> [U, G_u, V, G_v]
    shapes: dict[str, tuple[int, int]] = {}
    names = []  # base models, warned about once here (the subspace then names none)
    with linalg.fixed_threads():
        for start in track(range(0, len(paths), chunk_size), "Fitting (pass 1/2)",
                           (len(paths) + chunk_size - 1) // chunk_size, progress):
            chunk = [load_adapter(p) for p in paths[start:start + chunk_size]]
            for a, tid in zip(chunk, ids[start:start + chunk_size]):
                names.append(a.base_model)
                if not shapes:
                    shapes = a.shapes()
                if a.shapes() != shapes:
                    raise IncompatibleAdaptersError(
                        f"task {tid!r} ({a.source}): modules or shapes differ from the first "
                        "adapter; streaming needs adapters of one base model and target set")
            norms = [sum(linalg.frobenius_sq(a.lora_b[m], a.lora_a[m], a.scales[m])
                         for m in shapes) for a in chunk]
            sws = [adapter_weight(n, weighting) ** 0.5 for n in norms]
            for m, (d_out, d_in) in shapes.items():
                facs = [linalg.canonical(*_on(device, a.lora_b[m], a.lora_a[m]), a.scales[m])
                        for a, c in zip(chunk, sws) if c > 0]
                cs = [c for c in sws if c > 0]
                if not facs:
                    continue
                u, gu, v, gv = state.get(m) or [torch.zeros(d_out, 0, dtype=F64, device=device), None,
                                                torch.zeros(d_in, 0, dtype=F64, device=device), None]
                u, gu = linalg.incremental_basis(u, gu, [ut * (st * c) for (ut, st, _), c in
                                                         zip(facs, cs)], k_out + oversample)
                v, gv = linalg.incremental_basis(v, gv, [vt * (st * c) for (_, st, vt), c in
                                                         zip(facs, cs)], k_in + oversample)
                state[m] = [u, gu, v, gv]
            del chunk
    modules = {}
    for m, (d_out, d_in) in shapes.items():
        if m not in state:
            modules[m] = ModuleBasis(torch.zeros(d_out, 0), torch.zeros(d_in, 0),
                                     torch.zeros(0, 0, dtype=F64), torch.zeros(0, 0, dtype=F64))
            continue
        u, gu, v, gv = (x.cpu() for x in state[m])
        ko = linalg.choose_k(gu.diagonal().sqrt(), k_out, variance_threshold)
        ki = linalg.choose_k(gv.diagonal().sqrt(), k_in, variance_threshold)
        modules[m] = ModuleBasis(u[:, :ko].float().contiguous(), v[:, :ki].float().contiguous(),
                                 gu[:ko, :ko].clone(), gv[:ki, :ki].clone())
    warn_base_models(names, "the adapters")
    sub = cls(modules, weighting=weighting, base_model=one_base_model(names))
    for p, tid in track(list(zip(paths, ids)), "Projecting (pass 2/2)", len(paths), progress):
        sub.add_task(sub.project(load_adapter(p), tid, pseudo_rank=pseudo_rank))
        sub.get_task(tid).gram_share = "original"  # the Grams above were built from every adapter
    return sub

