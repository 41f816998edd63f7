"""Fit a subspace to a byte target, in float32 or quantized: ``vlora compress --ratio 10 --bits 6``.

A byte budget counts what the subspace directory holds on disk, every file and the
manifest, heads apart (:func:`vlora.stats.stored_bytes`). Shared, private and hybrid fits
are tried and the best kept (:mod:`vlora.sharing`). Quantized, a shared fit gets a larger
float32 budget, scaled until the quantized subspace lands just under the target, so
fewer bits buy more directions at the same bytes.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from vlora.adapter import LoRAWeights
from vlora.budget import resolve_module_weights, weighted_error
from vlora.devices import fit_device
from vlora.errors import BudgetError
from vlora.fit_memo import FitMemo
from vlora.inputs import default_task_id
from vlora.io import load_adapter
from vlora.sharing import choose
from vlora.stats import record_baselines, stored_bytes
from vlora.subspace import SharedSubspace

BUDGET_TRIES = 12
T = TypeVar("T")


def lora_bytes(adapters: Sequence[LoRAWeights]) -> int:
    """Bytes of the adapters' LoRA factors in float32 (what a ratio is counted against)."""
    return 4 * sum(a.num_lora_params() for a in adapters)


def compress(adapters: Sequence[LoRAWeights | str | os.PathLike], task_ids: Sequence[str] | None = None,
             *, budget: float | None = None, ratio: float | None = None, bits: int | None = None,
             method: str = "symmetric", quantize_coordinates: bool = True,
             private: str = "auto", device: str | None = None, **fit_kwargs: Any) -> SharedSubspace:
    """Fit a :class:`SharedSubspace` on ``adapters`` whose stored bytes meet a target.

    Args:
        adapters: LoRAWeights or adapter folders, all of one base model.
        task_ids: one id per adapter (default: folder names).
        budget: total stored bytes (bases plus coordinates), or
        ratio: LoRA bytes (float32) over stored bytes, e.g. ``10``.
        bits: store bases (and, with ``quantize_coordinates``, coordinates) in 4, 5, 6
            or 8 bits (:meth:`SharedSubspace.quantize`); None keeps float32.
        method: ``"symmetric"`` or ``"nf4"`` (4 bits).
        private: with a byte target, ``"auto"`` chooses among shared, private and hybrid
            fits the one with the lowest mean error (:mod:`vlora.sharing`: never above
            per-adapter truncation at the same bytes); ``"none"`` keeps every byte shared
            (no private parts: mixed batches cost one shared path).
        device: where every fit's linear algebra runs (``"cpu"``, ``"cuda"``), float64
            there as on the CPU (:meth:`SharedSubspace.from_adapters`); choosing among
            fits, rounding and the per-adapter baselines stay on the CPU. None: the CPU,
            as before.
        **fit_kwargs: passed to :meth:`SharedSubspace.from_adapters` (``num_components``
            and the like when no byte target is given).

    Raises:
        ValueError: both ``budget`` and ``ratio``, or a non-positive one.
        DeviceError: (a ValueError) ``device`` is CUDA and CUDA is not available.
        BudgetError: (a SubspaceError) no fit of the requested bits lands under the budget.

    With a byte target, each task keeps the per-adapter SVD baseline measured at the
    chosen fit's bytes (``TaskProjection.baseline``; ``compression_stats`` reports it).
    """
    if budget is not None and ratio is not None:
        raise ValueError("give a budget or a ratio, not both")
    for name, x in (("budget", budget), ("ratio", ratio)):
        if x is not None and not (x > 0 and math.isfinite(x)):
            raise ValueError(f"{name} must be a positive finite number, not {x}")
    if device is not None:  # refused before any adapter is read
        fit_kwargs["device"] = fit_device(device)
    items = [a if isinstance(a, LoRAWeights) else load_adapter(a) for a in adapters]
    if ratio is not None:
        budget = lora_bytes(items) / ratio
    if budget is None:
        sub = SharedSubspace.from_adapters(items, task_ids, **fit_kwargs)
        if bits is not None:
            sub.quantize(bits, method, coordinates=quantize_coordinates)
        return sub
    ids = list(task_ids) if task_ids is not None else [default_task_id(a, i) for i, a in enumerate(items)]
    # the byte search fits these adapters many times: what does not depend on the budget
    # (factors, spectra, refined bases by k) is computed once (vlora.fit_memo)
    shared_kwargs = {**{k: v for k, v in fit_kwargs.items() if k != "progress"},
                     "memo": FitMemo.for_adapters(items, fit_kwargs.get("device"))}

    def shared_fit(target: float) -> SharedSubspace:
        try:
            return _shared_at(items, ids, target, bits, method, quantize_coordinates, shared_kwargs)
        except BudgetError as e:  # over the target: a closest fit to report
            return e.closest

    private_base: list[SharedSubspace] = []

    def private_fit() -> SharedSubspace:  # fitted once; each candidate fills a copy
        if not private_base:
            keep = {k: v for k, v in fit_kwargs.items() if k in ("weighting", "missing_modules", "device")}
            private_base.append(SharedSubspace.from_adapters(items, ids, num_components=0, **keep))
            if bits is not None:
                private_base[0].quantize(bits, method, coordinates=quantize_coordinates)
        return copy.deepcopy(private_base[0])

    weights = fit_kwargs.get("module_weights")
    mw = resolve_module_weights(weights, dict.fromkeys(m for a in items for m in a.layer_names)) \
        if weights else None
    sub, _ = choose(items, ids, budget, shared_fit, private_fit, private, mw)
    record_baselines(sub, dict(zip(ids, items)))
    return sub


def _shared_at(items: Sequence[LoRAWeights], ids: Sequence[str], budget: float, bits: int | None,
               method: str, quantize_coordinates: bool, fit_kwargs: dict[str, Any]) -> SharedSubspace:
    """The shared-only fit whose directory is within ``budget`` bytes.

    The search over scales compares fits at their stacked-SVD starts (no refinement: the
    bytes depend on the ks alone, chosen from the stacks' spectra); the scale it lands on
    is fitted again with the refinement asked for, kept if it lands within ``budget`` too
    (the core ranks shared out on refined errors can move a few bytes) and errs less."""
    def fit(factor: float, kwargs: dict[str, Any]
            ) -> tuple[SharedSubspace, bool, tuple[SharedSubspace, float]]:
        try:
            sub, smallest = SharedSubspace.from_adapters(items, ids, budget=budget * factor,
                                                         **kwargs), False
        except BudgetError as e:  # below the smallest float32 fit, which quantized may fit
            sub, smallest = e.closest, True
        if bits is not None:
            sub.quantize(bits, method, coordinates=quantize_coordinates)
        return sub, smallest, (sub, factor)

    if fit_kwargs.get("refine_iters", 10) <= 0:
        return scale_search(lambda f: fit(f, fit_kwargs), budget, bits,
                            f"shared fit of {len(items)} adapters")[0]
    search, tried = {**fit_kwargs, "refine_iters": 0}, []

    def unrefined(factor: float) -> tuple[SharedSubspace, bool, tuple[SharedSubspace, float]]:
        tried.append(factor)
        return fit(factor, search)
    try:
        found, factor = scale_search(unrefined, budget, bits, f"shared fit of {len(items)} adapters")
    except BudgetError as e:  # its closest (what a hybrid fills with private parts), refined
        raise BudgetError(str(e), closest=fit(tried[-1], fit_kwargs)[0]) from None
    refined = fit(factor, fit_kwargs)[0]
    mw = resolve_module_weights(fit_kwargs.get("module_weights"), refined.modules)

    def total(sub: SharedSubspace) -> float:
        return sum(weighted_error(sub.get_task(t), mw) for t in ids)
    return refined if stored_bytes(refined) <= budget and total(refined) <= total(found) else found


def scale_search(fit: Callable[[float], tuple[SharedSubspace, bool, T]], budget: float,
                 bits: int | None, what: str) -> T:
    """The fit landing closest under ``budget`` bytes, over scales of a float32 budget.

    ``fit(scale)`` fits at ``scale * budget`` float32 bytes and returns ``(subspace as it
    will be stored, smallest, result)``, ``smallest`` when no smaller fit exists; the
    ``result`` of the best fit is returned.
    Quantized, each number costs about bits/32 of a float, so the first scale is 32/bits;
    block scales, padding, Grams and the manifest do not shrink with the bits, so the
    bytes are not proportional to the scale: the next scale is aimed along the line
    through the last two tries while every try is over, then bisected between the largest
    scale under and the smallest over (the bytes are a step function of the scale)."""
    factor, stored, best = 32 / (bits or 32), 0, None
    lo = hi = None  # the largest scale whose fit was under the target, the smallest over it
    tried: list[tuple[float, int]] = []
    for _ in range(BUDGET_TRIES):
        sub, smallest, result = fit(factor)
        stored = stored_bytes(sub)
        if stored <= budget:
            if best is None or stored > best[0]:
                best = (stored, result)
            lo = factor if lo is None else max(lo, factor)
            if hi is None or best[0] >= 0.97 * budget or hi - lo < 0.01 * hi:
                return best[1]
        elif smallest:  # no smaller fit to try
            break
        else:
            hi = factor if hi is None else min(hi, factor)
        factor = (lo + hi) / 2 if lo is not None else next_factor(tried, factor, budget, stored)
    if best is not None:
        return best[1]
    raise BudgetError(f"no {bits or 32}-bit {what} lands under {budget:.0f} bytes (closest: "
                      f"{stored} bytes; every module keeps at least one direction)", closest=sub)


def next_factor(tried: list[tuple[float, int]], factor: float, budget: float, stored: int) -> float:
    """The next scale of a float32 budget whose quantized fit stored ``stored`` bytes, over
    the target ``budget``: along the line through the last two tries (``tried`` gets this
    one), always down, never past half."""
    tried.append((factor, stored))
    guess = 0.995 * budget / stored * factor
    if len(tried) > 1 and tried[-2][1] > stored:
        (f0, s0), (f1, s1) = tried[-2:]
        guess = f1 - (s1 - 0.995 * budget) * (f1 - f0) / (s1 - s0)
    return min(max(guess, 0.5 * factor), 0.98 * factor)
