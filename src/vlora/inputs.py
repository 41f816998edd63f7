"""What goes into a subspace, checked: adapters, task ids, ranks, modules, base models.

Every fit and every added task passes through these before any number is computed, so a
bad input is an error naming the adapter and the problem, never a traceback from deep
inside the mathematics.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

from vlora.adapter import LoRAWeights
from vlora.errors import IncompatibleAdaptersError
from vlora.io import check_weights, load_adapter

AdapterLike = LoRAWeights | str | os.PathLike


def as_adapter(item: AdapterLike) -> LoRAWeights:
    return check_weights(item) if isinstance(item, LoRAWeights) else load_adapter(item)


def default_task_id(adapter: LoRAWeights, index: int) -> str:
    return Path(adapter.source).name if adapter.source else f"task_{index}"


def check_rank(rank: int | None, name: str) -> int | None:
    """``rank`` if it is None or an integer >= 1; else a ValueError naming ``name``."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"{name} must be a positive integer, not {rank!r}")
    return rank


def _base_models(names: Iterable[str | None]) -> dict[str, str]:
    """The distinct models ``names`` (``base_model_name_or_path`` values) name, by their
    last part: a local copy and the hub id of one model are one."""
    return {str(n).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower(): n for n in names if n}


def one_base_model(names: Iterable[str | None]) -> str | None:
    """The base model every name names (the first spelling), None if several or none."""
    models = _base_models(names)
    return next(iter(models.values())) if len(models) == 1 else None


def warn_base_models(names: Iterable[str | None], what: str) -> None:
    """Warn when ``names`` name more than one model: shapes that agree make the
    mathematics run, but adapters of two models share nothing."""
    models = _base_models(names)
    if len(models) > 1:
        warnings.warn(f"{what} name different base models: {sorted(map(str, models.values()))[:4]}; "
                      "adapters of two models share nothing (vlora goes on where their shapes "
                      "agree)", UserWarning, stacklevel=3)


def check_modules(adapters: Sequence[LoRAWeights], ids: Sequence[str],
                  missing_modules: str = "error") -> dict[str, tuple[int, int]]:
    """The modules a subspace over ``adapters`` covers, with their ``(d_out, d_in)``.

    ``missing_modules``: ``"error"`` (a module in only some adapters is an error naming
    it), ``"skip"`` (keep modules every adapter has) or ``"zero"`` (missing means dW = 0).
    """
    if missing_modules not in ("error", "skip", "zero"):
        raise ValueError(f"missing_modules must be error, skip or zero, not {missing_modules!r}")
    warn_base_models((a.base_model for a in adapters), "the adapters")
    shapes: dict[str, tuple[int, int]] = {}
    for adapter, tid in zip(adapters, ids):
        for m, shape in adapter.shapes().items():
            if shapes.setdefault(m, shape) != shape:
                raise IncompatibleAdaptersError(
                    f"module {m}: task {tid!r} has shape {shape}, others {shapes[m]} "
                    "(adapters of different base models?)")
    partial = {m for m in shapes if any(m not in a.lora_a for a in adapters)}
    if partial and missing_modules == "error":
        where = {m: [t for a, t in zip(adapters, ids) if m not in a.lora_a] for m in sorted(partial)}
        detail = "; ".join(f"{m} missing in {v[:5]}" for m, v in list(where.items())[:5])
        raise IncompatibleAdaptersError(
            f"{len(partial)} module(s) are in only some adapters: {detail}. "
            "Pass missing_modules='skip' or 'zero'.")
    if missing_modules != "skip" or not partial:
        return shapes
    kept = {m: s for m, s in shapes.items() if m not in partial}
    if not kept:
        counts = ", ".join(f"{t!r}: {len(a.lora_a)}" for a, t in list(zip(adapters, ids))[:5])
        raise IncompatibleAdaptersError(
            f"no module is in every adapter ({counts} modules, none shared): skipping the "
            "others would leave nothing; use missing_modules='zero', or adapters of one target set")
    warnings.warn(f"skipping {len(partial)} module(s) not in every adapter, lost in full in "
                  f"the errors reported: {_dropped_text(adapters, ids, kept)}",
                  UserWarning, stacklevel=3)
    return kept


def _dropped_text(adapters: Sequence[LoRAWeights], ids: Sequence[str],
                         kept: Iterable[str]) -> str:
    """Which of each adapter's modules are not in ``kept``, in a line: ``'a': 3 of 24
    (layer.0.q, ...)``, adapters that lose none left out."""
    kept = set(kept)
    parts = []
    for a, t in zip(adapters, ids):
        lost = [m for m in a.layer_names if m not in kept]
        if lost:
            parts.append(f"{t!r}: {len(lost)} of {len(a.layer_names)} ({', '.join(lost[:3])}"
                         f"{', ...' if len(lost) > 3 else ''})")
    return "; ".join(parts)
