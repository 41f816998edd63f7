"""Fitting a subspace on a Ray cluster: ``SharedSubspace.from_adapters_distributed``.

The batch fit as a map-reduce over shards of adapters, each read where it is (a local
folder, or an fsspec URL such as ``s3://bucket/a`` or ``hf://user/repo`` where fsspec has
the backend). Four rounds of Ray tasks:

1. Sketch: each shard folds, per module and side, into the top ``w = k + oversample``
   directions of its stack and their Gram (as pass 1 of streaming folds a chunk); the
   sketches merge pairwise in a fixed tree by the same rule (:func:`linalg.incremental_basis`),
   as they are made: a bounded number of sketches is alive at once, whatever the shards.
2. Project: each shard's adapters are projected on the merged sketch bases ``Ũ``, ``Ṽ``
   (float64, w columns), with their exact errors outside those spans; the results stay
   in Ray's object store.
3. Refine: the alternating refinement of the batch fit (:func:`linalg.refine_bases`)
   inside the sketch spans, ``U = Ũ P``, ``V = Ṽ Q``: each round reduces the w x w sums
   ``sum_t w_t C_t Q Q^T C_t^T`` (then with P) over the shards' cores ``C_t``.
4. Finish: each shard's coordinates ``P^T L̃_B``, ``Q^T L̃_A`` and exact errors (the part
   outside the spans plus the cores' difference inside), quantized there with ``bits``.

The driver holds the merged sketch, w x w matrices and, at the end, the tasks'
coordinates; a worker holds one shard. Nothing is written: the caller saves, atomically.

Equality: when no stack's rank exceeds ``k + oversample`` the sketches are exact, the
order of shards and merges does not matter, and the result is the batch fit's
(:meth:`SharedSubspace.from_adapters` at the same k) up to rounding; ``refine_iters=0``
gives the streaming fit's. Otherwise the refinement runs inside the top w directions
only: on the shipped adapters at k = 8 the mean error is 0.35% above the batch fit's
(streaming's, unrefined: 4.5%).

Workers need vlora installed (and the fsspec backend of the URLs). A worker killed
mid-task is replaced and its task run again by Ray (``max_retries``); tasks are
deterministic, so the result is unchanged.

A byte budget or ratio runs :func:`vlora.compress.compress`'s search over fits on top of
rounds 1-2: each fit chooses ks from the sketch spectra (so ``num_components + oversample``
caps them), and repeats rounds 3-4 only (no adapter is read again, except to quantize the
one kept with exact errors).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlora import linalg
from vlora.budget import choose_ks, coordinate_numbers, core_ranks
from vlora.compress import scale_search
from vlora.distributed_tasks import (
    Failure,
    ShardInfo,
    finish_shard,
    merge_sketches,
    project_shard,
    refine_stats,
    sketch_shard,
)
from vlora.errors import IncompatibleAdaptersError, VLoRAError
from vlora.inputs import check_rank, one_base_model, warn_base_models
from vlora.progress import track
from vlora.stats import stored_bytes
from vlora.task import ModuleBasis

if TYPE_CHECKING:
    from vlora.subspace import SharedSubspace

F64 = torch.float64


def from_adapters_distributed(cls: type[SharedSubspace], paths: Sequence[str | os.PathLike],
                              task_ids: Sequence[str] | None = None,
                              num_components: int | tuple[int, int] | None = None,
                              variance_threshold: float | None = None, oversample: int = 8,
                              refine_iters: int = 10, shard_size: int = 16, weighting: str = "task",
                              pseudo_rank: int | None = None, budget: float | None = None,
                              ratio: float | None = None, bits: int | None = None,
                              method: str = "symmetric", address: str | None = None,
                              num_cpus: int | None = None, max_retries: int = 3,
                              progress: bool = False) -> SharedSubspace:
    """Build a subspace on a Ray cluster; see the module docstring.

    Args:
        paths: adapter folders or fsspec URLs of one base model (every one with the same modules).
        task_ids: unique ids (default: the last part of each path).
        num_components: the largest k per module and side (int or ``(k_out, k_in)``;
            default 16); with a budget or ratio (default 64) the ks may reach
            ``num_components + oversample``, every direction the sketches hold.
        variance_threshold: optionally a smaller k keeping this share of the tracked energy.
        oversample: extra directions every sketch keeps: the bases are refined inside the
            sketches' ``k + oversample`` directions.
        refine_iters: alternating refinement rounds, as :meth:`SharedSubspace.from_adapters`
            (0: the streaming fit's bases).
        shard_size: adapters one task reads (a worker's memory is one shard's).
        pseudo_rank: store each task's core at this rank.
        budget, ratio: stored bytes to land under, or LoRA bytes over stored bytes, found by
            :func:`vlora.compress.compress`'s search over fits (ks within the sketches).
        bits, method: quantize bases and coordinates afterwards, as
            :meth:`SharedSubspace.quantize` with ``coordinates=True`` (in the workers).
        address: the Ray cluster (``"auto"``, ``"ray://host:10001"``); None or ``"local"``
            starts a local one with ``num_cpus`` CPUs for this fit, shut down afterwards.
            A Ray already initialized in this process is used as it is.
        max_retries: times Ray runs a task again whose worker died.
    """
    from vlora.storage import validate_task_id
    check_rank(pseudo_rank, "pseudo_rank")
    paths = [str(p) for p in paths]
    ids = list(task_ids) if task_ids is not None else [Path(p).name for p in paths]
    if len(ids) != len(paths):
        raise ValueError(f"{len(ids)} task ids for {len(paths)} adapters")
    dupes = sorted(t for t, n in Counter(ids).items() if n > 1)
    if dupes:
        raise ValueError(f"duplicate task ids: {dupes}")
    if not paths:
        raise ValueError("from_adapters_distributed needs at least one adapter")
    for t in ids:
        validate_task_id(t)
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, not {shard_size!r}")
    if num_components is None:
        num_components = 16 if budget is None and ratio is None else 64
    k_out, k_in = num_components if isinstance(num_components, tuple) else (num_components,) * 2
    widths = (k_out + oversample, k_in + oversample)
    shards = [(paths[i:i + shard_size], ids[i:i + shard_size]) for i in range(0, len(paths), shard_size)]
    if budget is not None and ratio is not None:
        raise ValueError("give a budget or a ratio, not both")
    for name, x in (("budget", budget), ("ratio", ratio)):
        if x is not None and not (x > 0 and math.isfinite(x)):
            raise ValueError(f"{name} must be a positive finite number, not {x}")
    if variance_threshold is not None and (budget is not None or ratio is not None):
        raise ValueError("pass a variance_threshold or a byte target, not both")
    if weighting not in ("task", "energy"):
        raise ValueError(f"weighting must be 'task' or 'energy', not {weighting!r}")
    if bits is not None:  # here, not in every worker
        from vlora.quantize import quantize
        quantize(torch.zeros(1, 64), bits, method)
    ray = _ray()
    started = _connect(ray, address, num_cpus)
    try:
        run = _Run(ray, cls, shards, weighting, max_retries, refine_iters, progress)
        run.sketch_and_project(widths)
        if budget is None and ratio is None:
            ks = {m: (linalg.choose_k(b.G_u.diagonal().sqrt(), k_out, variance_threshold),
                      linalg.choose_k(b.G_v.diagonal().sqrt(), k_in, variance_threshold))
                  for m, b in run.wide.items()}
            return run.fit(ks, pseudo_rank, None if bits is None else (bits, method))
        return run.fit_to_bytes(budget, ratio, bits, method, pseudo_rank)
    finally:
        if started:
            ray.shutdown()


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise VLoRAError("the distributed fit needs Ray: pip install 'vlora[ray]'") from None
    return ray


def _connect(ray: Any, address: str | None, num_cpus: int | None) -> bool:
    """Join the Ray already initialized in this process, or start one (a local cluster for
    ``address`` None or ``"local"``). Returns whether this call started it."""
    if ray.is_initialized():
        return False
    local = address in (None, "local")
    ray.init(address="local" if local else address, num_cpus=num_cpus if local else None,
             include_dashboard=False, logging_level=logging.WARNING)
    return True


def _gather(ray: Any, refs: list[Any], description: str, progress: bool) -> list[Any]:
    """The values of ``refs`` in their order, awaited as they complete (the progress bar).
    The first :class:`Failure` (or ShardInfo holding one) is raised after cancelling the
    rest: a reused cluster would otherwise go on with work nobody awaits."""
    index = {r: i for i, r in enumerate(refs)}
    values: list[Any] = [None] * len(refs)

    def completed() -> Iterator[None]:
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            value = ray.get(done[0])
            failure = value.failure if isinstance(value, ShardInfo) else value
            if isinstance(failure, Failure):
                for r in pending:
                    ray.cancel(r)
                raise failure.exception()
            values[index[done[0]]] = value
            yield

    for _ in track(completed(), description, len(refs), progress):
        pass
    return values


def _sketch_tree(ray: Any, run: _Run, widths: tuple[int, int], window: int) -> tuple[list[Any], Any]:
    """Round 1: the shards' sketch tasks and their pairwise merges; returns the shards'
    ShardInfo refs and the root sketch's ref.

    The merges form a fixed binary tree over the shards in order (a binary counter: two
    sketches of one level merge as soon as both are submitted), so the result does not
    depend on which task ends first. At most ``window`` tasks (sketches and merges) are in
    flight, and a merge's inputs are dropped as it is submitted (Ray frees them once it
    ran): the object store holds about ``2 window + log2(shards)`` sketches at a time, not
    one per shard, so a worker's share of it does not grow with the adapters. A failed
    shard cancels what is in flight and raises its error."""
    infos: list[Any] = []
    stack: list[tuple[int, Any]] = []  # (level, sketch ref): at most one per level but the top
    running: list[Any] = []  # tasks not known to have ended: a sketch's info ref, a merge's ref
    shard_infos: set[Any] = set()

    def cancel() -> None:
        for r in running + [ref for _, ref in stack]:
            ray.cancel(r)

    def wait_below(n: int) -> None:
        nonlocal running
        while len(running) > n:  # a merge's sketch is not fetched here, only waited on
            done, running = ray.wait(running, num_returns=1, fetch_local=False)
            if done[0] not in shard_infos:
                continue
            try:
                failure = ray.get(done[0]).failure
            except BaseException:  # the task itself raised (Ray's error, after its retries)
                cancel()
                raise
            if failure is not None:
                cancel()
                raise failure.exception()

    def submit_merge(level: int) -> None:
        (_, b), (_, a) = stack.pop(), stack.pop()
        stack.append((level, run.merge.remote(a, b, widths)))
        running.append(stack[-1][1])

    for paths, _ in track(run.shards, "Fitting (sketches)", len(run.shards), run.progress):
        wait_below(window - 1)
        info, sketch = run.sketch.remote(paths, run.weighting, widths)
        infos.append(info)
        shard_infos.add(info)
        running.append(info)
        stack.append((0, sketch))
        while len(stack) > 1 and stack[-1][0] == stack[-2][0]:
            submit_merge(stack[-1][0] + 1)
    while len(stack) > 1:
        submit_merge(stack[-2][0])
    wait_below(0)
    return infos, stack[0][1]


def _top(gram: torch.Tensor, k: int) -> torch.Tensor | None:
    """The top ``k`` eigenvectors of a PSD ``gram``, None when its numerical rank is below k."""
    evals, evecs = torch.linalg.eigh(gram)
    if linalg.numerical_rank(evals.flip(0).clamp_min(0).sqrt()) < k:
        return None
    return evecs.flip(1)[:, :k]


def _refine(ray: Any, stats: Any, shards: list[Any], rotations: dict[str, tuple[torch.Tensor, torch.Tensor]],
            totals: dict[str, float], iters: int, progress: bool, tol: float = linalg.REFINE_TOL
            ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """:func:`vlora.linalg.refine_bases` inside the sketch spans: ``U = Ũ P``, ``V = Ṽ Q``,
    P the top of ``sum_t w_t C_t Q Q^T C_t^T`` and Q the top of ``sum_t w_t C_t^T P P^T C_t``
    with ``C_t`` the cores in the sketch bases, reduced over ``shards`` (refs of their
    :data:`Cores`) each round. The batch fit's stopping rules per module, with
    ``totals[m]`` the weighted energy of module m's tasks in its left sketch span (the
    trace of its Gram): the error there, not the whole error, so it stops no earlier."""
    def reduce(mats: dict[str, torch.Tensor], side: str) -> dict[str, torch.Tensor]:
        if not mats:
            return {}
        mats_ref = ray.put(mats)  # once, not once per shard
        parts = ray.get([stats.remote(ref, mats_ref, side) for ref in shards])
        return {m: sum(part[m] for part in parts) for m in mats}

    active = {m for m, (p, q) in rotations.items() if p.shape[1] and q.shape[1] and iters}
    gv = reduce({m: rotations[m][0] for m in active}, "v")
    best = {m: float(torch.trace(rotations[m][1].T @ gv[m] @ rotations[m][1])) for m in active}
    for _ in track(range(iters), "Fitting (refinement)", iters, progress):
        if not active:
            break
        gu = reduce({m: rotations[m][1] for m in active}, "u")
        p2 = {m: _top(gu[m], rotations[m][0].shape[1]) for m in active}
        active = {m for m in active if p2[m] is not None}  # a round shrinking k is not taken
        gv = reduce({m: p2[m] for m in active}, "v")
        for m in list(active):
            q2 = _top(gv[m], rotations[m][1].shape[1])
            new = -math.inf if q2 is None else float(torch.trace(q2.T @ gv[m] @ q2))
            if new <= best[m]:  # no round that loses energy
                active.discard(m)
                continue
            rotations[m], gained, best[m] = (p2[m], q2), new - best[m], new
            if linalg.refinement_done(gained, new, totals[m], tol):
                active.discard(m)
    return rotations


def _final_bases(wide: dict[str, ModuleBasis], rotations: dict[str, tuple[torch.Tensor, torch.Tensor]]
                 ) -> tuple[dict[str, ModuleBasis], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Bases ``Ũ P``, ``Ṽ Q`` turned to their principal axes (as the batch fit stores them),
    with their Grams ``P^T G̃ P`` (exact when no sketch truncated), and P, Q turned alike."""
    modules, turned = {}, {}
    for m, b in wide.items():
        p, q = rotations[m]
        u, gu = linalg.principal_axes(b.U @ p, p.T @ b.G_u @ p)
        v, gv = linalg.principal_axes(b.V @ q, q.T @ b.G_v @ q)
        modules[m] = ModuleBasis(u.float().contiguous(), v.float().contiguous(), gu, gv)
        turned[m] = (b.U.T @ u, b.V.T @ v)
    return modules, turned


class _Run:
    """The driver's side of one fit, between its rounds of Ray tasks."""

    def __init__(self, ray: Any, cls: type[SharedSubspace], shards: list[tuple[list[str], list[str]]],
                 weighting: str, max_retries: int, refine_iters: int, progress: bool):
        self.ray, self.cls, self.shards, self.weighting = ray, cls, shards, weighting
        remote = functools.partial(ray.remote, max_retries=max_retries)
        # made once: each RemoteFunction is exported to the cluster on its first call
        self.sketch, self.merge = remote(num_returns=2)(sketch_shard), remote()(merge_sketches)
        self.project, self.stats = remote(num_returns=3)(project_shard), remote()(refine_stats)
        self.finish = remote()(finish_shard)
        self.refine_iters, self.progress = refine_iters, progress
        # tasks of round 1 in flight at once: enough to keep every CPU busy, few enough
        # that the sketches waiting for their merge stay a handful
        self.window = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.last: tuple[Any, Any] = (None, None)  # (ks, (modules, rotations)) of the last fit
        self.fixed: int | None = None  # stored bytes of the fit with no direction (best_under)

    def sketch_and_project(self, widths: tuple[int, int]) -> None:
        """Rounds 1 and 2: the merged sketch as float64 bases ``self.wide`` (``Ũ``, ``Ṽ``
        and their Grams per module), and every task projected on them, left in the object
        store (``self.projected``, one ref per shard)."""
        ray, self.widths = self.ray, widths
        refs, root = _sketch_tree(ray, self, widths, self.window)
        infos = ray.get(refs)
        for info in infos[1:]:
            if info.shapes != infos[0].shapes:
                raise IncompatibleAdaptersError(
                    f"{info.first}: modules or shapes differ from {infos[0].first}'s; the "
                    "distributed fit needs adapters of one base model and target set")
        names = [n for info in infos for n in info.base_models]
        warn_base_models(names, "the adapters")  # once here: the subspace then names none
        self.base_model = one_base_model(names)
        sketch, self.wide = ray.get(root), {}
        for m, (d_out, d_in) in infos[0].shapes.items():
            empty = (torch.zeros(d_out, 0, dtype=F64), torch.zeros(0, 0, dtype=F64),
                     torch.zeros(d_in, 0, dtype=F64), torch.zeros(0, 0, dtype=F64))
            u, gu, v, gv = sketch.get(m) or empty  # no adapter gave the module energy
            self.wide[m] = ModuleBasis(u, v, gu, gv)
        wide = ray.put(self.wide)
        triples = [self.project.remote(self.cls, wide, self.weighting, self.base_model, p, t)
                   for p, t in self.shards]
        self.counts = [c for shard in _gather(ray, [c for c, _, _ in triples], "Fitting (projections)",
                                              self.progress) for c in shard]
        self.projected, self.cores = [t for _, t, _ in triples], [c for _, _, c in triples]

    def fit(self, ks: dict[str, tuple[int, int]], pseudo_rank: int | dict[str, dict[str, int]] | None,
            quant: tuple[int, str] | None) -> SharedSubspace:
        """Rounds 3 and 4 at ``ks`` (the refinement is reused from the last call at the same ks)."""
        if self.last[0] != ks:  # one thread: faster for these w x w problems, and byte-identical
            starts = {m: (torch.eye(b.k_out, dtype=F64)[:, :ks[m][0]],
                          torch.eye(b.k_in, dtype=F64)[:, :ks[m][1]]) for m, b in self.wide.items()}
            with linalg.fixed_threads():
                totals = {m: float(torch.trace(b.G_u)) for m, b in self.wide.items()}
                rotations = _refine(self.ray, self.stats, self.cores, starts, totals, self.refine_iters,
                                    self.progress)
                self.last = (ks, _final_bases(self.wide, rotations))
        modules, rotations = self.last[1]
        ranks = [{i: pseudo_rank[i] for i in ids} if isinstance(pseudo_rank, dict) else pseudo_rank
                 for _, ids in self.shards]  # a shard's share of the ranks only
        # put once: an argument given by value is copied into the object store per task
        rot_ref, mod_ref = self.ray.put(rotations), self.ray.put(modules)
        refs = [self.finish.remote(self.cls, t, rot_ref, mod_ref, self.weighting, self.base_model, p, r,
                                   quant) for t, (p, _), r in zip(self.projected, self.shards, ranks)]
        done = _gather(self.ray, refs, "Projecting", self.progress)
        sub = self.cls(modules, weighting=self.weighting, base_model=self.base_model)
        if quant is not None:  # the codes the workers made; no task is there to move yet
            sub.quantize(*quant, coordinates=True)
        for tasks in done:
            for t in tasks:
                sub.add_task(t)
        return sub

    def best_under(self, budget: float, pseudo_rank: int | None) -> tuple[Any, SharedSubspace, bool]:
        """:meth:`SharedSubspace.from_adapters`' search under a float32 ``budget``: ks by
        :func:`vlora.budget.choose_ks` on the sketch spectra, each candidate pseudo-rank's
        coordinate bytes shared out by :func:`vlora.budget.core_ranks`, the lowest mean error
        kept. Returns ``(spec, sub, smallest)``: the fit's ``(ks, ranks)``, the fit, and
        whether it is only the smallest one (over the budget)."""
        ranks = [c[0] for c in self.counts]
        top = max(ranks)
        candidates = [pseudo_rank] if pseudo_rank is not None else sorted(
            {top, max(1, (3 * top) // 4), max(1, top // 2), max(1, top // 4)}, reverse=True)
        spectra = {m: (b.G_u.diagonal().sqrt(), b.G_v.diagonal().sqrt()) for m, b in self.wide.items()}
        shapes = {m: (b.d_out, b.d_in) for m, b in self.wide.items()}
        if self.fixed is None:  # the directory's bytes whatever the ks (manifest, headers, figures)
            self.fixed = stored_bytes(self.fit(dict.fromkeys(self.wide, (0, 0)), None, None))
        best = smallest = None
        for p in candidates:
            ks = choose_ks(spectra, shapes, sum(min(r, p) for r in ranks), None, None, budget, True,
                           fixed_bytes=self.fixed)
            spec = (ks, p if pseudo_rank is not None else None)
            sub = self.fit(*spec, None)
            if pseudo_rank is None and p < top:
                tasks = [sub.get_task(t) for t in sub.tasks]
                spec = (ks, core_ranks(tasks, sub.modules, coordinate_numbers(tasks, sub.modules, p)))
                sub = self.fit(*spec, None)
            score, stored = sum(sub.get_task(t).error for t in sub.tasks), stored_bytes(sub)
            if stored <= budget and (best is None or score < best[0]):
                best = (score, spec, sub)
            if smallest is None or stored < smallest[0]:
                smallest = (stored, spec, sub)
        return (*best[1:], False) if best else (*smallest[1:], True)

    def fit_to_bytes(self, budget: float | None, ratio: float | None, bits: int | None, method: str,
                     pseudo_rank: int | None) -> SharedSubspace:
        """:func:`vlora.compress.compress`'s search over fits for stored bytes under
        ``budget`` (or the LoRA bytes over ``ratio``), quantized to ``bits``: the fits are
        measured quantized with bounds for errors, the one kept is quantized in the workers
        with exact errors."""
        if ratio is not None:
            budget = 4 * sum(c[1] for c in self.counts) / ratio
        def fit(factor: float) -> tuple[SharedSubspace, bool, Any]:
            spec, sub, smallest = self.best_under(budget * factor, pseudo_rank)
            if bits is not None:
                sub.quantize(bits, method, coordinates=True, exact_errors=False)
            return sub, smallest, (spec, sub)

        spec, sub = scale_search(fit, budget, bits, f"fit of {len(self.counts)} adapters")
        self._warn_capped(spec[0])
        return sub if bits is None else self.fit(*spec, (bits, method))

    def _warn_capped(self, ks: dict[str, tuple[int, int]]) -> None:
        """Warn where the budget took every direction a full sketch holds: it may have
        wanted more, which the batch fit would have given."""
        full = [m for m, (ko, ki) in ks.items()
                if (ko, ki) != (0, 0) and (ko == self.widths[0] or ki == self.widths[1])]
        if full:
            warnings.warn(f"the byte budget took all {self.widths} directions the sketches hold in "
                          f"{len(full)} module(s) (e.g. {full[0]}): pass a larger num_components",
                          UserWarning, stacklevel=4)
