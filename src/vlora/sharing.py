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

from vlora import linalg
from vlora.adapter import LoRAWeights
from vlora.budget import weighted_error
from vlora.errors import BudgetError
from vlora.stats import stored_bytes
from vlora.subspace import SharedSubspace
from vlora.task import residual_spectra

HYBRID_SHARES = (0.5,)  # the shared fit's share of the bytes in hybrid candidates
CANDIDATES = ("shared", "private-equal", "private-pooled", *(f"hybrid-{s:g}" for s in HYBRID_SHARES))


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


def private_ranks(sub: SharedSubspace, items: Sequence[LoRAWeights], ids: Sequence[str],
                  room: float, pooled: bool, module_weights: Mapping[str, float] | None = None
                  ) -> dict[str, dict[str, int]]:
    """Private ranks per task and module within ``room`` bytes of numbers, greedily by
    the drop of the task's squared relative error per byte (module m's errors counted
    ``module_weights[m]`` times): over all tasks at once (``pooled``) or with ``room / N``
    for each task."""
    per = _bytes_per_number(sub)
    cost = {m: per * (b.d_out + b.d_in) for m, b in sub.modules.items()}
    w = module_weights or dict.fromkeys(sub.modules, 1.0)
    gains = {}
    with linalg.fixed_threads():
        for a, tid in zip(items, ids):
            t = sub.get_task(tid)
            norm = sum(w[m] * n for m, n in t.norm_sq.items()) + sum(t.dropped_sq.values()) or 1.0
            for m, s in residual_spectra(t, a, sub.modules).items():
                gains[tid, m] = w[m] * s.square() / norm
    out = {tid: {} for tid in ids}
    if pooled:
        ranks = linalg.allocate_budget(gains, {k: cost[k[1]] for k in gains}, room, minimum=0)
    else:
        ranks = {}
        for tid in ids:
            mine = {k: g for k, g in gains.items() if k[0] == tid}
            ranks.update(linalg.allocate_budget(mine, {k: cost[k[1]] for k in mine},
                                                room / len(ids), minimum=0))
    for (tid, m), r in ranks.items():
        if r:
            out[tid][m] = r
    return out


def fill_private(sub: SharedSubspace, items: Sequence[LoRAWeights], ids: Sequence[str],
                 target: float, pooled: bool, module_weights: Mapping[str, float] | None = None,
                 tries: int = 8) -> SharedSubspace | None:
    """Spend what ``sub`` (shared parts only) leaves of ``target`` bytes on private parts;
    None if it is over ``target`` already. The room is corrected until the directory's
    exact bytes are within ``target`` (block padding and headers are not in the greedy
    share's prices)."""
    base = stored_bytes(sub)
    room = target - base
    for _ in range(tries):
        if room < 0:
            return None
        ranks = private_ranks(sub, items, ids, room, pooled, module_weights)
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

    keep("shared", shared_fit(target))
    if private == "auto":
        for pooled in (False, True):
            keep("private-" + ("pooled" if pooled else "equal"),
                 fill_private(private_fit(), items, ids, target, pooled, module_weights))
        for share in HYBRID_SHARES:
            keep(f"hybrid-{share:g}", fill_private(shared_fit(share * target), items, ids, target, True,
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



def ratio_target(sub: SharedSubspace, adapter: LoRAWeights) -> float:
    """The bytes ``sub`` may hold once ``adapter`` is added, at its present compression
    ratio (LoRA bytes of its modules over its directory's bytes)."""
    def lora(ranks: dict[str, int]) -> int:
        return 4 * sum(r * (b.d_out + b.d_in) for m, b in sub.modules.items() for r in [ranks.get(m, 0)])

    before = sum(lora(sub.get_task(t).original_ranks) for t in sub.tasks)
    new = lora({m: adapter.lora_a[m].shape[0] for m in adapter.layer_names})
    stored = stored_bytes(sub)
    return stored * (before + new) / before if before else float(stored)


def private_within(sub: SharedSubspace, adapter: LoRAWeights, task_id: str, target: float,
                   tries: int = 8) -> dict[str, int]:
    """Give the task ``task_id`` (just added from ``adapter``) a private part with what the
    subspace's bytes leave of ``target`` (:func:`ratio_target`, taken before the add), as
    a fit would have: its modules' ranks by energy kept per byte. Returns the ranks
    (none when nothing is left)."""
    room = target - stored_bytes(sub)
    for _ in range(tries):
        if room <= 0:
            break
        ranks = private_ranks(sub, [adapter], [task_id], room, pooled=False)[task_id]
        sub.set_private(task_id, adapter, ranks)
        over = stored_bytes(sub) - target
        if over <= 0:
            return ranks
        room -= 1.02 * over + 64
    sub.set_private(task_id, adapter, {})
    return {}
