"""How much of each adapter to share and how much to keep private, under a byte target.

A fit to a byte target is chosen among candidates, each built whole, rounded as it will
be stored, and measured exactly (its directory's bytes, its tasks' errors against the
originals); the lowest mean relative dW error within the target wins (docs/DESIGN.md,
"Shared and private parts"):

* **pure private**: no shared direction (k = 0); each task's modules truncated on their
  own, ranks shared out over its modules (``"equal"``: the same bytes per task, which is
  per-adapter truncated SVD stored by vlora) or over all tasks' modules at once
  (``"pooled"``: bytes go where a task's relative error drops most);
* **shared**: today's shared subspace, every byte in bases and coordinates;
* **hybrid**: a shared fit at a part of the bytes, the rest spent on private parts fitted
  to what it leaves of each task (pooled).

The pure-private candidates are always among them, so the chosen fit's mean error is
never above theirs: sharing is used only where it pays, after rounding and every byte.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from vlora import linalg
from vlora.adapter import LoRAWeights
from vlora.budget import weighted_error
from vlora.errors import BudgetError
from vlora.layout import FIT_CANDIDATES
from vlora.stats import stored_bytes
from vlora.subspace import SharedSubspace
from vlora.task import residual_spectra

SHARED, PRIVATE_EQUAL, PRIVATE_POOLED, HYBRID = FIT_CANDIDATES  # names, as files record them
HYBRID_SHARE = 0.5  # the shared fit's share of the bytes in the hybrid candidate


@dataclass
class Candidate:
    """One fit tried: its name, the subspace, its bytes on disk and mean error."""

    name: str
    sub: SharedSubspace
    stored: int
    mean_error: float


def _bytes_per_number(sub: SharedSubspace) -> float:
    q = sub.quantization
    return q["bits"] / 8 + 4 / q["block"] if q and q["coordinates"] else 4.0


def private_gains(sub: SharedSubspace, items: Sequence[LoRAWeights], ids: Sequence[str],
                  module_weights: Mapping[str, float] | None = None
                  ) -> dict[tuple[str, str], torch.Tensor]:
    """``{(task, module): drops}``: what each further private rank of a task's module takes
    off the task's squared relative error (module m's counted ``module_weights[m]`` times),
    from what its stored shared part leaves of its original ``items[i]``."""
    w = module_weights or dict.fromkeys(sub.modules, 1.0)
    gains = {}
    with linalg.fixed_threads():
        for a, tid in zip(items, ids):
            t = sub.get_task(tid)
            norm = sum(w[m] * n for m, n in t.norm_sq.items()) + sum(t.dropped_sq.values()) or 1.0
            for m, s in residual_spectra(t, a, sub.modules).items():
                gains[tid, m] = w[m] * s.square() / norm
    return gains


def private_ranks(sub: SharedSubspace, gains: dict[tuple[str, str], torch.Tensor],
                  ids: Sequence[str], room: float, pooled: bool) -> dict[str, dict[str, int]]:
    """Private ranks per task and module within ``room`` bytes of numbers, greedily by the
    largest drop per byte (:func:`private_gains`): over all tasks at once (``pooled``) or
    with ``room / N`` for each task."""
    per = _bytes_per_number(sub)
    cost = {k: per * (sub.modules[k[1]].d_out + sub.modules[k[1]].d_in) for k in gains}
    if pooled:
        ranks = linalg.allocate_budget(gains, cost, room, minimum=0)
    else:
        ranks = {}
        for tid in ids:
            mine = {k: g for k, g in gains.items() if k[0] == tid}
            ranks.update(linalg.allocate_budget(mine, cost, room / len(ids), minimum=0))
    out = {tid: {} for tid in ids}
    for (tid, m), r in ranks.items():
        if r:
            out[tid][m] = r
    return out


def fill_private(sub: SharedSubspace, items: Sequence[LoRAWeights], ids: Sequence[str],
                 target: float, pooled: bool, module_weights: Mapping[str, float] | None = None,
                 tries: int = 8) -> SharedSubspace | None:
    """Give the tasks ``ids`` (from ``items``, their originals) private parts with what the
    subspace's bytes leave of ``target``; None (their private parts cleared) if nothing
    fits. The room is corrected until the directory's exact bytes are within ``target``
    (block padding and headers are not in the greedy share's prices)."""
    gains = private_gains(sub, items, ids, module_weights)
    room = target - stored_bytes(sub)
    for _ in range(tries):
        if room <= 0:
            break
        ranks = private_ranks(sub, gains, ids, room, pooled)
        for a, tid in zip(items, ids):
            sub.set_private(tid, a, ranks[tid])
        stored = stored_bytes(sub)
        if stored <= target:
            return sub
        room -= 1.02 * (stored - target) + 64
    for a, tid in zip(items, ids):
        sub.set_private(tid, a, {})
    return None


def _mean_error(sub: SharedSubspace, module_weights: Mapping[str, float] | None = None) -> float:
    """Mean relative dW error over tasks (module m's errors counted ``module_weights[m]``
    times where given: what a fit with module weights minimises)."""
    errors = [weighted_error(sub.get_task(t), module_weights) if module_weights else sub.get_task(t).error
              for t in sub.tasks]
    return sum(errors) / len(errors)


def choose(items: Sequence[LoRAWeights], ids: Sequence[str], target: float,
           shared_fit: Callable[[float], SharedSubspace],
           private_fit: Callable[[], SharedSubspace], private: str = "auto",
           module_weights: Mapping[str, float] | None = None,
           log: Callable[[str], None] | None = None) -> tuple[SharedSubspace, list[Candidate]]:
    """The candidate with the lowest mean error within ``target`` bytes, and all tried.

    ``shared_fit(bytes)`` is a shared-only fit within ``bytes`` (or the closest, over them);
    ``private_fit()`` a fit with no shared direction, rounded as stored. ``private="none"``
    tries the shared fit alone (today's subspace, for serving that wants no private parts).
    ``module_weights`` (resolved: every module) count some modules' errors more, in the
    private ranks and in the choice, as the shared fit counts them.
    """
    if private not in ("auto", "none"):
        raise ValueError(f"private must be 'auto' or 'none', not {private!r}")
    tried: list[Candidate] = []

    def keep(name: str, sub: SharedSubspace | None) -> None:
        if sub is not None and sub.tasks:
            tried.append(Candidate(name, sub, stored_bytes(sub), _mean_error(sub, module_weights)))
            if log:
                log(f"{name}: {tried[-1].stored} bytes, mean error {tried[-1].mean_error:.4f}")

    keep(SHARED, shared_fit(target))
    if private == "auto":
        for pooled in (False, True):
            keep(PRIVATE_POOLED if pooled else PRIVATE_EQUAL,
                 fill_private(private_fit(), items, ids, target, pooled, module_weights))
        keep(HYBRID, fill_private(shared_fit(HYBRID_SHARE * target), items, ids, target, True,
                                  module_weights))
    within = [c for c in tried if c.stored <= target]
    if not within:
        raise BudgetError(f"no fit of {len(items)} adapters lands under {target:.0f} bytes "
                          "(the manifest and one set of bases alone are larger)",
                          closest=min((c.sub for c in tried), key=stored_bytes, default=None))
    best = min(within, key=lambda c: (c.mean_error, c.stored))
    if not math.isfinite(best.mean_error):
        raise BudgetError("every fit has a non-finite error", closest=best.sub)
    # what each candidate would have given, kept with the fit (vlora info shows it)
    best.sub.fit_report = {c.name: (float(c.stored), c.mean_error) for c in tried}
    return best.sub, tried


def private_within(sub: SharedSubspace, adapter: LoRAWeights, task_id: str, target: float
                   ) -> dict[str, int]:
    """Give the task ``task_id`` (just added from ``adapter``) a private part with what the
    subspace's bytes leave of ``target`` (:func:`vlora.stats.ratio_target`, taken before
    the add), as a fit would have. Returns its private ranks (none when nothing is left)."""
    fill_private(sub, [adapter], [task_id], target, pooled=False)
    return {m: r for m, r in sub.get_task(task_id).private_ranks().items() if r}
