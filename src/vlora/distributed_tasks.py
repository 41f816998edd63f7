"""The Ray tasks of the distributed fit (vlora.distributed): what runs on the workers.

Each reads or receives one shard: its adapters (local folders, or fsspec URLs copied to a
temporary folder), or its tasks as projected in round 2. Errors of ours come back as
:class:`Failure` values, never half-wrapped by Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlora import linalg
from vlora.errors import AdapterError, IncompatibleAdaptersError, VLoRAError
from vlora.io import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME, load_adapter
from vlora.task import ModuleBasis, TaskProjection, adapter_weight

if TYPE_CHECKING:
    from vlora.adapter import LoRAWeights
    from vlora.subspace import SharedSubspace

F64 = torch.float64
# module -> (U (d_out, <= width_out), G_u, V (d_in, <= width_in), G_v), float64; a module
# no adapter of the shard gives energy to (every weight 0) is absent
Sketch = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
# module -> (L_B (w_out, R), L_A (w_in, R), ranks, weights): a shard's tasks' coordinates
# in the sketch bases side by side (R the sum of the ranks), float64, with their weights
Cores = dict[str, tuple[torch.Tensor, torch.Tensor, list[int], list[float]]]


@dataclass
class Failure:
    """An error of ours raised in a worker, carried back as a value: Ray would wrap it,
    and an AdapterError does not survive pickling (its arguments are not its ``args``)."""

    kind: type[VLoRAError]
    message: str
    path: str | None = None
    problem: str | None = None

    @classmethod
    def of(cls, e: VLoRAError) -> Failure:
        return cls(type(e), str(e), getattr(e, "path", None), getattr(e, "problem", None))

    def exception(self) -> VLoRAError:
        if issubclass(self.kind, AdapterError):
            return self.kind(self.path, self.problem)
        return self.kind(self.message)


@dataclass
class ShardInfo:
    """What the driver checks of a shard: its first adapter, their modules and shapes
    (every adapter of the shard has them) and base models, or the failure."""

    first: str
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    base_models: list[str | None] = field(default_factory=list)
    failure: Failure | None = None


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` is read through fsspec (``file://`` included)."""
    return "://" in str(path)


def _download(url: str, dest: Path) -> Path:
    """The adapter config and weights file (safetensors, else .bin) at ``url`` copied into ``dest``."""
    try:
        import fsspec
        fs, root = fsspec.core.url_to_fs(url)
        root = root.rstrip("/")
        names = [n for n in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME) if fs.isfile(f"{root}/{n}")]
        if CONFIG_NAME not in names:
            raise AdapterError(url, f"not a LoRA adapter folder (no {CONFIG_NAME})")
        dest.mkdir(parents=True)
        for name in names[:2]:  # the config and the weights file load_adapter reads
            fs.get_file(f"{root}/{name}", str(dest / name))
    except (OSError, ValueError, ImportError) as e:  # no such file, unknown protocol, no backend
        raise AdapterError(url, f"cannot read through fsspec ({type(e).__name__}: {e})") from None
    return dest


@contextlib.contextmanager
def _copies(paths: Sequence[str]) -> Iterator[Any]:
    """A function ``i -> local folder`` of ``paths[i]``: a local path as it is, a URL copied
    into a temporary folder (removed on exit)."""
    with tempfile.TemporaryDirectory(prefix="vlora-shard-") as tmp:
        yield lambda i: str(_download(paths[i], Path(tmp) / str(i))) if is_url(paths[i]) else paths[i]


def _load(path: str, local: str) -> LoRAWeights:
    """:func:`load_adapter` of ``local``, the copy of ``path``, with errors naming ``path``."""
    try:
        return load_adapter(local)
    except AdapterError as e:
        if local == path or e.path is None:
            raise
        raise type(e)(e.path.replace(local, path.rstrip("/")), e.problem) from None


def sketch_shard(paths: Sequence[str], weighting: str, widths: tuple[int, int]
                 ) -> tuple[ShardInfo, Sketch | None]:
    """Read a shard of adapters and fold them into one sketch per module (a Ray task).

    Returns the shard's :class:`ShardInfo` and its sketch (None when it failed)."""
    try:
        with _copies(paths) as local, linalg.fixed_threads():
            adapters = [_load(p, local(i)) for i, p in enumerate(paths)]
            shapes = adapters[0].shapes()
            for a, p in zip(adapters, paths):
                if a.shapes() != shapes:
                    raise IncompatibleAdaptersError(
                        f"{p}: modules or shapes differ from {paths[0]}'s; the distributed fit "
                        "needs adapters of one base model and target set")
            norms = [sum(linalg.frobenius_sq(a.lora_b[m], a.lora_a[m], a.scales[m]) for m in shapes)
                     for a in adapters]
            sws = [adapter_weight(n, weighting) ** 0.5 for n in norms]
            sketch: Sketch = {}
            for m in shapes:
                facs = [(linalg.canonical(a.lora_b[m], a.lora_a[m], a.scales[m]), c)
                        for a, c in zip(adapters, sws) if c > 0]
                if facs:
                    d_out, d_in = shapes[m]
                    u, gu = linalg.incremental_basis(torch.zeros(d_out, 0, dtype=F64), None, [
                        ut * (st * c) for (ut, st, _), c in facs], widths[0])
                    v, gv = linalg.incremental_basis(torch.zeros(d_in, 0, dtype=F64), None, [
                        vt * (st * c) for (_, st, vt), c in facs], widths[1])
                    sketch[m] = (u, gu, v, gv)
        return ShardInfo(paths[0], shapes, [a.base_model for a in adapters]), sketch
    except VLoRAError as e:
        return ShardInfo(paths[0], failure=Failure.of(e)), None


def merge_sketches(a: Sketch | None, b: Sketch | None, widths: tuple[int, int]) -> Sketch | None:
    """One sketch of the union of two shards' stacks (a Ray task): per module and side,
    the top ``width`` of ``[U_a G_a^(1/2), U_b G_b^(1/2)]``, exact when that rank fits."""
    if a is None or b is None:  # a failed shard: the driver raises its error
        return None
    out = dict(a)
    with linalg.fixed_threads():
        for m, (ub, gub, vb, gvb) in b.items():
            if m not in a:
                out[m] = b[m]
                continue
            ua, gua, va, gva = a[m]
            u, gu = linalg.incremental_basis(ua, gua, [ub @ linalg.psd_sqrt(gub)], widths[0])
            v, gv = linalg.incremental_basis(va, gva, [vb @ linalg.psd_sqrt(gvb)], widths[1])
            out[m] = (u, gu, v, gv)
    return out


def project_shard(cls: type[SharedSubspace], wide: dict[str, ModuleBasis], weighting: str,
                  base_model: str | None, paths: Sequence[str], ids: Sequence[str]
                  ) -> tuple[Failure | list[tuple[int, int, int]], list[TaskProjection] | None, Cores | None]:
    """Every adapter of a shard projected on the sketches' float64 bases (a Ray task):
    coordinates ``Ũ^T (s B)``, ``Ṽ^T A^T`` and the exact error outside the sketch spans.

    Returns, per task, what a byte budget counts (its largest rank, its LoRA numbers
    ``sum_m r_m (d_out + d_in)`` and its spectra's numbers), the tasks, and their
    coordinates side by side for the refinement (:data:`Cores`)."""
    sub = cls(wide, weighting=weighting, base_model=base_model)
    try:
        with _copies(paths) as local:
            for i, (p, tid) in enumerate(zip(paths, ids)):
                sub.add_task(sub.project(_load(p, local(i)), tid))
    except VLoRAError as e:
        return Failure.of(e), None, None
    tasks = [sub.get_task(t) for t in ids]
    for t, p in zip(tasks, paths):
        if is_url(p):
            t.source = p  # not the temporary copy
    counts = [(max(t.coords_b[m].shape[1] for m in t.modules),
               sum(t.coords_b[m].shape[1] * (b.d_out + b.d_in) for m, b in wide.items())) for t in tasks]
    # what every refinement round reads, in two tensors per module: unpickling the tasks'
    # hundreds of small tensors took 40 times the round's arithmetic
    cores = {m: (torch.cat([t.coords_b[m] for t in tasks], 1), torch.cat([t.coords_a[m] for t in tasks], 1),
                 [t.coords_b[m].shape[1] for t in tasks], [t.weight for t in tasks]) for m in wide}
    return counts, tasks, cores


def refine_stats(cores: Cores, mats: dict[str, torch.Tensor], side: str) -> dict[str, torch.Tensor]:
    """Per module, a shard's share of ``sum_t w_t (C_t X)(C_t X)^T`` (``side`` "u", X = Q)
    or ``sum_t w_t (C_t^T X)(C_t^T X)^T`` (``side`` "v", X = P), ``C_t = L_B,t L_A,t^T``
    the task's core in the sketch bases (a Ray task)."""
    out = {}
    with linalg.fixed_threads():
        for m, x in mats.items():
            lb, la, ranks, weights = cores[m]
            n = lb.shape[0] if side == "u" else la.shape[0]
            acc = torch.zeros(n, n, dtype=F64)
            for b, a, w in zip(lb.split(ranks, 1), la.split(ranks, 1), weights):
                y = b @ (a.T @ x) if side == "u" else a @ (b.T @ x)
                acc.addmm_(y, y.T, alpha=w)
            out[m] = acc
    return out


def finish_shard(cls: type[SharedSubspace], tasks: list[TaskProjection],
                 rotations: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 modules: dict[str, ModuleBasis], weighting: str, base_model: str | None,
                 paths: Sequence[str], pseudo_rank: int | dict[str, dict[str, int]] | None,
                 quant: tuple[int, str] | None) -> list[TaskProjection] | Failure:
    """A shard's tasks in the final bases ``U = Ũ P``, ``V = Ṽ Q`` (a Ray task): coordinates
    ``P^T L̃_B``, ``Q^T L̃_A`` (cores at ``pseudo_rank``, one or ``{task: {module: rank}}``),
    exact errors, and quantized with ``quant = (bits, method)`` as
    :meth:`SharedSubspace.quantize` does with coordinates."""
    done = []
    with linalg.fixed_threads():
        for t in tasks:
            cb, ca, res = {}, {}, {}
            for m, (p, q) in rotations.items():
                lb, la = p.T @ t.coords_b[m], q.T @ t.coords_a[m]
                rank = pseudo_rank[t.task_id][m] if isinstance(pseudo_rank, dict) else pseudo_rank
                if rank is not None and rank < lb.shape[1]:
                    lb, la = linalg.truncate_core(lb, la, rank)
                cb[m], ca[m] = lb.float(), la.float()
                wide = t.coords_b[m] @ t.coords_a[m].T
                # dW's part outside the sketch spans is orthogonal to all of U C V^T: the
                # error is that part's plus the difference of the cores inside
                inside = wide - p @ (cb[m].to(F64) @ ca[m].to(F64).T) @ q.T
                res[m] = t.residual_sq[m] + float(inside.square().sum())
            done.append(dataclasses.replace(t, coords_b=cb, coords_a=ca, residual_sq=res,
                                            gram_share="original"))  # the Grams hold every adapter
    if quant is None:
        return done
    sub = cls(modules, done, weighting=weighting, base_model=base_model)
    try:
        with _copies(paths) as local:  # the originals at hand again: exact errors
            for i, t in enumerate(done):
                t.source = local(i) if is_url(paths[i]) else t.source
            sub.quantize(*quant, coordinates=True)
    except VLoRAError as e:
        return Failure.of(e)
    for t, p in zip(done, paths):
        t.source = p if is_url(p) else t.source
    return done
