"""``SharedSubspace``: one pair of orthonormal bases per module, shared by all tasks.

DESIGN.md section 3 is the specification. Every fit works on ``dW`` through its
canonical form, so results do not depend on the LoRA gauge.

Example::

    sub = SharedSubspace.from_adapters(["ad/a", "ad/b", "ad/c"], variance_threshold=0.9)
    sub.save("sub")                      # one directory, atomic
    lora = sub.reconstruct("a")          # a LoRAWeights PEFT can load via save_adapter
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlora import linalg, private, stats
from vlora.adapter import LoRAWeights
from vlora.budget import choose_ks, coordinate_numbers, core_ranks, resolve_module_weights, weighted_error
from vlora.devices import fit_device
from vlora.errors import BudgetError, IncompatibleAdaptersError, SubspaceError, TaskNotFoundError
from vlora.fit_memo import FitMemo
from vlora.inputs import (
    AdapterLike,
    as_adapter,
    check_modules,
    check_rank,
    default_task_id,
    one_base_model,
    warn_base_models,
)
from vlora.io import config_for, load_adapter
from vlora.progress import expect, track
from vlora.task import (
    ModuleBasis,
    TaskProjection,
    adapter_weight,
    error_sq,
    project_adapter,
    quantize_coords,
    with_private,
)

F64 = torch.float64


@dataclass(frozen=True)
class AbsorbReport:
    """What an absorb did to one old task: its error against the original before,
    the drift of its reconstruction ``||dW^_old - dW^_new|| / ||dW^_old||``, and its
    error after (exact when the original file was at hand, else the bound
    ``before + drift``, flagged by ``after_is_bound``)."""

    error_before: float
    drift: float
    error_after: float
    after_is_bound: bool


def _present(items: Sequence[LoRAWeights], weights: Sequence[float],
             factors: Callable[[int, str], linalg.Factor], m: str
             ) -> tuple[list[linalg.Factor], list[float]]:
    """Canonical factors and weights of the tasks with energy in module ``m``."""
    present = [i for i, (a, w) in enumerate(zip(items, weights)) if m in a.lora_a and w > 0]
    return [factors(i, m) for i in present], [weights[i] for i in present]


def _factors(adapter: LoRAWeights, module: str, device: torch.device | None = None) -> linalg.Factor:
    b, a = adapter.lora_b[module], adapter.lora_a[module]
    if device is not None:
        b, a = b.to(device), a.to(device)
    return linalg.canonical(b, a, adapter.scales[module])


class SharedSubspace:
    """Shared bases per module plus per-task coordinates (DESIGN.md section 3).

    Build one with :meth:`from_adapters` (or :meth:`from_adapters_streaming`), or
    read one with :meth:`load`. ``modules`` maps module name to :class:`ModuleBasis`;
    ``tasks`` lists task ids.
    """

    def __init__(self, modules: dict[str, ModuleBasis], tasks: Iterable[TaskProjection] = (),
                 *, weighting: str = "task", base_model: str | None = None,
                 missing_modules: str = "error"):
        if weighting not in ("task", "energy"):
            raise ValueError(f"weighting must be 'task' or 'energy', not {weighting!r}")
        if missing_modules not in ("error", "skip", "zero"):
            raise ValueError(f"missing_modules must be error, skip or zero, not {missing_modules!r}")
        self.modules = dict(modules)
        self._tasks: dict[str, TaskProjection] = {}
        self.weighting = weighting
        self.base_model = base_model
        self.missing_modules = missing_modules  # policy of check_modules, kept for new tasks
        # how quantize() stored bases and coordinates: {"bits", "method", "block",
        # "coordinates"}, None for float32; every change keeps it (absorb, project)
        self.quantization: dict[str, Any] | None = None
        # {directory: digest of its manifest} as this subspace loaded or saved it: a save
        # there refuses to replace what another writer saved since (storage.save_subspace)
        self._manifest_digests: dict[str, str] = {}
        # {candidate: (bytes, mean error)} of the fits compress() compared (vlora.sharing)
        self.fit_report: dict[str, tuple[float, float]] = {}
        for t in tasks:
            self.add_task(t)

    # ------------------------------------------------------------------ fitting
    @classmethod
    def from_adapters(cls, adapters: Sequence[AdapterLike], task_ids: Sequence[str] | None = None,
                      num_components: int | tuple[int, int] | None = None,
                      variance_threshold: float | None = None, budget: float | None = None,
                      adaptive_k: bool = True, weighting: str = "task", refine_iters: int = 10,
                      missing_modules: str = "error", pseudo_rank: int | None = None,
                      module_weights: dict[str, float] | None = None,
                      progress: bool = False, device: str | torch.device | None = None,
                      memo: FitMemo | None = None) -> SharedSubspace:
        """Fit shared bases on ``adapters`` and store every one as a task.

        Args:
            adapters: LoRAWeights or adapter folders, all of one base model.
            task_ids: one unique id per adapter (default: folder names).
            num_components: k for every module, or ``(k_out, k_in)``.
            variance_threshold: keep the smallest k holding this share of the
                (weighted) stack energy, per module and side.
            budget: total bytes for bases plus coordinates (float32), shared out
                greedily over modules and sides by energy kept per byte.
            adaptive_k: with ``variance_threshold``, choose k per module (True) or
                use the largest of those for every module (False).
            weighting: ``"task"`` (every adapter counts equally) or ``"energy"``.
            refine_iters: at most this many alternating refinement rounds after the
                stacked-SVD start (:func:`vlora.linalg.refine_bases`; fewer when a round
                gains under ``linalg.REFINE_TOL``).
            missing_modules: ``"error"``, ``"skip"`` or ``"zero"`` (see check_modules).
            pseudo_rank: store each task's core at this rank (Share's p). With a
                ``budget`` and no ``pseudo_rank``, the coordinate bytes of ranks r, 3r/4,
                r/2 and r/4 are tried, each shared out over the tasks' cores module by
                module (:func:`vlora.budget.core_ranks`), and the one with the lowest
                mean error is kept. They are compared at their stacked-SVD starts; the one
                kept (or, over the budget, the smallest) is then refined.
            module_weights: with a ``budget``, count the errors of some modules more (or
                less) where bytes are shared out, e.g. ``{"value": 2.0}``; keys as PEFT's
                ``target_modules`` (:func:`vlora.budget.resolve_module_weights`). The
                bases of each module and every error reported are unchanged in kind.
            progress: draw progress bars.
            device: where the fit's linear algebra runs (``"cpu"``, ``"cuda"``,
                ``"cuda:N"``): each adapter's canonical form, the stacked SVDs, the
                refinement and every task's projection, all in float64 there as on the
                CPU. What the subspace holds comes back to the CPU (bases float32, Grams
                float64). None (default) computes on the CPU exactly as before. A CUDA fit
                matches a CPU one to rounding, not bit for bit (docs/DESIGN.md, "Devices").
            memo: a :class:`vlora.fit_memo.FitMemo` shared by fits of the same adapters,
                ids and options (``compress`` passes one through its byte search); it is
                ignored for other adapters or options. Results are the same without it.

        Raises:
            DeviceError: (a ValueError) ``device`` is CUDA and CUDA is not available.

        With no k option, k is the full numerical rank of each stack (every task exact).
        k never exceeds that rank.
        """
        device = fit_device(device)
        ks_given = num_components if isinstance(num_components, tuple) else (num_components,)
        if any(k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0) for k in ks_given):
            raise ValueError(f"num_components must be k >= 0 or (k_out, k_in), not {num_components!r}")
        check_rank(pseudo_rank, "pseudo_rank")
        items = [as_adapter(a) for a in track(adapters, "Reading adapters", len(adapters),
                                                 progress and not all(isinstance(a, LoRAWeights)
                                                                      for a in adapters))]
        if not items:
            raise ValueError("from_adapters needs at least one adapter")
        ids = list(task_ids) if task_ids is not None else [default_task_id(a, i)
                                                          for i, a in enumerate(items)]
        if len(ids) != len(items):
            raise ValueError(f"{len(ids)} task ids for {len(items)} adapters")
        dupes = sorted({t for t in ids if ids.count(t) > 1})
        if dupes:
            raise ValueError(f"duplicate task ids: {dupes}")
        shapes = check_modules(items, ids, missing_modules)
        if module_weights and budget is None:
            raise ValueError("module_weights share out a byte budget: pass budget (or compress's ratio)")
        mw = resolve_module_weights(module_weights, shapes)
        options = {"weighting": weighting, "missing_modules": missing_modules, "device": device}
        if memo is None or not memo.bind((tuple(map(id, items)), tuple(ids),
                                          tuple(sorted((k, str(v)) for k, v in options.items())))):
            memo = FitMemo.for_adapters(items, device)
        norms = memo.get("norms", lambda: [sum(linalg.frobenius_sq(a.lora_b[m], a.lora_a[m], a.scales[m])
                                               for m in shapes if m in a.lora_a) for a in items])
        weights = [adapter_weight(n, weighting) for n in norms]

        def factors(i: int, m: str) -> linalg.Factor:
            """Adapter i's canonical factors of module m (kept by the memo, as it allows)."""
            return memo.large(("factors", i, m), lambda: _factors(items[i], m, device))
        # A fixed k needs only the top k of each stack (the fast top-k path on wide modules);
        # a budget or an energy threshold needs the whole spectrum to choose k.
        top = (num_components if isinstance(num_components, tuple) else (num_components,) * 2) \
            if budget is None and variance_threshold is None else (None, None)

        def stacks() -> tuple[dict, dict]:
            spectra, starts = {}, {}
            with linalg.fixed_threads():
                for m in track(list(shapes), "Stack spectra", len(shapes), progress):
                    facs, ws = _present(items, weights, factors, m)
                    (u, su), (v, sv) = _stacks(facs, ws, shapes[m], *top)
                    spectra[m], starts[m] = (su.cpu(), sv.cpu()), (u, v)  # k is chosen on the CPU
            return spectra, starts
        spectra, starts = memo.get(("stacks", top), stacks)
        # With a byte budget, a lower pseudo-rank buys more shared directions: try a few
        # and keep the one with the lowest mean error (the library's choice, see DESIGN.md).
        # Each candidate's coordinate bytes are then shared out over the tasks' cores.
        # They are compared at their stacked-SVD starts; only the one kept is refined.
        max_rank = max(a.rank for a in items)
        adaptive = budget is not None and pseudo_rank is None
        candidates = [pseudo_rank] if not adaptive else sorted(
            {max_rank, max(1, (3 * max_rank) // 4), max(1, max_rank // 2), max(1, max_rank // 4)},
            reverse=True)
        # one bar's estimate: every candidate's fit, and the kept one's refined
        refits = len(candidates) > 1 and refine_iters > 0
        expect((len(candidates) + refits) * (len(shapes) + len(items)), progress)
        # several models (warned about in check_modules): none, so tasks are not warned again
        base_model = one_base_model(a.base_model for a in items)
        options["base_model"] = base_model
        # what the directory holds whatever the ks (manifest, headers, the tasks' figures):
        # measured on the fit with no direction, which costs one projection per task
        fixed = 0 if budget is None else memo.get("fixed", lambda: stats.stored_bytes(_fitted(cls._fit(
            items, ids, weights, factors, shapes, starts, dict.fromkeys(shapes, (0, 0)), 0, None,
            False, memo, **options))))
        def fit(ks: dict[str, tuple[int, int]], p: int | None, iters: int) -> SharedSubspace:
            sub = cls._fit(items, ids, weights, factors, shapes, starts, ks, iters,
                           None if adaptive else p, progress, memo, **options)
            if adaptive and p < max_rank:
                tasks = [sub.get_task(t) for t in ids]
                ranks = core_ranks(tasks, sub.modules, coordinate_numbers(tasks, sub.modules, p), mw)
                bases = _bases_on(sub.modules, device)
                for i, (a, tid) in enumerate(zip(items, ids)):
                    sub.add_task(sub._project(a, tid, ranks[tid], bases, device,
                                              lambda m, i=i: factors(i, m)), replace=True)
            return _fitted(sub)

        def score(sub: SharedSubspace) -> float:
            return sum(weighted_error(sub.get_task(t), mw) for t in ids)

        compare_iters = 0 if len(candidates) > 1 and refine_iters > 0 else refine_iters
        best = smallest = None  # (score, sub, ks, p) within the budget; (bytes, sub, ks, p) of all
        for p in candidates:
            coord_rank = sum(min(a.rank, p or a.rank) for a in items)
            ks = choose_ks(spectra, shapes, coord_rank, num_components, variance_threshold,
                           budget, adaptive_k, mw, fixed_bytes=fixed)
            sub = fit(ks, p, compare_iters)
            stored = stats.stored_bytes(sub) if budget is not None else 0
            if (budget is None or stored <= budget) and (best is None or score(sub) < best[0]):
                best = (score(sub), sub, ks, p)
            if smallest is None or stored < smallest[0]:
                smallest = (stored, sub, ks, p)
            del sub
        if best is None:  # every module keeps one direction per side
            # the closest is what compress quantizes or fills with private parts: refined too
            closest = smallest[1] if compare_iters == refine_iters else fit(smallest[2], smallest[3],
                                                                             refine_iters)
            raise BudgetError(f"a budget of {budget:.0f} bytes is below the smallest fit of these "
                              f"{len(items)} adapters ({smallest[0]} bytes: one direction per module "
                              "and side)", closest=closest)
        if compare_iters != refine_iters:
            # the same ks, so the same bytes, unless the core ranks shared out on the refined
            # errors move a few numbers between modules of different block padding
            sub = fit(best[2], best[3], refine_iters)
            if stats.stored_bytes(sub) <= budget and score(sub) <= best[0]:
                return sub
        return best[1]

    @classmethod
    def _fit(cls, items, ids, weights, factors, shapes, starts, ks, refine_iters, pseudo_rank,
             progress, memo, device=None, **options) -> SharedSubspace:
        """Refine the bases from their starts at the chosen ks (``memo`` keeps them by
        module and ks), then project every task (all on ``device`` when given; the bases
        come back to the CPU). ``factors(i, m)``: adapter i's canonical factors of m."""
        def refined(m: str) -> ModuleBasis:
            facs, ws = _present(items, weights, factors, m)
            u0, v0 = starts[m][0][:, :ks[m][0]], starts[m][1][:, :ks[m][1]]
            span = memo.large(("span", m), lambda: linalg.task_span(facs)) if refine_iters and facs else None
            u, v = linalg.refine_bases(facs, ws, u0, v0, refine_iters, span=span)
            return _basis(u, v, facs, ws)

        with linalg.fixed_threads():
            # starts are the memo's own (one object per kind of start), so their id is stable
            modules = {m: memo.get(("basis", id(starts), m, ks[m], refine_iters), lambda m=m: refined(m))
                       for m in track(list(shapes), "Fitting bases", len(shapes), progress)}
        sub = cls(modules, **options)
        bases = _bases_on(modules, device)
        for i, (a, tid) in enumerate(zip(track(items, "Projecting tasks", len(items), progress), ids)):
            sub.add_task(sub._project(a, tid, pseudo_rank, bases, device, lambda m, i=i: factors(i, m)))
        return sub

    # --------------------------------------------------------------- tasks
    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._tasks

    def get_task(self, task_id: str) -> TaskProjection:
        try:
            return self._tasks[task_id]
        except KeyError:
            raise TaskNotFoundError(f"no task {task_id!r} in the subspace "
                                    f"({len(self._tasks)} tasks)") from None

    def project(self, adapter: AdapterLike, task_id: str,
                pseudo_rank: int | dict[str, int] | None = None) -> TaskProjection:
        """Coordinates of an adapter in the current bases, with error and coverage.
        Changes nothing; pass the result to :meth:`add_task` to keep it."""
        from vlora.storage import validate_task_id
        validate_task_id(task_id)
        if not isinstance(pseudo_rank, dict):
            check_rank(pseudo_rank, "pseudo_rank")  # per module, 0 marks a module the task lacks
        adapter = as_adapter(adapter)
        self._check_adapter(adapter, task_id)
        with linalg.fixed_threads():
            return project_adapter(adapter, task_id, self.modules, self.weighting, pseudo_rank,
                                   self.missing_modules == "zero", self._coord_quant())

    def _project(self, adapter: AdapterLike, task_id: str, pseudo_rank: int | dict[str, int] | None,
                 bases: dict[str, ModuleBasis], device: torch.device | None,
                 factors: Callable[[str], linalg.Factor] | None = None) -> TaskProjection:
        """:meth:`project` for a fit on ``device`` (None: where the tensors are), with this
        subspace's (float) bases moved there once per fit (``bases``, :func:`_bases_on`)
        and the adapter's canonical factors by module where a fit keeps them (``factors``);
        the result is on the CPU."""
        from vlora.storage import validate_task_id
        validate_task_id(task_id)
        adapter = as_adapter(adapter)
        self._check_adapter(adapter, task_id)
        with linalg.fixed_threads():
            return project_adapter(adapter, task_id, bases, self.weighting, pseudo_rank,
                                   self.missing_modules == "zero", self._coord_quant(), device,
                                   factors)

    def _coord_quant(self) -> tuple[int, str, int] | None:
        """``(bits, method, block)`` of stored coordinates, None when they are float."""
        q = self.quantization
        return (q["bits"], q["method"], q["block"]) if q and q["coordinates"] else None

    def _check_adapter(self, adapter: LoRAWeights, task_id: str) -> None:
        warn_base_models([self.base_model, adapter.base_model], f"task {task_id!r} and the subspace")
        for m, basis in self.modules.items():
            if m not in adapter.lora_a:
                if self.missing_modules != "zero":
                    raise IncompatibleAdaptersError(
                        f"task {task_id!r}: module {m} of the subspace is missing from "
                        f"{adapter.source or 'the adapter'}")
            elif adapter.shapes()[m] != (basis.d_out, basis.d_in):
                raise IncompatibleAdaptersError(
                    f"task {task_id!r}: module {m} has shape {adapter.shapes()[m]}, "
                    f"the subspace {(basis.d_out, basis.d_in)}")
        extra = sorted(set(adapter.layer_names) - set(self.modules))
        if extra and self.missing_modules != "skip":
            raise IncompatibleAdaptersError(
                f"task {task_id!r}: modules not in the subspace: {extra[:5]}")

    def add_task(self, projection: TaskProjection, replace: bool = False) -> None:
        """Store a projection (from :meth:`project`) as a task. Where this subspace stores
        quantized coordinates, float ones (``SubspaceTrainer.write_back``'s) are rounded
        as it stores them, the rounding counted in the task's error."""
        from vlora.storage import validate_task_id
        validate_task_id(projection.task_id)
        if projection.task_id in self._tasks and not replace:
            raise SubspaceError(f"task {projection.task_id!r} already exists")
        for m, basis in self.modules.items():
            cb, ca = projection.coords_b.get(m), projection.coords_a.get(m)
            if cb is None or ca is None or cb.shape[0] != basis.k_out or ca.shape[0] != basis.k_in:
                raise SubspaceError(f"task {projection.task_id!r}: coordinates of module {m} "
                                    "do not match the subspace (projected on other bases?)")
        for m, (p, q) in projection.private.items():
            basis = self.modules.get(m)
            if basis is None or p.shape != (basis.d_out, q.shape[1]) or q.shape[0] != basis.d_in:
                raise SubspaceError(f"task {projection.task_id!r}: private part of module {m} "
                                    "does not match the subspace")
        cq = self._coord_quant()
        codes = projection.quant or {}
        if cq is not None and not (all(_coded(projection, m, cq) for m in self.modules) and all(
                f"{m}::P" in codes for m in projection.private)):
            projection = self._rounded(projection, cq)  # float (write_back's), or other codes
        if projection.task_id in self._tasks:  # replaced: its old energy leaves the Grams
            self._forget(self._tasks[projection.task_id])
        self._tasks[projection.task_id] = projection

    def set_private(self, task_id: str, adapter: AdapterLike, ranks: dict[str, int]) -> None:
        """Give a task a private part of rank ``ranks[m]`` in module m (0 or absent: none),
        the best of that rank for what its shared part leaves of ``adapter`` (its original),
        stored as this subspace stores coordinates; its errors are recomputed exactly.
        Replaces the task's private parts; the bases and its coordinates do not change."""
        t = self.get_task(task_id)
        adapter = as_adapter(adapter)
        self._check_adapter(adapter, task_id)
        bad = {m: r for m, r in ranks.items() if m not in self.modules or isinstance(r, bool)
               or not isinstance(r, int) or r < 0}
        if bad:
            raise ValueError(f"private ranks must be integers >= 0 of the subspace's modules: {bad}")
        with linalg.fixed_threads():
            self._tasks[task_id] = with_private(t, adapter, self.modules, ranks, self._coord_quant())

    def _rounded(self, t: TaskProjection, coord_quant: tuple[int, str, int]) -> TaskProjection:
        """``t`` with its coordinates rounded as this subspace stores them. The rounding's
        ``||U (C - C') V^T||^2`` (through the Grams) joins each module's residual: exactly
        for an exact task (residual 0, as a trained one), else as a bound."""
        cb, ca, res, quant = {}, {}, {}, {}
        for m, basis in self.modules.items():
            lb, la = t.coords_b[m].to(F64), t.coords_a[m].to(F64)
            cb[m], ca[m], quant[f"{m}::B"], quant[f"{m}::A"] = quantize_coords(
                lb, la, coord_quant, basis.U.dtype)
            d = lb @ la.T - cb[m].to(F64) @ ca[m].to(F64).T
            moved = max(linalg.inner_in_bases(d, d, *self.grams(m)), 0.0)
            res[m] = (math.sqrt(t.residual_sq[m]) + math.sqrt(moved)) ** 2
        own, own_moved = _private_as(t, coord_quant, quant)
        for m, moved in own_moved.items():
            res[m] = (math.sqrt(res[m]) + math.sqrt(moved)) ** 2
        bound = t.error_is_bound or any(t.residual_sq[m] > 0 and res[m] > t.residual_sq[m]
                                        for m in self.modules)
        return dataclasses.replace(t, coords_b=cb, coords_a=ca, residual_sq=res,
                                   error_is_bound=bound, quant=quant, private=own)

    def remove_task(self, task_id: str) -> TaskProjection:
        """Remove a task, and its energy from the diagonal of the bases' Grams (which weight
        later incremental absorbs) as they hold it (``TaskProjection.gram_share``): its
        original adapter's, read again from disk (exact), or its stored reconstruction's.
        The bases do not move, so a model serving the other tasks goes on; the off-diagonal
        part the removal would add is dropped (the Grams stay diagonal, stored as k numbers)."""
        t = self.get_task(task_id)
        self._forget(t)
        t.gram_share = None  # were it added again, its energy is no longer there
        return self._tasks.pop(task_id)

    def _forget(self, t: TaskProjection) -> None:
        """Take ``t``'s energy out of the Grams' diagonal, as the Grams hold it."""
        original = _original_if_at_hand(t) if t.gram_share == "original" else None
        for m, b in (self.modules.items() if t.gram_share else ()):
            if original is not None and m in original.lora_a:
                ut, st, vt = _factors(original, m)
                yu, yv = b.U.T.to(F64) @ (ut * st), b.V.T.to(F64) @ (vt * st)
            else:  # U^T dW = C V^T + (what lies outside V): C C^T is the part at hand
                yu = t.coords_b[m].to(F64) @ t.coords_a[m].to(F64).T
                yv = yu.T
            b.G_u = torch.diag((torch.diagonal(b.G_u) - t.weight * yu.square().sum(1)).clamp_min(0))
            b.G_v = torch.diag((torch.diagonal(b.G_v) - t.weight * yv.square().sum(1)).clamp_min(0))

    def task_error(self, task_id: str) -> float:
        """Relative dW error of a task against its original (float64, subtraction-free)."""
        return self.get_task(task_id).error

    def task_coverage(self, task_id: str) -> float:
        """Share of the task's original energy its reconstruction holds,
        ``sum ||U C V^T + P Q^T||^2 / sum ||dW||^2`` (:meth:`stored_norm_sq`)."""
        total = self.get_task(task_id).total_norm_sq
        kept = sum(self.stored_norm_sq(task_id, m) for m in self.modules)
        return kept / total if total > 0 else 1.0

    def factors(self, task_id: str, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A task's module as stored, ``dW^ = B A^T`` with ``B = [U L_B, P]`` ``(d_out, r + q)``
        and ``A = [V L_A, Q]`` ``(d_in, r + q)``, float64 (exact for any bases)."""
        t, b = self.get_task(task_id), self.modules[module]
        out_b, out_a = b.U.to(F64) @ t.coords_b[module].to(F64), b.V.to(F64) @ t.coords_a[module].to(F64)
        if module in t.private:
            p, q = t.private[module]
            out_b, out_a = torch.cat([out_b, p.to(F64)], 1), torch.cat([out_a, q.to(F64)], 1)
        return out_b, out_a

    def stored_norm_sq(self, task_id: str, module: str,
                       grams: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
        """``||U C V^T + P Q^T||^2`` of a task's module as stored: ``||C||^2`` for orthonormal
        bases and no private part, through ``U^T U`` and ``V^T V`` for quantized bases (which
        are not orthonormal), through the factors' Grams with a private part. ``grams``:
        :meth:`grams` of the module, when the caller holds them for many tasks."""
        if module not in self.get_task(task_id).private:
            c = self.core(task_id, module)
            return linalg.inner_in_bases(c, c, *(grams or self.grams(module)))
        out_b, out_a = self.factors(task_id, module)
        return linalg.frobenius_sq(out_b, out_a.T)

    def grams(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U^T U, V^T V)`` of a module in float64: identities unless quantized."""
        b = self.modules[module]
        return b.U.to(F64).T @ b.U.to(F64), b.V.to(F64).T @ b.V.to(F64)

    def core(self, task_id: str, module: str) -> torch.Tensor:
        """The gauge-invariant core ``C = L_B L_A^T`` ``(k_out, k_in)`` of a task."""
        t = self.get_task(task_id)
        return t.coords_b[module].to(F64) @ t.coords_a[module].to(F64).T

    def reconstruct(self, task_id: str, dtype: torch.dtype | None = None,
                    rank: int | None = None) -> LoRAWeights:
        """The task as a LoRA: ``B^ = [U L_B, P]``, ``A^ = [L_A^T V^T; Q^T]``, scale 1, in
        ``dtype`` (default: the original adapter's), with its non-LoRA tensors: its rank is
        the shared rank plus the private one. ``rank`` truncates each module's shared core
        by SVD (the best LoRA of that rank inside the subspace); private parts are kept."""
        t = self.get_task(task_id)
        dtype = dtype or getattr(torch, t.dtype)
        a, b = {}, {}
        for m, basis in self.modules.items():
            own = t.private.get(m)
            if t.coords_b[m].shape[1] == 0 and own is None:
                continue  # a module the adapter never had: dW = 0, as PEFT initialises it
            lb, la = t.coords_b[m].to(F64), t.coords_a[m].to(F64)
            if check_rank(rank, "rank") is not None and rank < lb.shape[1]:
                lb, la = linalg.truncate_core(lb, la, rank)
            bm, am = basis.U.to(F64) @ lb, basis.V.to(F64) @ la
            if own is not None:  # rank shared + private: U C V^T + P Q^T exactly
                bm, am = torch.cat([bm, own[0].to(F64)], 1), torch.cat([am, own[1].to(F64)], 1)
            b[m], a[m] = bm.to(dtype), am.T.contiguous().to(dtype)
        keep = ("base_model_name_or_path", "task_type", "modules_to_save", "peft_type",
                "fan_in_fan_out", "target_modules", "inference_mode")
        if not a:
            raise SubspaceError(f"task {task_id!r} has no LoRA weights in this subspace "
                                f"({len(self.modules)} modules, rank 0 in each): nothing to export")
        config = {k: v for k, v in t.config.items() if k in keep}
        if t.dropped_sq:  # PEFT would add LoRAs the export does not hold
            config["target_modules"] = _target_names(list(a), t.dropped_sq)
        lora = LoRAWeights(list(a), a, b, {m: 1.0 for m in a}, dict(t.extra), config, None)
        lora.config = config_for(lora)
        return lora

    # ---------------------------------------------------------------- absorb
    def absorb(self, adapter: AdapterLike, task_id: str, refine_iters: int = 10,
               exact_errors: bool = True) -> dict[str, AbsorbReport]:
        """Refit the bases on every task (old ones from their stored dW^) plus ``adapter``,
        re-express old tasks, add the new one. Returns each old task's report."""
        adapter = as_adapter(adapter)
        proj = self.project(adapter, task_id)  # validates before anything moves
        if task_id in self._tasks:
            raise SubspaceError(f"task {task_id!r} already exists")
        new_modules = {}
        with linalg.fixed_threads():
            for m, basis in self.modules.items():
                facs, ws = self._stored_factors(m)
                if m in adapter.lora_a and proj.weight > 0:
                    facs.append(_factors(adapter, m))
                    ws.append(proj.weight)
                (u0, _), (v0, _) = _stacks(facs, ws, (basis.d_out, basis.d_in),
                                           basis.k_out, basis.k_in)
                u, v = linalg.refine_bases(facs, ws, u0, v0, refine_iters)
                new_modules[m] = _basis(u, v, facs, ws)
        with linalg.fixed_threads():
            report = self._move_bases(self._in_storage_format(new_modules), exact_errors,
                                      self._coord_quant())
        self.add_task(self.project(adapter, task_id))
        for t in self._tasks.values():  # the Grams were rebuilt from every stored task
            t.gram_share = "stored"
        self._tasks[task_id].gram_share = "original"
        return report

    def absorb_incremental(self, adapter: AdapterLike, task_id: str, grow: bool = False,
                           exact_errors: bool = False, grow_bytes: float | None = None
                           ) -> dict[str, AbsorbReport]:
        """Update the bases with ``adapter`` at a cost independent of the number of tasks
        (DESIGN.md "Absorbing"), re-express old tasks, add the new one.

        ``grow`` lets k grow by the new adapter's rank instead of truncating back to k.
        ``grow_bytes`` lets k grow, by at most that rank, where the new directions keep the
        most energy per stored byte, while at most ``grow_bytes`` more bytes are stored than
        without growth (:func:`vlora.stats.side_bytes`); 0 keeps k.
        """
        if grow and grow_bytes is not None:
            raise ValueError("grow and grow_bytes exclude each other")
        adapter = as_adapter(adapter)
        proj = self.project(adapter, task_id)
        if task_id in self._tasks:
            raise SubspaceError(f"task {task_id!r} already exists")
        c = proj.weight ** 0.5
        grown = {}  # module -> (U, G_u, V, G_v) at k + r
        with linalg.fixed_threads():
            for m, basis in self.modules.items():
                if m in adapter.lora_a and c > 0:
                    ut, st, vt = _factors(adapter, m)
                    r = st.numel() if grow or grow_bytes else 0
                    grown[m] = (
                        *linalg.incremental_basis(basis.U, basis.G_u, [ut * (st * c)], basis.k_out + r),
                        *linalg.incremental_basis(basis.V, basis.G_v, [vt * (st * c)], basis.k_in + r))
        extra = self._growth(grown, proj, grow_bytes) if grow_bytes else {}
        new_modules = dict(self.modules)
        for m, (u, gu, v, gv) in grown.items():
            b = self.modules[m]
            ko, ki = (u.shape[1], v.shape[1]) if not grow_bytes else (
                min(u.shape[1], b.k_out + extra[m, "out"]), min(v.shape[1], b.k_in + extra[m, "in"]))
            new_modules[m] = ModuleBasis(u[:, :ko].float().contiguous(), v[:, :ki].float().contiguous(),
                                         gu[:ko, :ko].clone(), gv[:ki, :ki].clone())
        with linalg.fixed_threads():
            report = self._move_bases(self._in_storage_format(new_modules), exact_errors,
                                      self._coord_quant())
        self.add_task(self.project(adapter, task_id))
        self._tasks[task_id].gram_share = "original"  # added to the Grams above, alone
        return report

    def _stored_factors(self, module: str) -> tuple[list[linalg.Factor], list[float]]:
        basis, facs, ws = self.modules[module], [], []
        for t in self._tasks.values():
            if t.weight > 0 and t.coords_b[module].shape[1]:
                facs.append(_stored_factor(basis, t, module))
                ws.append(t.weight)
        return facs, ws

    def _growth(self, grown: dict[str, tuple[torch.Tensor, ...]], new: TaskProjection,
                grow_bytes: float) -> dict[tuple[str, str], int]:
        """Extra directions per ``(module, "out" | "in")`` of the grown bases ``grown``
        (each at k + r, energies on their Grams' diagonals): greedily the most energy kept
        per byte, each direction at what it adds to the stored bytes
        (:func:`vlora.stats.side_bytes`), within ``grow_bytes``."""
        tasks = [*self._tasks.values(), new]
        steps = {}  # (module, side) -> (energies, bytes) of each next direction
        for m, (_, gu, _, gv) in grown.items():
            b, ranks = self.modules[m], [t.coords_b[m].shape[1] for t in tasks]
            for side, k, d, g in (("out", b.k_out, b.d_out, gu), ("in", b.k_in, b.d_in, gv)):
                size = [stats.side_bytes(self, d, j, ranks) for j in range(k, g.shape[0] + 1)]
                steps[m, side] = (torch.diagonal(g)[k:], [y - x for x, y in zip(size, size[1:])])
        return linalg.allocate_budget({key: g for key, (g, _) in steps.items()},
                                      {key: c for key, (_, c) in steps.items()}, grow_bytes, minimum=0)

    def quantize(self, bits: int = 8, method: str = "symmetric", coordinates: bool = False,
                 block: int = 64, exact_errors: bool = True) -> dict[str, AbsorbReport]:
        """Store the bases (and with ``coordinates`` every task's coordinates) in ``bits``
        bits, blockwise absmax, ``"symmetric"`` or ``"nf4"``; ``save`` then writes the codes.

        Returns each task's report: error before, the drift quantization adds to its
        reconstruction, and its error after (exact when the original file is at hand).
        The subspace keeps this format (``quantization``): absorbs quantize the bases they
        refit, and projections their coordinates, with the same settings.
        """
        quantization = {"bits": bits, "method": method, "block": block, "coordinates": coordinates}
        new_modules = _quantized(self.modules, quantization)
        with linalg.fixed_threads():
            report = self._move_bases(new_modules, exact_errors,
                                      (bits, method, block) if coordinates else None)
        self.quantization = quantization
        return report

    def _in_storage_format(self, modules: dict[str, ModuleBasis]) -> dict[str, ModuleBasis]:
        """Float bases ``modules`` as this subspace stores bases (quantized or not)."""
        return _quantized(modules, self.quantization) if self.quantization else modules

    def _move_bases(self, new_modules: dict[str, ModuleBasis], exact_errors: bool,
                    coord_quant: tuple[int, str, int] | None = None) -> dict[str, AbsorbReport]:
        """Re-express every task in ``new_modules`` (quantizing the coordinates with
        ``coord_quant = (bits, method, block)``) and report drift and error."""
        # Once per module, not once per task: old-to-new coordinate maps, and the small
        # stand-ins of both bases that measure each task's drift without d-sized work.
        maps = {m: (linalg.lstsq_map(new_modules[m].U, old.U), linalg.lstsq_map(new_modules[m].V, old.V))
                for m, old in self.modules.items()}
        joint = {m: (linalg.joint_r(old.U, new_modules[m].U), linalg.joint_r(old.V, new_modules[m].V))
                 for m, old in self.modules.items()}
        report = {}
        for tid, t in self._tasks.items():
            original = _original_if_at_hand(t) if exact_errors else None
            moved_sq, kept_sq, before = 0.0, 0.0, t.error
            nb, na, res, quant = {}, {}, {}, {}
            # private parts do not depend on the bases: kept, or rounded where they are not
            # stored as the coordinates now are (quantize() of a float subspace)
            own, own_moved = _private_as(t, coord_quant, quant)
            for m, old in self.modules.items():
                new = new_modules[m]
                cb = maps[m][0] @ t.coords_b[m].to(F64)
                ca = maps[m][1] @ t.coords_a[m].to(F64)
                if new is old and coord_quant is not None and _coded(t, m, coord_quant):
                    # on a basis kept as it is, rounding them again would only add noise
                    nb[m], na[m] = t.coords_b[m], t.coords_a[m]
                    quant[f"{m}::B"], quant[f"{m}::A"] = t.quant[f"{m}::B"], t.quant[f"{m}::A"]
                elif coord_quant is not None:
                    nb[m], na[m], quant[f"{m}::B"], quant[f"{m}::A"] = quantize_coords(
                        cb, ca, coord_quant, old.U.dtype)
                else:
                    nb[m], na[m] = cb.to(old.U.dtype), ca.to(old.V.dtype)
                if t.coords_b[m].shape[1] == 0:  # no shared rank here: only the private part
                    res[m] = t.residual_sq[m] if m not in own_moved else (
                        math.sqrt(t.residual_sq[m]) + math.sqrt(own_moved[m])) ** 2
                    if original is not None and m in original.lora_a:
                        ut, st, vt0 = _factors(original, m)
                        res[m] = error_sq(ut * st, vt0, new, nb[m].to(F64) @ na[m].to(F64).T,
                                          own.get(m))
                    continue
                (ru_old, ru_new), (rv_old, rv_new) = joint[m]
                kept = (ru_old @ t.coords_b[m].to(F64)) @ (rv_old @ t.coords_a[m].to(F64)).T
                diff = kept - (ru_new @ nb[m].to(F64)) @ (rv_new @ na[m].to(F64)).T
                moved = float(torch.sum(diff * diff))
                moved_sq += (math.sqrt(moved) + math.sqrt(own_moved.get(m, 0.0))) ** 2
                kept_sq += float(torch.sum(kept * kept))  # ||dW^_old||^2, quantized bases too
                if original is not None:
                    ut, st, vt0 = _factors(original, m)
                    res[m] = error_sq(ut * st, vt0, new, nb[m].to(F64) @ na[m].to(F64).T,
                                      own.get(m))
                else:
                    res[m] = (math.sqrt(t.residual_sq[m]) + math.sqrt(moved)
                              + math.sqrt(own_moved.get(m, 0.0))) ** 2
            kept_sq += t.private_energy()
            drift = math.sqrt(moved_sq / kept_sq) if kept_sq > 0 else 0.0
            t.coords_b, t.coords_a, t.residual_sq, t.quant = nb, na, res, quant or None
            t.private = own
            t.error_is_bound = original is None and (t.error_is_bound or drift > 0)
            report[tid] = AbsorbReport(before, drift, t.error, t.error_is_bound)
        self.modules = new_modules
        return report

    # ---------------------------------------------------------------- misc
    def to(self, device: str | torch.device | None = None,
           dtype: torch.dtype | None = None) -> SharedSubspace:
        """Move bases and coordinates (in place); Grams stay float64 on the CPU."""
        for b in self.modules.values():
            b.U, b.V = b.U.to(device=device, dtype=dtype), b.V.to(device=device, dtype=dtype)
        for t in self._tasks.values():
            t.coords_b = {m: x.to(device=device, dtype=dtype) for m, x in t.coords_b.items()}
            t.coords_a = {m: x.to(device=device, dtype=dtype) for m, x in t.coords_a.items()}
        return self

    def compression_stats(self) -> dict[str, Any]:
        return stats.compression_stats(self)

    def save(self, path: str | os.PathLike, force: bool = False) -> None:
        """Write the subspace to the directory ``path``, atomically and under its lock.

        Raises SubspaceError where another writer saved, replaced or removed ``path``
        since this subspace loaded or saved it there (their work would be lost): load it
        again and redo the change, or pass ``force=True`` to replace it anyway."""
        from vlora.storage import save_subspace
        save_subspace(self, path, force)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SharedSubspace:
        from vlora.storage import load_subspace
        return load_subspace(path)

    @classmethod
    def from_adapters_streaming(cls, paths: Sequence[str | os.PathLike], **kwargs: Any
                                ) -> SharedSubspace:
        """Build from many adapter folders with peak memory of the bases plus one chunk."""
        from vlora.streaming import from_adapters_streaming
        return from_adapters_streaming(cls, paths, **kwargs)

    @classmethod
    def from_adapters_distributed(cls, paths: Sequence[str | os.PathLike], **kwargs: Any
                                  ) -> SharedSubspace:
        """Build on a Ray cluster from adapter folders or fsspec URLs (vlora.distributed)."""
        from vlora.distributed import from_adapters_distributed
        return from_adapters_distributed(cls, paths, **kwargs)

    def __repr__(self) -> str:
        ks = [(b.k_out, b.k_in) for b in self.modules.values()]
        return (f"SharedSubspace({len(self.modules)} modules, {len(self._tasks)} tasks, "
                f"k_out/k_in {min(ks, default=(0, 0))}..{max(ks, default=(0, 0))})")


def _fitted(sub: SharedSubspace) -> SharedSubspace:
    """``sub`` with every task marked as a fit leaves it: the bases' Grams hold each
    task's original energy (set once the tasks are final: a replaced task's energy would
    otherwise be taken out of the Grams; and before bytes are counted: the manifest says it)."""
    for t in sub._tasks.values():
        t.gram_share = "original"
    return sub


def _private_as(t: TaskProjection, coord_quant: tuple[int, str, int] | None,
                quant: dict[str, Any]) -> tuple[dict, dict[str, float]]:
    """``t``'s private parts as a subspace storing coordinates with ``coord_quant`` stores
    them (their codes put in ``quant``), and ``||P Q^T - P' Q'^T||^2`` of each one rounded
    anew (none when they are kept as they are)."""
    own, moved = {}, {}
    codes = t.quant or {}
    for m, (p, q) in t.private.items():
        kept = codes.get(f"{m}::P")
        if coord_quant is None and kept is None or kept is not None and coord_quant is not None \
                and (kept.bits, kept.method, kept.block) == coord_quant:
            own[m] = (p, q)
            if kept is not None:
                quant[f"{m}::P"], quant[f"{m}::Q"] = kept, codes[f"{m}::Q"]
            continue
        p2, q2, qp, qq = private.rounded(p, q, coord_quant)
        own[m] = (p2, q2)
        if qp is not None:
            quant[f"{m}::P"], quant[f"{m}::Q"] = qp, qq
        moved[m] = linalg.frobenius_sq(torch.cat([p.to(F64), -p2.to(F64)], 1),
                                       torch.cat([q.to(F64), q2.to(F64)], 1).T)
    return own, moved


def _coded(t: TaskProjection, m: str, coord_quant: tuple[int, str, int]) -> bool:
    """Whether ``t`` stores module ``m``'s coordinates as codes of ``(bits, method, block)``."""
    codes = t.quant or {}
    return all(k in codes and (codes[k].bits, codes[k].method, codes[k].block) == coord_quant
               for k in (f"{m}::B", f"{m}::A"))


def _quantized(modules: dict[str, ModuleBasis], quantization: dict[str, Any]
               ) -> dict[str, ModuleBasis]:
    """``modules`` with their bases rounded as ``quantization`` says (codes kept); a basis
    already stored so is kept as it is."""
    from vlora.quantize import dequantize, quantize
    bits, method, block = quantization["bits"], quantization["method"], quantization["block"]
    out = {}
    for m, b in modules.items():
        q = (b.quant or {}).get("U")
        if q is not None and (q.bits, q.method, q.block) == (bits, method, block):
            out[m] = b
            continue
        qu, qv = quantize(b.U, bits, method, block), quantize(b.V, bits, method, block)
        out[m] = ModuleBasis(dequantize(qu), dequantize(qv), b.G_u, b.G_v, {"U": qu, "V": qv})
    return out


def _target_names(held: list[str], dropped: Iterable[str]) -> list[str]:
    """PEFT ``target_modules`` selecting the ``held`` modules and none of ``dropped``: their
    short names, or the full names where a dropped module shares a short name."""
    from vlora.io import _short_name
    short = {_short_name(m) for m in held}
    return sorted(held if short & {_short_name(m) for m in dropped} else short)


def _stored_factor(basis: ModuleBasis, t: TaskProjection, m: str) -> linalg.Factor:
    """Canonical form of a stored task's ``dW^ = (U L_B)(V L_A)^T`` (exact for any bases,
    quantized ones included)."""
    return linalg.canonical(basis.U.to(F64) @ t.coords_b[m].to(F64),
                            (basis.V.to(F64) @ t.coords_a[m].to(F64)).T)


def _original_if_at_hand(t: TaskProjection) -> LoRAWeights | None:
    if not t.source or not t.sha256:
        return None
    try:
        original = load_adapter(t.source)
    except Exception:  # gone, moved or unreadable: the bound is reported instead
        return None
    return original if original.sha256 == t.sha256 else None


def _stacks(facs: list[linalg.Factor], ws: list[float], shape: tuple[int, int],
            k_out: int | None = None, k_in: int | None = None):
    """Top singular pairs of the weighted stacks ``[sqrt(w_t) U_t S_t]`` and ``[sqrt(w_t) V_t S_t]``."""
    if not facs:  # no task with energy in this module: empty bases
        empty = torch.zeros(0, dtype=F64)
        return (torch.zeros(shape[0], 0, dtype=F64), empty), (torch.zeros(shape[1], 0, dtype=F64), empty)
    sw = [w ** 0.5 for w in ws]
    return (linalg.top_left_singular([ut * (st * c) for (ut, st, _), c in zip(facs, sw)], k_out),
            linalg.top_left_singular([vt * (st * c) for (_, st, vt), c in zip(facs, sw)], k_in))


def _bases_on(modules: dict[str, ModuleBasis], device: torch.device | None) -> dict[str, ModuleBasis]:
    """``modules`` with U and V moved to a fit's ``device`` (None: as they are); a fit's
    bases are float, never quantized, so nothing else needs to move."""
    if device is None:
        return modules
    return {m: dataclasses.replace(b, U=b.U.to(device), V=b.V.to(device)) for m, b in modules.items()}


def _basis(u: torch.Tensor, v: torch.Tensor, facs: list[linalg.Factor],
           ws: list[float]) -> ModuleBasis:
    sw = [w ** 0.5 for w in ws]
    # The columns turned to the principal axes: the Grams are then diagonal, stored as k numbers.
    u, gu = linalg.principal_axes(u, linalg.gram_in_basis([ut * (st * c) for (ut, st, _), c in zip(facs, sw)],
                                                          u))
    v, gv = linalg.principal_axes(v, linalg.gram_in_basis([vt * (st * c) for (_, st, vt), c in zip(facs, sw)],
                                                          v))
    # computed on a fit's device, stored on the CPU
    return ModuleBasis(u.float().cpu().contiguous(), v.float().cpu().contiguous(), gu.cpu(), gv.cpu())
