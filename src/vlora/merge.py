"""Merging LoRA adapters into one (DESIGN.md section 5).

Every merge is defined on ``dW = s * B @ A`` per module (never on the gauge-carrying
factors), computed in float64, and returned as a :class:`MergeResult`: the truncated
SVD of the merged ``dW`` at the chosen rank, scale 1.0, that ``save_adapter`` writes
and PEFT loads.

TIES, DARE and magnitude pruning are ``peft.utils.merge_utils``'s, as
``LoraModel.add_weighted_adapter`` runs them for its ``*_svd`` combination types:
trim or drop each ``dW_t``, elect signs on the unweighted trimmed tensors, average the
weighted ones that agree. DARE draws from its own ``torch.Generator`` (the global RNG
is untouched), module by module in the adapters' key order, adapter by adapter: its
masks are those of ``merge_utils.dare_*`` called in that order on the global RNG seeded
alike, but not ``add_weighted_adapter``'s (it visits modules in the model's order, after
its own set-up has drawn from the global RNG). Deliberate
differences from PEFT: float64 throughout (PEFT trims and elects in the adapters'
dtype, so near-ties fall differently in float32); the result's scale is 1.0 whatever
the first adapter's ``use_rslora`` (PEFT inherits it and scales its merge by
``sqrt(r)``); ``S`` is split evenly between B and A; no ``svd_clamp``. mergekit's TIES
differs from PEFT's: it elects signs on the weighted tensors and divides by the sum of
the agreeing weights, so the two part ways when the weights are not all equal.

A module missing from some adapters counts as ``dW = 0`` there (with a warning).
Non-LoRA tensors (``modules_to_save``, e.g. classifier heads) are full weights, not
deltas: whatever the method, they are averaged with weights ``w_t / sum(w)``, only
when every adapter has the same names and shapes and the weights do not sum to 0;
otherwise none are kept, with a warning and a note.

Example::

    merged = ties_merge(["ad/a", "ad/b", "ad/c"], density=0.3, rank=16)
    print(merged.kept_energy)            # share of the merged dW the rank keeps
    save_adapter(merged, "ad/merged")
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vlora import linalg
from vlora.adapter import LoRAWeights
from vlora.errors import AdapterError, VLoRAError
from vlora.inputs import check_modules, check_rank, default_task_id
from vlora.io import check_weights, config_for, load_adapter
from vlora.progress import track
from vlora.subspace import SharedSubspace

F64 = torch.float64
AdapterLike = LoRAWeights | str | os.PathLike
_CARRIED_CONFIG = ("base_model_name_or_path", "task_type", "fan_in_fan_out", "peft_type")


@dataclass(eq=False)
class MergeResult(LoRAWeights):
    """A merged adapter (a :class:`LoRAWeights` with every scale 1.0) and what its rank kept.

    Attributes:
        module_kept_energy: module -> ``||dW_r||^2 / ||dW||^2``, the share of the merged
            ``dW`` that the rank-r truncation keeps (1.0 when exact).
        merged_norm_sq: module -> ``||dW||_F^2`` of the merged ``dW`` before truncation.
        info: the method and its parameters (the DARE seed actually used included).
        notes: what was left out or approximated, in words.
    """

    module_kept_energy: dict[str, float] = field(default_factory=dict)
    merged_norm_sq: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def kept_energy(self) -> float:
        """Share of the whole merged adapter's energy kept, over all modules."""
        total = sum(self.merged_norm_sq.values())
        kept = sum(self.module_kept_energy[m] * n for m, n in self.merged_norm_sq.items())
        return kept / total if total > 0 else 1.0


def _prepare(adapters: Sequence[AdapterLike], weights: Sequence[float] | None
             ) -> tuple[list[LoRAWeights], list[float], dict[str, tuple[int, int]], list[str]]:
    items = [a if isinstance(a, LoRAWeights) else load_adapter(a) for a in adapters]
    if not items:
        raise ValueError("merging needs at least one adapter")
    ws = [1.0] * len(items) if weights is None else [float(w) for w in weights]
    if len(ws) != len(items):
        raise ValueError(f"{len(ws)} weights for {len(items)} adapters")
    if not all(math.isfinite(w) for w in ws):
        raise ValueError(f"merge weights must be finite numbers, not {ws}")
    ids = [default_task_id(a, i) for i, a in enumerate(items)]
    shapes = check_modules(items, ids, "zero")  # raises IncompatibleAdaptersError on shapes
    notes = []
    partial = [m for m in shapes if any(m not in a.lora_a for a in items)]
    if partial:
        notes.append(f"{len(partial)} module(s) missing from some adapters count as dW = 0 there: "
                     f"{partial[:5]}")
        warnings.warn(notes[-1], stacklevel=3)
    return items, ws, shapes, notes


def _check_rank(rank: int | None, default: int) -> int:
    return check_rank(default if rank is None else rank, "rank")


def _check_fraction(name: str, value: float, upper_open: bool = False) -> float:
    if not (0 <= value < 1 if upper_open else 0 <= value <= 1):
        raise ValueError(f"{name} must be in [0, 1{')' if upper_open else ']'}, not {value!r}")
    return float(value)


def _split(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, rank: int, dtype: torch.dtype
           ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Rank-r factors ``B = U_r S_r^(1/2)`` ``(d_out, r)``, ``A = S_r^(1/2) V_r^T`` ``(r, d_in)``
    of ``U diag(S) V^T``, with the kept energy share and the total energy."""
    total = float(s.square().sum())
    r = min(rank, s.numel())
    root = s[:r].clamp_min(0).sqrt()  # the balanced split keeps both factors well scaled
    kept = float(s[:r].square().sum()) / total if total > 0 else 1.0
    return (u[:, :r] * root).to(dtype), (v[:, :r] * root).T.to(dtype), kept, total


def _merge_extra(extras: Sequence[dict[str, torch.Tensor]], ws: Sequence[float]
                 ) -> tuple[dict[str, torch.Tensor], list[str]]:
    if not any(extras):
        return {}, []
    first = extras[0]
    agree = all(set(e) == set(first) and all(
        e[k].shape == first[k].shape and e[k].is_floating_point() for k in first) for e in extras)
    total = sum(ws)
    if not agree:
        why = "the adapters' non-LoRA tensors differ in names, shapes or dtype kind"
    elif total == 0:
        why = "the weights sum to 0, so the non-LoRA tensors have no weighted average"
    else:
        merged = {k: (sum(w * e[k].to(F64) for e, w in zip(extras, ws)) / total).to(first[k].dtype)
                  for k in first}
        return merged, []
    note = f"non-LoRA tensors (modules_to_save) left out: {why}"
    warnings.warn(note, stacklevel=4)
    return {}, [note]


def _result(items: Sequence[Any], ws: Sequence[float], factors: dict[str, tuple], notes: list[str],
            info: dict[str, Any]) -> MergeResult:
    """Assemble a MergeResult from module -> (B, A, kept, total); config from ``items[0]``."""
    extra, extra_notes = _merge_extra([it.extra for it in items], ws)
    config = {k: items[0].config[k] for k in _CARRIED_CONFIG if k in items[0].config}
    rank = max((f[0].shape[1] for f in factors.values()), default=0)
    config.update(r=rank, lora_alpha=rank)
    out = MergeResult(list(factors), {m: f[1] for m, f in factors.items()},
                      {m: f[0] for m, f in factors.items()}, dict.fromkeys(factors, 1.0), extra,
                      config,
                      module_kept_energy={m: f[2] for m, f in factors.items()},
                      merged_norm_sq={m: f[3] for m, f in factors.items()},
                      info=dict(info, weights=list(ws)), notes=notes + extra_notes)
    out.config = config_for(out)
    try:
        return check_weights(out)
    except AdapterError as e:  # e.g. weights of 1e30 overflow float32
        raise VLoRAError(f"the merged adapter cannot be stored: {e.problem} (weights {list(ws)})") from None


def _out_dtype(items: Sequence[LoRAWeights]) -> torch.dtype:
    dtype = torch.float32  # bf16/fp16 inputs come back in float32; save_adapter(dtype=) casts
    for it in items:
        for m in it.layer_names:
            dtype = torch.promote_types(dtype, it.lora_a[m].dtype)
    return dtype


Mask = Callable[[torch.Tensor], torch.Tensor | None]


def _dense_merge(adapters: Sequence[AdapterLike], weights: Sequence[float] | None,
                 rank: int | None, mask: Mask, divide: float, majority: str | None,
                 info: dict[str, Any], progress: bool) -> MergeResult:
    """Merge module by module, then truncated SVD of the dense result.

    Each adapter's ``dW_t`` ``(d_out, d_in)`` float64 becomes ``dW_t * mask(dW_t) / divide``
    (trim or drop; a None mask keeps all). Without ``majority`` the merge is the weighted
    sum of those; with it, TIES' sign election over a first pass and the disjoint mean over
    a second that recomputes each ``dW_t`` (a cheap product of its factors) and reuses its
    boolean mask. One dense ``dW_t`` at a time: a few float64 ``(d_out, d_in)`` buffers and
    one byte per entry per adapter, not the adapters' dense stack.
    """
    items, ws, shapes, notes = _prepare(adapters, weights)
    rank = _check_rank(rank, max(it.rank for it in items))
    dtype, factors = _out_dtype(items), {}
    with linalg.fixed_threads():
        for m in track(list(shapes), "Merging modules", len(shapes), progress):
            present = [(it, w) for it, w in zip(items, ws) if m in it.lora_a]
            if majority is None:
                merged = torch.zeros(shapes[m], dtype=F64)
                for it, w in present:
                    dw = it.delta_weight(m)
                    merged.add_(_masked(dw, mask(dw), divide), alpha=w)
            else:
                merged = _disjoint_mean(present, m, mask, divide, majority)
            u, s, vh = torch.linalg.svd(merged, full_matrices=False)
            del merged
            factors[m] = _split(u, s, vh.T, rank, dtype)
            del u, s, vh
            _return_freed_memory()
    return _result(items, ws, factors, notes, dict(info, rank=rank))


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _return_freed_memory() -> None:
    """Give a module's freed dense buffers back to the OS. glibc keeps freed blocks of a few
    MB in its heap, where the next module's buffers (of other sizes) fit badly: without
    this the process grew module after module (0.45 to 1 GB over SmolLM2's 210, from 0.3 GB
    of libraries and adapters); with it, it stays near that plus one module's work. A no-op
    off glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _masked(dw: torch.Tensor, keep: torch.Tensor | None, divide: float) -> torch.Tensor:
    """``dw * keep / divide`` in place (``dw`` is a fresh ``dW_t``: no more buffers)."""
    if keep is not None:
        dw.mul_(keep)
    return dw if divide == 1 else dw.div_(divide)


def _trim(dw: torch.Tensor, density: float) -> torch.Tensor | None:
    """Mask of the ``int(density * numel)`` largest-magnitude entries (PEFT's magnitude
    pruning), boolean ``(d_out, d_in)``; None keeps all."""
    if density >= 1:
        return None
    k = int(density * dw.numel())
    size = dw.abs().reshape(-1)
    if k == 0:
        return torch.zeros_like(size, dtype=torch.bool).reshape(dw.shape)
    # the k-th largest by selection is several times faster than topk; only ties at it
    # (which topk breaks one way or another) need topk's exact count
    keep = size >= torch.kthvalue(size, size.numel() - k + 1).values
    if int(keep.sum()) != k:
        keep = torch.zeros_like(keep).index_fill_(0, torch.topk(size, k).indices, True)
    return keep.reshape(dw.shape)


def _drop(dw: torch.Tensor, drop_rate: float, gen: torch.Generator) -> torch.Tensor | None:
    """DARE's mask: drop each entry with probability ``drop_rate`` (the caller rescales the
    rest by ``1/(1-p)``); None keeps all."""
    if drop_rate == 0:
        return None  # as PEFT: nothing is drawn
    return torch.bernoulli(torch.full_like(dw, 1 - drop_rate), generator=gen).bool()


def _disjoint_mean(present: list[tuple[LoRAWeights, float]], m: str, mask: Mask, divide: float,
                   majority: str) -> torch.Tensor:
    """TIES' elect-and-merge: the sign of the summed mass (or count) of the unweighted
    masked ``dW_t`` wins; agreeing weighted entries are averaged over how many agree."""
    mass, masks = None, []
    for it, _ in present:
        dw = it.delta_weight(m)
        masks.append(mask(dw))
        dw = _masked(dw, masks[-1], divide)
        dw = dw if majority == "total" else dw.sign()
        mass = dw.clone() if mass is None else mass.add_(dw)
    positive = mass >= 0
    del mass, dw
    total, count = torch.zeros_like(positive, dtype=F64), torch.zeros_like(positive, dtype=F64)
    for (it, w), keep in zip(present, masks):
        dw = _masked(it.delta_weight(m), keep, divide)
        agree = torch.where(positive, dw > 0, dw < 0)
        total.add_(dw * agree, alpha=w)
        count.add_(agree)
    return total.div_(count.clamp_min_(1))


def _check_majority(majority: str) -> None:
    if majority not in ("total", "frequency"):
        raise ValueError(f"majority must be 'total' or 'frequency', not {majority!r}")


def _generator(seed: int | None) -> tuple[torch.Generator, int]:
    gen = torch.Generator()
    return gen, (gen.seed() if seed is None else gen.manual_seed(seed).initial_seed())


def task_arithmetic(adapters: Sequence[AdapterLike], weights: Sequence[float] | None = None,
                    rank: int | None = None, progress: bool = False) -> MergeResult:
    """``dW = sum_t w_t dW_t`` per module, truncated to ``rank`` (PEFT's ``svd`` combination).

    Args:
        adapters: LoRAWeights or adapter folders of one base model (ranks, alphas and
            rslora may differ).
        weights: one per adapter (default 1.0 each: the sum); negative ones subtract.
        rank: rank of the result (default: the largest input rank).
        progress: draw a progress bar, one step per module (every merge takes it).

    Computed factored, never forming ``dW``: the stacked factors ``[w_t s_t B_t]``
    ``(d_out, sum r)`` and ``[A_t]`` ``(sum r, d_in)`` go through :func:`linalg.canonical`.
    """
    items, ws, shapes, notes = _prepare(adapters, weights)
    rank = _check_rank(rank, max(it.rank for it in items))
    dtype, factors = _out_dtype(items), {}
    with linalg.fixed_threads():
        for m in track(list(shapes), "Merging modules", len(shapes), progress):
            b, a = _stacked(items, ws, m)
            factors[m] = _split(*linalg.canonical(b, a), rank, dtype)
    return _result(items, ws, factors, notes, {"method": "task_arithmetic", "rank": rank})


def _stacked(items: Sequence[LoRAWeights], ws: Sequence[float], m: str
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``[w_t s_t B_t]`` ``(d_out, sum r)`` and ``[A_t]`` ``(sum r, d_in)`` over adapters with m."""
    present = [(it, w) for it, w in zip(items, ws) if m in it.lora_a]
    return (torch.cat([(w * it.scales[m]) * it.lora_b[m].to(F64) for it, w in present], 1),
            torch.cat([it.lora_a[m].to(F64) for it, _ in present], 0))


def concat(adapters: Sequence[AdapterLike], weights: Sequence[float] | None = None) -> MergeResult:
    """The exact weighted sum as one LoRA of rank ``sum r_t`` per module (PEFT's ``cat``):
    ``B = [w_1 s_1 B_1, ..., w_N s_N B_N]`` ``(d_out, sum r)``, ``A = [A_1; ...; A_N]``."""
    items, ws, shapes, notes = _prepare(adapters, weights)
    dtype, factors = _out_dtype(items), {}
    for m in shapes:
        b, a = _stacked(items, ws, m)
        factors[m] = (b.to(dtype), a.to(dtype), 1.0, linalg.frobenius_sq(b, a))
    return _result(items, ws, factors, notes, {"method": "concat"})


def ties_merge(adapters: Sequence[AdapterLike], density: float = 0.5,
               weights: Sequence[float] | None = None, majority: str = "total",
               rank: int | None = None, progress: bool = False) -> MergeResult:
    """TIES (PEFT's ``ties_svd``): trim each ``dW_t`` to its ``density`` share of
    largest-magnitude entries, elect per entry the sign of the summed trimmed mass
    (``"total"``) or of the sign count (``"frequency"``), average the weighted entries
    that agree with it, then truncate to ``rank``."""
    density = _check_fraction("density", density)
    _check_majority(majority)
    return _dense_merge(adapters, weights, rank, lambda dw: _trim(dw, density), 1.0, majority,
                        {"method": "ties", "density": density, "majority": majority}, progress)


def magnitude_prune_merge(adapters: Sequence[AdapterLike], density: float = 0.5,
                          weights: Sequence[float] | None = None, rank: int | None = None,
                          progress: bool = False) -> MergeResult:
    """Trim each ``dW_t`` to its ``density`` share of largest-magnitude entries, take the
    weighted sum, truncate to ``rank`` (PEFT's ``magnitude_prune_svd``)."""
    density = _check_fraction("density", density)
    return _dense_merge(adapters, weights, rank, lambda dw: _trim(dw, density), 1.0, None,
                        {"method": "magnitude_prune", "density": density}, progress)


def dare_merge(adapters: Sequence[AdapterLike], drop_rate: float = 0.5,
               weights: Sequence[float] | None = None, seed: int | None = None,
               rank: int | None = None, progress: bool = False) -> MergeResult:
    """DARE (PEFT's ``dare_linear_svd`` with ``density = 1 - drop_rate``): drop each entry
    of each ``dW_t`` with probability ``drop_rate``, rescale the survivors by
    ``1 / (1 - drop_rate)``, take the weighted sum, truncate to ``rank``.

    ``seed`` seeds a private generator (``None``: a fresh random seed, recorded in
    ``result.info["seed"]``); the global RNG is never touched.
    """
    drop_rate = _check_fraction("drop_rate", drop_rate, upper_open=True)
    gen, seed = _generator(seed)
    return _dense_merge(adapters, weights, rank, lambda dw: _drop(dw, drop_rate, gen),
                        1 - drop_rate, None,
                        {"method": "dare", "drop_rate": drop_rate, "seed": seed}, progress)


def dare_ties_merge(adapters: Sequence[AdapterLike], drop_rate: float = 0.5,
                    weights: Sequence[float] | None = None, majority: str = "total",
                    seed: int | None = None, rank: int | None = None,
                    progress: bool = False) -> MergeResult:
    """DARE then TIES' sign election and disjoint mean (PEFT's ``dare_ties_svd`` with
    ``density = 1 - drop_rate``). Seeding as in :func:`dare_merge`."""
    drop_rate = _check_fraction("drop_rate", drop_rate, upper_open=True)
    _check_majority(majority)
    gen, seed = _generator(seed)
    return _dense_merge(
        adapters, weights, rank, lambda dw: _drop(dw, drop_rate, gen), 1 - drop_rate, majority,
        {"method": "dare_ties", "drop_rate": drop_rate, "majority": majority, "seed": seed},
        progress)


def merge_tasks(subspace: SharedSubspace, task_ids: Sequence[str],
                weights: Sequence[float] | None = None, rank: int | None = None) -> MergeResult:
    """Weighted sum of tasks of one subspace, exact on what they store (DESIGN.md section 5).

    Per module ``sum_t w_t dW^_t = U (sum_t w_t C_t) V^T + sum_t w_t P_t Q_t^T``: the
    shared cores are summed (``k_out x k_in``), the private parts stacked, and the
    canonical form of the whole (QR of ``(d, k + sum q)`` blocks, exact for quantized
    bases, which are not orthonormal) is truncated to ``rank`` by SVD. ``rank``
    defaults to the largest task rank. Modules no chosen task has are left out.
    """
    tids = list(task_ids)
    tasks = [subspace.get_task(t) for t in tids]
    if not tasks:
        raise ValueError("merge_tasks needs at least one task id")
    ws = [1.0] * len(tasks) if weights is None else [float(w) for w in weights]
    if len(ws) != len(tasks):
        raise ValueError(f"{len(ws)} weights for {len(tasks)} tasks")
    rank = _check_rank(rank, max(max(t.ranks().values(), default=1) for t in tasks))
    factors = {}
    with linalg.fixed_threads():
        for m, basis in subspace.modules.items():
            own = [(w, t.private[m]) for t, w in zip(tasks, ws) if m in t.private]
            if not own and (min(basis.k_out, basis.k_in) == 0 or all(t.coords_b[m].shape[1] == 0
                                                                     for t in tasks)):
                continue  # dW^ = 0 for every chosen task: PEFT cannot load a rank-0 module
            core = sum(w * subspace.core(tid, m) for tid, w in zip(tids, ws))
            b = torch.cat([basis.U.to(F64) @ core, *(w * p.to(F64) for w, (p, _) in own)], 1)
            a = torch.cat([basis.V.to(F64), *(q.to(F64) for _, (_, q) in own)], 1)
            u, s, v = linalg.canonical(b, a.T)
            factors[m] = _split(u, s, v, rank, torch.promote_types(basis.U.dtype, torch.float32))
    return _result(tasks, ws, factors, [], {"method": "merge_tasks", "tasks": tids, "rank": rank})
