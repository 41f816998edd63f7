"""How adapters relate: similarity, clusters, outliers, differences, coverage, shared spectrum.

Every figure is a function of ``dW = s * B @ A`` alone, computed in float64 from
small matrices (Gram matrices of the factors, canonical forms), never from the
raw factors themselves and never forming ``dW`` (DESIGN.md sections 2 and 5).
A module missing from an adapter counts as ``dW = 0`` there.

Example::

    sim = compute_similarity_matrix(["ad/a", "ad/b", "ad/c"])
    labels = find_clusters(sim, threshold=0.5)    # one cluster id per adapter
    spectrum = shared_spectrum(["ad/a", "ad/b", "ad/c"])  # energy kept per k, per module
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vlora import linalg
from vlora.adapter import LoRAWeights
from vlora.errors import IncompatibleAdaptersError
from vlora.inputs import check_modules, default_task_id
from vlora.io import load_adapter
from vlora.subspace import SharedSubspace
from vlora.task import adapter_weight

F64 = torch.float64
AdapterLike = LoRAWeights | str | os.PathLike


@dataclass(frozen=True)
class SimilarityMatrix:
    """Cosine similarities ``<dW_i, dW_j> / (||dW_i|| ||dW_j||)`` of N adapters.

    Attributes:
        matrix: ``(N, N)`` float64, over all modules together (an all-zero adapter has
            similarity 0 with everything, itself included).
        modules: module -> ``(N, N)``, the same per module.
        names: the adapters' names (folder names, else ``task_<i>``).
    """

    matrix: torch.Tensor
    modules: dict[str, torch.Tensor]
    names: list[str]


@dataclass(frozen=True)
class DiffStats:
    """``relative = ||dW_a - dW_b|| / ||dW_a||`` (0 if both are 0, inf if only a is 0),
    ``cosine`` (0 if either is 0), and the two Frobenius norms."""

    relative: float
    cosine: float
    norm_a: float
    norm_b: float


@dataclass(frozen=True)
class AdapterDiff:
    overall: DiffStats
    modules: dict[str, DiffStats]


@dataclass(frozen=True)
class Coverage:
    """Share of an adapter's energy inside a subspace: ``||U^T dW V||^2 / ||dW||^2``,
    over the whole adapter and per module (1.0 for ``dW = 0``)."""

    overall: float
    modules: dict[str, float]


@dataclass(frozen=True)
class SharedSpectrum:
    """Per module: ``kept_out[k-1]`` (``kept_in[k-1]``) is the share of the weighted stack
    energy ``sum_t w_t ||dW_t||^2`` that the top k shared output (input) directions keep,
    i.e. ``sum_t w_t ||U_k^T dW_t||^2`` over the total; ``(q,)`` up to the numerical rank."""

    kept_out: torch.Tensor
    kept_in: torch.Tensor


def _load(adapters: Sequence[AdapterLike]) -> tuple[list[LoRAWeights], list[str],
                                                    dict[str, tuple[int, int]]]:
    items = [a if isinstance(a, LoRAWeights) else load_adapter(a) for a in adapters]
    if not items:
        raise ValueError("need at least one adapter")
    names = _distinct_names(items)
    return items, names, check_modules(items, names, "zero")


def _distinct_names(items: Sequence[LoRAWeights]) -> list[str]:
    """Folder names (``task_<i>`` in memory); folders of one name (``x/ad``, ``y/ad``) are
    told apart by as many parent folders as it takes, then by their position."""
    names = [default_task_id(a, i) for i, a in enumerate(items)]
    for depth in range(2, 5):
        dupes = {n for n in names if names.count(n) > 1}
        if not dupes:
            return names
        names = [("/".join(Path(a.source).parts[-depth:]) if n in dupes and a.source else n)
                 for n, a in zip(names, items)]
    return [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _gram(items: Sequence[LoRAWeights], module: str) -> torch.Tensor:
    """``(N, N)`` Gram ``<dW_i, dW_j>`` of one module, 0 where an adapter lacks it.

    With ``B = [s_i B_i]`` ``(d_out, sum r)`` and ``A = [A_i]`` ``(sum r, d_in)``,
    ``<dW_i, dW_j> = sum((B_i^T B_j) * (A_i A_j^T))``: block sums of ``(B^T B) * (A A^T)``.
    """
    idx = [i for i, a in enumerate(items) if module in a.lora_a]
    b = torch.cat([items[i].scales[module] * items[i].lora_b[module].to(F64) for i in idx], 1)
    a = torch.cat([items[i].lora_a[module].to(F64) for i in idx], 0)
    owner = torch.cat([torch.full((items[i].lora_a[module].shape[0],), k)
                       for k, i in enumerate(idx)])
    onehot = torch.nn.functional.one_hot(owner, len(idx)).to(F64)  # (sum r, n_present)
    small = onehot.T @ ((b.T @ b) * (a @ a.T)) @ onehot
    gram = torch.zeros(len(items), len(items), dtype=F64)
    gram[torch.tensor(idx)[:, None], torch.tensor(idx)[None, :]] = small
    return gram


def _cosine(gram: torch.Tensor) -> torch.Tensor:
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    cos = torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.zeros_like(gram))
    return cos.clamp(-1, 1)


def compute_similarity_matrix(adapters: Sequence[AdapterLike]) -> SimilarityMatrix:
    """Cosine similarity of every pair of adapters' ``dW``, overall and per module.

    Cost per module: one ``(sum r) x (sum r)`` Gram of the stacked factors of each side.
    """
    items, names, shapes = _load(adapters)
    with linalg.fixed_threads():
        grams = {m: _gram(items, m) for m in shapes}
    total = sum(grams.values(), torch.zeros(len(items), len(items), dtype=F64))
    return SimilarityMatrix(_cosine(total), {m: _cosine(g) for m, g in grams.items()}, names)


def _as_matrix(sim: SimilarityMatrix | torch.Tensor) -> torch.Tensor:
    s = sim.matrix if isinstance(sim, SimilarityMatrix) else torch.as_tensor(sim, dtype=F64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"a similarity matrix must be square, not {tuple(s.shape)}")
    if not torch.allclose(s, s.T, atol=1e-9):
        raise ValueError("a similarity matrix must be symmetric")
    return s.to(F64)


def find_clusters(sim: SimilarityMatrix | torch.Tensor, threshold: float | None = None,
                  n_clusters: int | None = None) -> list[int]:
    """Average-linkage agglomerative clustering on the distance ``1 - sim``.

    Args:
        sim: a :class:`SimilarityMatrix` or an ``(N, N)`` symmetric similarity matrix.
        threshold: merge clusters while their average similarity is at least this.
        n_clusters: merge until this many clusters remain. Exactly one of the two.

    Returns:
        ``N`` cluster labels, numbered 0, 1, ... in order of first appearance. The
        partition does not depend on the order of the adapters, except where two
        candidate merges are exactly tied (then the earlier position merges first).
    """
    if (threshold is None) == (n_clusters is None):
        raise ValueError("pass exactly one of threshold and n_clusters")
    dist = 1 - _as_matrix(sim)
    n = dist.shape[0]
    if n_clusters is not None and not 1 <= n_clusters <= max(n, 1):
        raise ValueError(f"n_clusters must be in [1, {n}], not {n_clusters}")
    target = n_clusters if n_clusters is not None else 1
    dist.fill_diagonal_(math.inf)
    size = torch.ones(n, dtype=F64)
    label = list(range(n))
    active = n
    while active > target:
        flat = int(torch.argmin(dist))
        i, j = sorted(divmod(flat, n))
        if threshold is not None and float(dist[i, j]) > 1 - threshold:
            break
        # Lance-Williams update for average linkage: the size-weighted mean of the two rows
        row = (size[i] * dist[i] + size[j] * dist[j]) / (size[i] + size[j])
        dist[i], dist[:, i] = row, row
        dist[j], dist[:, j] = math.inf, math.inf
        dist[i, i] = math.inf
        size[i] += size[j]
        label = [i if x == j else x for x in label]
        active -= 1
    first: dict[int, int] = {}
    return [first.setdefault(x, len(first)) for x in label]


MIN_OUTLIER_ADAPTERS = 5  # below this a median and a spread of the others mean nothing
MIN_SPREAD = 0.02  # of mean cosines: differences of a few hundredths are noise


def find_outliers(adapters_or_sim: Sequence[AdapterLike] | SimilarityMatrix | torch.Tensor,
                  z: float = 3.5) -> dict[int, float]:
    """Adapters whose mean similarity to the others is far below the rest's (a robust rule).

    For each adapter i, ``m_i`` is its mean cosine to the others. Its score is
    ``(m_i - median(m)) / max(1.4826 * MAD(m), MIN_SPREAD)`` with ``MAD(m) =
    median(|m_j - median(m)|)``: median and MAD are not moved by the outliers
    themselves, 1.4826 makes the MAD a standard deviation for normal data, and the floor
    keeps adapters that are all about equally unrelated (mean cosines within a few
    hundredths of each other) from scoring high on noise. With fewer than
    ``MIN_OUTLIER_ADAPTERS`` adapters no one is called an outlier.

    Returns:
        index -> score for every adapter scoring below ``-z``, lowest first.
    """
    if isinstance(adapters_or_sim, (SimilarityMatrix, torch.Tensor)):
        s = _as_matrix(adapters_or_sim)
    else:
        s = compute_similarity_matrix(adapters_or_sim).matrix
    n = s.shape[0]
    if n < MIN_OUTLIER_ADAPTERS:
        return {}
    mean = (s.sum(1) - s.diagonal()) / (n - 1)
    centre = float(mean.median())  # the lower middle for even n: also robust
    spread = max(1.4826 * float((mean - centre).abs().median()), MIN_SPREAD)
    scores = {i: (float(x) - centre) / spread for i, x in enumerate(mean)}
    return dict(sorted(((i, sc) for i, sc in scores.items() if sc < -z), key=lambda kv: kv[1]))


def _diff_stats(sq_diff: float, sq_a: float, sq_b: float, dot: float) -> DiffStats:
    na, nb = math.sqrt(sq_a), math.sqrt(sq_b)
    rel = math.sqrt(sq_diff) / na if na > 0 else (0.0 if sq_diff == 0 else math.inf)
    cos = dot / (na * nb) if na > 0 and nb > 0 else 0.0
    return DiffStats(rel, max(-1.0, min(1.0, cos)), na, nb)


def adapter_diff(a: AdapterLike, b: AdapterLike) -> AdapterDiff:
    """How far adapter ``b`` is from ``a``, per module and overall.

    ``||dW_a - dW_b||`` is the norm of the LoRA ``[s_a B_a, -s_b B_b] [A_a; A_b]`` from
    its canonical form (an SVD of a ``(r_a + r_b)``-square matrix): no subtraction of
    near-equal squared norms, so tiny differences keep their digits.
    """
    (a, b), _, shapes = _load([a, b])
    stats, totals = {}, [0.0, 0.0, 0.0, 0.0]
    with linalg.fixed_threads():
        for m in shapes:
            parts = [(x, sign) for x, sign in ((a, 1.0), (b, -1.0)) if m in x.lora_a]
            bs = torch.cat([sign * x.scales[m] * x.lora_b[m].to(F64) for x, sign in parts], 1)
            as_ = torch.cat([x.lora_a[m].to(F64) for x, _ in parts], 0)
            sq_diff = float(linalg.canonical(bs, as_)[1].square().sum())
            sq = [linalg.frobenius_sq(x.lora_b[m], x.lora_a[m], x.scales[m]) if m in x.lora_a
                  else 0.0 for x in (a, b)]
            dot = (linalg.inner(a.lora_b[m], a.lora_a[m], a.scales[m],
                                b.lora_b[m], b.lora_a[m], b.scales[m]) if len(parts) == 2 else 0.0)
            for k, v in enumerate((sq_diff, sq[0], sq[1], dot)):
                totals[k] += v
            stats[m] = _diff_stats(sq_diff, sq[0], sq[1], dot)
    return AdapterDiff(_diff_stats(*totals), stats)


def subspace_coverage(adapter: AdapterLike, subspace: SharedSubspace) -> Coverage:
    """Share of ``adapter``'s energy inside the subspace, ``||Q_u^T dW Q_v||^2 / ||dW||^2``
    per module, with ``Q_u`` ``(d_out, k_out)`` and ``Q_v`` ``(d_in, k_in)`` orthonormal
    bases of ``span(U)`` and ``span(V)`` (``U`` and ``V`` themselves when float; a QR makes
    quantized bases, which are not orthonormal, exact too). Small products only.

    Modules the subspace lacks count as not covered (with a warning).
    """
    adapter = adapter if isinstance(adapter, LoRAWeights) else load_adapter(adapter)
    kept, norm = {}, {}
    with linalg.fixed_threads():
        for m in adapter.layer_names:
            norm[m] = linalg.frobenius_sq(adapter.lora_b[m], adapter.lora_a[m], adapter.scales[m])
            basis = subspace.modules.get(m)
            if basis is None:
                kept[m] = 0.0
                continue
            if adapter.shapes()[m] != (basis.d_out, basis.d_in):
                raise IncompatibleAdaptersError(f"module {m}: adapter shape {adapter.shapes()[m]}, "
                                                f"subspace {(basis.d_out, basis.d_in)}")
            ut, st, vt = linalg.canonical(adapter.lora_b[m], adapter.lora_a[m], adapter.scales[m])
            qu, qv = (torch.linalg.qr(x.to(F64))[0] for x in (basis.U, basis.V))
            kept[m] = linalg.captured_sq(ut * st, vt, qu, qv)
    outside = [m for m in adapter.layer_names if m not in subspace.modules]
    if outside:
        warnings.warn(f"{len(outside)} module(s) not in the subspace count as uncovered: "
                      f"{outside[:5]}", stacklevel=2)
    total = sum(norm.values())
    return Coverage(sum(kept.values()) / total if total > 0 else 1.0,
                    {m: kept[m] / norm[m] if norm[m] > 0 else 1.0 for m in norm})


def shared_spectrum(adapters: Sequence[AdapterLike], weighting: str = "task"
                    ) -> dict[str, SharedSpectrum]:
    """Energy kept by k shared directions, as a function of k, per module and side.

    The stacks ``[sqrt(w_t) U_t S_t]`` ``(d_out, sum r)`` and ``[sqrt(w_t) V_t S_t]``
    ``(d_in, sum r)`` of the canonical factors are what :class:`SharedSubspace` fits its
    bases on; their spectra say how many directions (``k_out``, ``k_in``) hold a given
    share. ``weighting``: ``"task"`` (``w_t = 1 / ||dW_t||^2``, every adapter counts
    equally, the subspace default) or ``"energy"`` (``w_t = 1``).
    """
    if weighting not in ("task", "energy"):
        raise ValueError(f"weighting must be 'task' or 'energy', not {weighting!r}")
    items, _, shapes = _load(adapters)
    out = {}
    with linalg.fixed_threads():
        norms = [sum(linalg.frobenius_sq(a.lora_b[m], a.lora_a[m], a.scales[m])
                     for m in a.layer_names) for a in items]
        sw = [adapter_weight(n, weighting) ** 0.5 for n in norms]
        for m in shapes:
            facs = [(linalg.canonical(a.lora_b[m], a.lora_a[m], a.scales[m]), c)
                    for a, c in zip(items, sw) if m in a.lora_a and c > 0]
            if not facs:
                empty = torch.zeros(0, dtype=F64)
                out[m] = SharedSpectrum(empty, empty)
                continue
            _, s_out = linalg.top_left_singular([u * (s * c) for (u, s, _), c in facs])
            _, s_in = linalg.top_left_singular([v * (s * c) for (_, s, v), c in facs])
            # the total, not the sum of the kept values: the stack spectra stop at the
            # numerical rank, and the curves should end at what that rank really holds
            total = sum(float((s * c).square().sum()) for (_, s, _), c in facs)
            out[m] = SharedSpectrum(*(torch.cumsum(x.square(), 0) / total for x in (s_out, s_in)))
    return out
