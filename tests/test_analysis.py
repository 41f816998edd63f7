"""Analysis (DESIGN.md section 5): every figure against a dense computation on dW, gauge-free."""

from __future__ import annotations

import math
from dataclasses import astuple

import pytest
import torch

from synthetic import MODULES, planted, regauge
from vlora import IncompatibleAdaptersError, LoRAWeights, SharedSubspace, save_adapter
from vlora.analysis import (
    SimilarityMatrix,
    adapter_diff,
    compute_similarity_matrix,
    find_clusters,
    find_outliers,
    shared_spectrum,
    subspace_coverage,
)

F64 = torch.float64


def families(sizes=(3, 4, 2), noise=0.3) -> list[LoRAWeights]:
    """Adapters in groups: each a random perturbation of its group's centre adapter."""
    out = []
    g = torch.Generator().manual_seed(0)
    for seed, n in enumerate(sizes):
        (centre,) = planted(1, dtype=F64, seed=seed)
        for _ in range(n):
            a = {m: x + noise * x.std() * torch.randn(x.shape, generator=g, dtype=F64)
                 for m, x in centre.lora_a.items()}
            b = {m: x + noise * x.std() * torch.randn(x.shape, generator=g, dtype=F64)
                 for m, x in centre.lora_b.items()}
            out.append(LoRAWeights(MODULES, a, b, dict(centre.scales)))
    return out


def flat(adapter, modules=MODULES):
    return torch.cat([adapter.delta_weight(m).flatten() if m in adapter.lora_a
                      else torch.zeros(40 * 32, dtype=F64) for m in modules])


def dense_cos(x, y):
    den = float(x.norm() * y.norm())
    return float(x @ y) / den if den > 0 else 0.0


def partition(labels, order=None):
    order = order if order is not None else range(len(labels))
    groups: dict[int, set] = {}
    for pos, lab in zip(order, labels):
        groups.setdefault(lab, set()).add(pos)
    return {frozenset(g) for g in groups.values()}


def gauged(adapters):
    return [regauge(a, seed=i + 3) for i, a in enumerate(adapters)]


# ------------------------------------------------------------------------ similarity
def test_similarity_matches_dense_cosines():
    ads = families()
    zero = LoRAWeights(MODULES, {m: torch.zeros(2, 32, dtype=F64) for m in MODULES},
                       {m: torch.zeros(40, 2, dtype=F64) for m in MODULES},
                       dict.fromkeys(MODULES, 1.0))
    short = LoRAWeights(MODULES[:1], {MODULES[0]: ads[0].lora_a[MODULES[0]]},
                        {MODULES[0]: ads[0].lora_b[MODULES[0]]}, {MODULES[0]: 3.0})
    ads += [zero, short]
    sim = compute_similarity_matrix(ads)
    n = len(ads)
    assert isinstance(sim, SimilarityMatrix) and sim.matrix.shape == (n, n)
    assert set(sim.modules) == set(MODULES) and sim.names == [f"task_{i}" for i in range(n)]
    for i in range(n):
        for j in range(n):
            ref = dense_cos(flat(ads[i]), flat(ads[j]))
            assert float(sim.matrix[i, j]) == pytest.approx(ref, abs=1e-12)
            for m in MODULES:
                assert float(sim.modules[m][i, j]) == pytest.approx(
                    dense_cos(flat(ads[i], [m]), flat(ads[j], [m])), abs=1e-12)
    assert float(sim.matrix[n - 2].abs().max()) == 0  # the zero adapter is similar to nothing
    assert float(sim.modules[MODULES[0]][0, n - 1]) == pytest.approx(1.0)  # same dW, other scale


def test_adapters_can_be_given_as_folders(tmp_path):
    ads = planted(3, noise=0.3)
    for name, a in zip("xyz", ads):
        save_adapter(a, tmp_path / name)
    sim = compute_similarity_matrix([tmp_path / n for n in "xyz"])
    assert sim.names == ["x", "y", "z"]
    torch.testing.assert_close(sim.matrix, compute_similarity_matrix(ads).matrix)
    assert adapter_diff(tmp_path / "x", ads[0]).overall.relative < 1e-14


def test_folders_of_one_name_get_distinct_names(tmp_path):
    ads = planted(4, noise=0.3)
    paths = [tmp_path / "a" / "ad", tmp_path / "b" / "ad", tmp_path / "c" / "x" / "ad", tmp_path / "u"]
    for p, a in zip(paths, ads):
        save_adapter(a, p)
    names = compute_similarity_matrix(paths + [ads[0]]).names
    assert names == ["a/ad", "b/ad", "x/ad", "u", "task_4"]


def test_similarity_is_gauge_invariant():
    ads = families()
    a, b = compute_similarity_matrix(ads), compute_similarity_matrix(gauged(ads))
    torch.testing.assert_close(a.matrix, b.matrix, atol=1e-10, rtol=0)
    for m in MODULES:
        torch.testing.assert_close(a.modules[m], b.modules[m], atol=1e-10, rtol=0)


# ------------------------------------------------------------------------ clusters
def test_clusters_recover_the_planted_families():
    sim = compute_similarity_matrix(families())
    truth = {frozenset({0, 1, 2}), frozenset({3, 4, 5, 6}), frozenset({7, 8})}
    assert partition(find_clusters(sim, n_clusters=3)) == truth
    assert partition(find_clusters(sim, threshold=0.5)) == truth
    assert find_clusters(sim, threshold=1.01) == list(range(9))  # nothing is that similar
    assert find_clusters(sim, n_clusters=1) == [0] * 9
    gauge_free = compute_similarity_matrix(gauged(families()))
    assert partition(find_clusters(gauge_free, n_clusters=3)) == truth


@pytest.mark.parametrize("seed", range(4))
def test_clusters_do_not_depend_on_input_order(seed):
    ads = families()
    perm = torch.randperm(len(ads), generator=torch.Generator().manual_seed(seed)).tolist()
    base = compute_similarity_matrix(ads)
    moved = compute_similarity_matrix([ads[i] for i in perm])
    for kw in ({"n_clusters": 3}, {"n_clusters": 5}, {"threshold": 0.5}, {"threshold": 0.2}):
        assert partition(find_clusters(moved, **kw), perm) == partition(find_clusters(base, **kw))
    # a generic similarity matrix (no structure, no ties) too, at every number of clusters
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(12, 5, generator=g, dtype=F64), dim=1)
    s, perm = x @ x.T, torch.randperm(12, generator=g).tolist()
    for k in range(1, 13):
        assert (partition(find_clusters(s[perm][:, perm], n_clusters=k), perm)
                == partition(find_clusters(s, n_clusters=k)))


def test_clusters_match_scipy_average_linkage():
    hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
    distance = pytest.importorskip("scipy.spatial.distance")
    x = torch.randn(15, 6, generator=torch.Generator().manual_seed(0), dtype=F64)
    s = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(x, dim=1).T
    d = (1 - s).numpy()
    d[range(15), range(15)] = 0
    link = hierarchy.linkage(distance.squareform(d, checks=False), method="average")
    for k in (2, 4, 7):
        ref = hierarchy.fcluster(link, k, criterion="maxclust")
        assert partition(find_clusters(s, n_clusters=k)) == partition(ref.tolist())
    for t in (0.3, 0.6, 0.9):
        ref = hierarchy.fcluster(link, 1 - t, criterion="distance")
        assert partition(find_clusters(s, threshold=t)) == partition(ref.tolist())


def test_cluster_arguments_are_checked():
    s = torch.eye(3, dtype=F64)
    for kw in ({}, {"threshold": 0.5, "n_clusters": 2}, {"n_clusters": 4}, {"n_clusters": 0}):
        with pytest.raises(ValueError):
            find_clusters(s, **kw)
    with pytest.raises(ValueError, match="square"):
        find_clusters(torch.ones(2, 3), n_clusters=1)
    with pytest.raises(ValueError, match="symmetric"):
        find_clusters(torch.tensor([[1.0, 0.2], [0.5, 1.0]]), n_clusters=1)


# ------------------------------------------------------------------------ outliers
def test_outliers_are_the_adapters_unlike_the_rest():
    ads = families((7, 1), noise=0.3)
    found = find_outliers(ads)
    assert list(found) == [7] and found[7] < -2
    assert find_outliers(gauged(ads)) == pytest.approx(found, rel=1e-6)
    sim = compute_similarity_matrix(ads)
    assert find_outliers(sim) == found and find_outliers(sim.matrix) == found
    assert find_outliers(families((6,))) == {}
    assert find_outliers(ads[:2]) == {}  # too few to tell


def test_outlier_scores_are_robust_median_mad_scores():
    ads = families((5, 2))
    s = compute_similarity_matrix(ads).matrix
    n = len(ads)
    mean = sorted((float(s[i].sum()) - float(s[i, i])) / (n - 1) for i in range(n))
    mean_of = [(float(s[i].sum()) - float(s[i, i])) / (n - 1) for i in range(n)]
    med = mean[(n - 1) // 2]
    mad = sorted(abs(x - med) for x in mean)[(n - 1) // 2]
    found = find_outliers(ads, z=0.0)
    assert found  # the pair of the small family scores below the median
    for i, score in found.items():
        assert score == pytest.approx((mean_of[i] - med) / max(1.4826 * mad, 0.02))
    assert list(found.values()) == sorted(found.values())


def test_one_adapter_far_from_a_tight_cluster_is_the_outlier():
    ads = families((8, 1), noise=0.1)
    found = find_outliers(ads)
    assert list(found) == [8] and found[8] < -3.5


def test_unrelated_adapters_are_not_outliers():
    # three unrelated adapters: a z-score over their three mean cosines called one an
    # outlier at z = -29696.9; too few to call anything
    assert find_outliers(families((1, 1, 1))) == {}
    assert find_outliers(families((1, 1, 1)), z=0.0) == {}
    # many unrelated adapters: their mean cosines differ by noise only
    assert find_outliers(families((1,) * 7)) == {}
    # two of eight unlike the rest stay outliers (the median ignores them)
    found = find_outliers(families((6, 1, 1), noise=0.1))
    assert sorted(found) == [6, 7]


# ------------------------------------------------------------------------ diff
def test_diff_matches_dense_and_keeps_tiny_differences():
    a, b = planted(2, noise=0.3, dtype=F64)
    d = adapter_diff(a, b)
    for m in MODULES:
        x, y = a.delta_weight(m), b.delta_weight(m)
        st = d.modules[m]
        assert st.relative == pytest.approx(float((x - y).norm() / x.norm()), rel=1e-10)
        assert st.cosine == pytest.approx(dense_cos(x.flatten(), y.flatten()), abs=1e-12)
        assert (st.norm_a, st.norm_b) == pytest.approx((float(x.norm()), float(y.norm())))
    assert d.overall.relative == pytest.approx(float((flat(a) - flat(b)).norm() / flat(a).norm()))
    # a 1e-10 perturbation: ||a||^2 + ||b||^2 - 2<a, b> would have lost every digit of it
    near = LoRAWeights(MODULES, dict(a.lora_a), {m: a.lora_b[m] * (1 + 1e-10) for m in MODULES},
                       dict(a.scales))
    assert adapter_diff(a, near).overall.relative == pytest.approx(1e-10, rel=1e-4)


def test_diff_is_gauge_invariant():
    a, b = planted(2, noise=0.3, dtype=F64)
    d1, d2 = adapter_diff(a, b), adapter_diff(regauge(a, 4), regauge(b, 5))
    for m in MODULES:
        assert astuple(d1.modules[m]) == pytest.approx(astuple(d2.modules[m]), rel=1e-9)
    same = adapter_diff(a, regauge(a, 6))
    assert same.overall.relative < 1e-12 and same.overall.cosine == pytest.approx(1.0)


def test_diff_with_missing_modules_and_bad_shapes():
    a, b = planted(2, dtype=F64)
    short = LoRAWeights(MODULES[:2], {m: b.lora_a[m] for m in MODULES[:2]},
                        {m: b.lora_b[m] for m in MODULES[:2]}, dict(b.scales))
    d = adapter_diff(a, short)
    assert astuple(d.modules[MODULES[2]])[:2] == (pytest.approx(1.0), 0.0)
    assert adapter_diff(short, a).modules[MODULES[2]].relative == math.inf
    (odd,) = planted(1, d_in=16, modules=[MODULES[0]])
    with pytest.raises(IncompatibleAdaptersError, match="layer.0.q"):
        adapter_diff(a, odd)


# ------------------------------------------------------------------------ coverage
def projectors(sub, m):
    """Orthogonal projectors onto span(U) and span(V), whether or not U, V are orthonormal."""
    bases = (sub.modules[m].U.to(F64), sub.modules[m].V.to(F64))
    return tuple(x @ torch.linalg.pinv(x) for x in bases)


def test_coverage_matches_dense_and_the_projection():
    ads = planted(6, noise=0.3, dtype=F64)
    sub = SharedSubspace.from_adapters(ads[:5], task_ids=list("abcde"), num_components=(5, 4))
    new = ads[5]
    cov = subspace_coverage(new, sub)
    kept = total = 0.0
    for m in MODULES:
        pu, pv = projectors(sub, m)
        x = new.delta_weight(m)
        k, t = float((pu @ x @ pv).square().sum()), float(x.square().sum())
        assert cov.modules[m] == pytest.approx(k / t, rel=1e-9)
        u, v = sub.modules[m].U.to(F64), sub.modules[m].V.to(F64)  # float32, orthonormal to 1e-7
        assert cov.modules[m] == pytest.approx(float((u.T @ x @ v).square().sum()) / t, rel=1e-6)
        kept, total = kept + k, total + t
    assert cov.overall == pytest.approx(kept / total, rel=1e-9)
    assert cov.overall == pytest.approx(sub.project(new, "x").coverage, rel=1e-5)
    assert 0 < cov.overall < 1
    assert subspace_coverage(regauge(new, 2), sub).modules == pytest.approx(cov.modules, rel=1e-9)


def test_coverage_against_quantized_bases_uses_their_span():
    ads = planted(6, noise=0.3, dtype=F64)
    sub = SharedSubspace.from_adapters(ads[:5], task_ids=list("abcde"), num_components=(5, 4))
    sub.quantize(bits=4)
    cov = subspace_coverage(ads[5], sub)
    for m in MODULES:
        pu, pv = projectors(sub, m)
        x = ads[5].delta_weight(m)
        ref = float((pu @ x @ pv).square().sum() / x.square().sum())
        assert cov.modules[m] == pytest.approx(ref, rel=1e-9)


def test_coverage_of_modules_outside_the_subspace():
    ads = planted(3, dtype=F64)
    sub = SharedSubspace.from_adapters([LoRAWeights(MODULES[:2], a.lora_a, a.lora_b, a.scales)
                                        for a in ads], task_ids=list("abc"))
    with pytest.warns(UserWarning, match="not in the subspace"):
        cov = subspace_coverage(ads[0], sub)
    assert cov.modules[MODULES[2]] == 0 and cov.modules[MODULES[0]] == pytest.approx(1.0)
    (odd,) = planted(1, d_out=24, modules=[MODULES[0]])
    with pytest.raises(IncompatibleAdaptersError, match="layer.0.q"):
        subspace_coverage(odd, sub)


# ------------------------------------------------------------------------ shared spectrum
@pytest.mark.parametrize("weighting", ["task", "energy"])
def test_shared_spectrum_matches_dense_stack(weighting):
    ads = planted(4, dim=5, noise=0.0, dtype=F64) + planted(2, dim=3, noise=0.2, dtype=F64, seed=9)
    spec = shared_spectrum(ads, weighting)
    norms = [sum(float(a.delta_weight(m).square().sum()) for m in MODULES) for a in ads]
    ws = [1 / n if weighting == "task" else 1.0 for n in norms]
    for m in MODULES:
        for side, kept in ((0, spec[m].kept_out), (1, spec[m].kept_in)):
            grams = [a.delta_weight(m) for a in ads]
            grams = [x @ x.T if side == 0 else x.T @ x for x in grams]
            ev = torch.linalg.eigvalsh(sum(w * g for w, g in zip(ws, grams))).flip(0).clamp_min(0)
            ref = torch.cumsum(ev, 0) / ev.sum()
            torch.testing.assert_close(kept, ref[:kept.numel()], atol=1e-10, rtol=0)
            assert float(kept[-1]) == pytest.approx(1.0, abs=1e-10)
    again = shared_spectrum(gauged(ads), weighting)
    for m in MODULES:
        torch.testing.assert_close(again[m].kept_out, spec[m].kept_out, atol=1e-10, rtol=0)
        torch.testing.assert_close(again[m].kept_in, spec[m].kept_in, atol=1e-10, rtol=0)


def test_shared_spectrum_of_planted_subspace_stops_at_its_dimension():
    spec = shared_spectrum(planted(5, dim=6, dtype=F64))
    assert all(s.kept_out.numel() == 6 and s.kept_in.numel() == 6 for s in spec.values())
    with pytest.raises(ValueError, match="weighting"):
        shared_spectrum(planted(2), "uniform")
