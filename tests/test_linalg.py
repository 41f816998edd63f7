"""The pure math module against dense references on small sizes (float64, tight tolerances)."""

import torch

from vlora import linalg

F64 = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_canonical_is_the_svd_of_dw():
    b, a = rand(30, 5, seed=1), rand(5, 20, seed=2)
    u, s, v = linalg.canonical(b, a, 0.7)
    dense = 0.7 * b @ a
    torch.testing.assert_close(u @ torch.diag(s) @ v.T, dense)
    torch.testing.assert_close(s, torch.linalg.svdvals(dense)[:5])
    torch.testing.assert_close(u.T @ u, torch.eye(5, dtype=F64))


def test_norm_and_inner_product_are_factored_exactly():
    b1, a1, b2, a2 = rand(30, 4, seed=1), rand(4, 20, seed=2), rand(30, 6, seed=3), rand(6, 20, seed=4)
    d1, d2 = 2.0 * b1 @ a1, 0.5 * b2 @ a2
    assert abs(linalg.frobenius_sq(b1, a1, 2.0) - float(d1.square().sum())) < 1e-9
    assert abs(linalg.inner(b1, a1, 2.0, b2, a2, 0.5) - float((d1 * d2).sum())) < 1e-9


def test_joint_r_measures_maps_in_two_bases_like_the_dense_difference():
    # Bases that overlap (shared columns: [a, b] is rank-deficient), are not orthonormal,
    # and (last case) have more columns together than rows.
    for d, k1, k2 in ((40, 6, 5), (40, 6, 6), (8, 6, 5)):
        u_old, v_old = rand(d, k1, seed=1), rand(d + 3, k1, seed=2)
        u_new = torch.cat([u_old[:, :3], rand(d, k2 - 3, seed=3)], 1)
        v_new = torch.cat([v_old[:, :2], rand(d + 3, k2 - 2, seed=4)], 1)
        x, y = rand(k1, k1, seed=5), rand(k2, k2, seed=6)
        (ru_old, ru_new), (rv_old, rv_new) = linalg.joint_r(u_old, u_new), linalg.joint_r(v_old, v_new)
        small = ru_old @ x @ rv_old.T - ru_new @ y @ rv_new.T
        dense = u_old @ x @ v_old.T - u_new @ y @ v_new.T
        assert abs(float(small.square().sum()) - float(dense.square().sum())) < 1e-9 * float(dense.square().sum())
    # A tiny difference keeps its digits: no |x|^2 - 2<x, y> + |y|^2 under it.
    u, v = torch.linalg.qr(rand(50, 8, seed=7))[0], torch.linalg.qr(rand(50, 8, seed=8))[0]
    x = rand(8, 8, seed=9)
    (ru, ru2), (rv, rv2) = linalg.joint_r(u, u), linalg.joint_r(v, v)
    eps = 1e-9 * rand(8, 8, seed=10)
    small = ru @ x @ rv.T - ru2 @ (x + eps) @ rv2.T
    assert abs(float(small.norm()) / float(eps.norm()) - 1) < 1e-3


def test_top_left_singular_matches_exact_svd_tall_and_wide():
    for blocks in ([rand(50, 4, seed=i) for i in range(5)],      # 20 columns <= 50 rows
                   [rand(12, 4, seed=i) for i in range(8)]):     # 32 columns > 12 rows: Gram
        stack = torch.cat(blocks, 1)
        u, s = linalg.top_left_singular(blocks, 6)
        uu, ss, _ = torch.linalg.svd(stack, full_matrices=False)
        torch.testing.assert_close(s, ss[:6])
        torch.testing.assert_close(u @ u.T, uu[:, :6] @ uu[:, :6].T, atol=1e-9, rtol=0)
        assert bool((u.abs().argmax(0) == (u * (u > 0)).argmax(0)).all())  # sign convention


def test_rank_cap_never_fills_null_space():
    blocks = [rand(40, 2, seed=0) @ rand(2, 3, seed=1)]  # rank 2
    u, s = linalg.top_left_singular(blocks, 10)
    assert u.shape == (40, 2)


def test_residual_is_subtraction_free_and_matches_dense():
    b, a = rand(30, 4, seed=1), rand(4, 20, seed=2)
    ut, st, vt = linalg.canonical(b, a)
    u = torch.linalg.qr(torch.cat([ut[:, :3], rand(30, 2, seed=5)], 1))[0]
    v = torch.linalg.qr(torch.cat([vt[:, :3], rand(20, 1, seed=6)], 1))[0]
    dense = b @ a
    ref = float((dense - u @ u.T @ dense @ v @ v.T).square().sum())
    assert abs(linalg.residual_sq(ut * st, vt, u, v) - ref) < 1e-9 * float(dense.square().sum())
    # a residual 1e-12 of the norm survives in float64, where 1 - captured/total would not
    tiny = u[:, :4] @ rand(4, 4, seed=9) @ v[:, :4].T + 1e-7 * rand(30, 20, seed=8)
    us, ss, vs = torch.linalg.svd(tiny, full_matrices=False)
    got = linalg.residual_sq(us * ss, vs.T, u[:, :4], v[:, :4])
    exact = float((tiny - u[:, :4] @ u[:, :4].T @ tiny @ v[:, :4] @ v[:, :4].T).square().sum())
    assert abs(got - exact) < 1e-6 * exact


def test_refinement_never_lowers_kept_energy():
    facs = [linalg.canonical(rand(30, 4, seed=i), rand(4, 25, seed=100 + i)) for i in range(6)]
    w = [1.0] * 6
    u0, _ = linalg.top_left_singular([ut * st for ut, st, _ in facs], 5)
    v0, _ = linalg.top_left_singular([vt * st for _, st, vt in facs], 5)
    u, v = linalg.refine_bases(facs, w, u0, v0, iters=20)
    assert linalg.objective(facs, w, u, v) >= linalg.objective(facs, w, u0, v0) - 1e-12


def test_refinement_in_the_tasks_span_is_the_refinement_in_full_coordinates():
    """Where N r < d the rounds run on the span of the tasks' factors (refine_bases);
    the rounds on the full coordinates (_refine) find the same bases."""
    facs = [linalg.canonical(rand(60, 3, seed=i), rand(3, 50, seed=200 + i)) for i in range(4)]
    w = [1.0, 2.0, 0.5, 1.0]
    u0, _ = linalg.top_left_singular([ut * st for ut, st, _ in facs], 4)
    v0, _ = linalg.top_left_singular([vt * st for _, st, vt in facs], 5)
    u, v = linalg.refine_bases(facs, w, u0, v0, iters=6)
    ur, vr = linalg._refine(facs, w, u0, v0, 6, linalg.REFINE_TOL)
    assert ur is not None  # a round was taken, so the comparison says something
    torch.testing.assert_close(u, linalg.fix_signs(ur), atol=1e-9, rtol=0)
    torch.testing.assert_close(v, linalg.fix_signs(vr), atol=1e-9, rtol=0)
    torch.testing.assert_close(u.T @ u, torch.eye(4, dtype=u.dtype), atol=1e-12, rtol=0)


def test_incremental_update_equals_batch_without_truncation():
    blocks = [rand(30, 3, seed=i) for i in range(4)]
    u, g = linalg.top_left_singular(blocks[:3])[0], None
    g = linalg.gram_in_basis(blocks[:3], u)
    u2, g2 = linalg.incremental_basis(u, g, blocks[3:], 12)
    ub, sb = linalg.top_left_singular(blocks, 12)
    torch.testing.assert_close(u2 @ u2.T, ub @ ub.T, atol=1e-9, rtol=0)
    torch.testing.assert_close(g2.diagonal(), sb.square())


def test_budget_allocation_is_greedy_and_within_budget():
    gains = {"a": torch.tensor([10.0, 5.0, 1.0]), "b": torch.tensor([8.0, 0.1])}
    costs = {"a": 2.0, "b": 1.0}
    ks = linalg.allocate_budget(gains, costs, 5.0)
    assert ks == {"a": 2, "b": 1}  # 2+2+1 = 5 bytes; b's 0.1 per byte loses to a's 2.5
    assert sum(ks[k] * costs[k] for k in ks) <= 5.0


def test_choose_k_threshold_and_cap():
    s = torch.tensor([3.0, 2.0, 1.0, 1e-9], dtype=F64)
    assert linalg.choose_k(s) == 3
    assert linalg.choose_k(s, threshold=0.9) == 2  # (9 + 4) / 14 = 0.93
    assert linalg.choose_k(s, k=10) == 3


# The subspace iteration (fast top-k) against the exact SVD. Sizes are picked so that
# subspace_budget() sends them down the fast path; each test checks that it did.

def planted(d, blocks, width, rank, noise, seed=0):
    """Blocks ``(d, width)`` whose stack has ``rank`` strong directions plus ``noise``."""
    base = torch.linalg.qr(rand(d, rank, seed=seed))[0]
    return [base @ rand(rank, width, seed=seed + 1 + i) + noise * rand(d, width, seed=seed + 500 + i)
            for i in range(blocks)]


def spectral(a, b):
    return float(torch.linalg.matrix_norm(a - b, ord=2))


def test_subspace_iteration_matches_exact_svd_with_a_gap():
    blocks, k = planted(600, 24, 16, 12, 0.05), 12
    x = torch.cat(blocks, 1)
    budget = linalg.subspace_budget(600, 384, k)
    assert budget > 0
    fast = linalg.subspace_left_singular(x, k, max_steps=budget)
    assert fast is not None
    u, s = linalg.top_left_singular(blocks, k)
    assert torch.equal(u, linalg.fix_signs(fast[0]))  # the fast path gave the answer
    uu, ss, _ = torch.linalg.svd(x, full_matrices=False)
    assert ss[k - 1] > 3 * ss[k]  # the planted gap the tolerances below rely on
    assert float((s - ss[:k]).abs().max()) <= 1e-10 * float(ss[0])
    assert spectral(u @ u.T, uu[:, :k] @ uu[:, :k].T) <= 1e-8
    torch.testing.assert_close(u.T @ u, torch.eye(k, dtype=F64), atol=1e-12, rtol=0)
    assert bool((s[:-1] >= s[1:]).all())
    assert bool((u.abs().argmax(0) == (u * (u > 0)).argmax(0)).all())  # sign convention
    # a warm start near the answer (a previous basis) converges to the same pairs
    near = uu[:, :k] + 1e-3 * rand(600, k, seed=7)
    uw, sw = linalg.top_left_singular(blocks, k, start=near)
    assert spectral(uw @ uw.T, uu[:, :k] @ uu[:, :k].T) <= 1e-8
    assert float((sw - ss[:k]).abs().max()) <= 1e-10 * float(ss[0])


def test_subspace_iteration_caps_q_at_the_numerical_rank():
    blocks, k = planted(800, 40, 16, 16, 0.0), 24  # stack of rank 16 < k
    x = torch.cat(blocks, 1)
    fast = linalg.subspace_left_singular(x, k, max_steps=linalg.subspace_budget(800, 640, k))
    assert fast is not None and fast[0].shape == (800, 16) and fast[1].shape == (16,)
    u, s = linalg.top_left_singular(blocks, k)
    assert torch.equal(u, linalg.fix_signs(fast[0]))
    uu, ss, _ = torch.linalg.svd(x, full_matrices=False)
    assert float((s - ss[:16]).abs().max()) <= 1e-10 * float(ss[0])
    assert spectral(u @ u.T, uu[:, :16] @ uu[:, :16].T) <= 1e-8
    assert float((x - u @ (u.T @ x)).norm()) <= 1e-10 * float(x.norm())  # no null-space filler


def test_subspace_iteration_without_a_gap_falls_back_to_exact(monkeypatch):
    d, m, k = 600, 384, 12
    left = torch.linalg.qr(rand(d, m, seed=1))[0]
    right = torch.linalg.qr(rand(m, m, seed=2))[0]
    x = (left * torch.arange(1, m + 1, dtype=F64) ** -0.5) @ right.T  # slow decay, no gap at k
    blocks = list(x.split(16, 1))
    steps, ritz = [], linalg._ritz
    monkeypatch.setattr(linalg, "_ritz", lambda *a: steps.append(1) or ritz(*a))
    budget = linalg.subspace_budget(d, m, k)
    assert linalg.subspace_left_singular(x, k, max_steps=budget) is None
    assert len(steps) <= 3 < budget  # it sees the slow rate and gives up early
    u, s = linalg.top_left_singular(blocks, k)
    uu, ss, _ = torch.linalg.svd(x, full_matrices=False)
    torch.testing.assert_close(s, ss[:k])
    assert spectral(u @ u.T, uu[:, :k] @ uu[:, :k].T) <= 1e-9


def test_refinement_through_the_fast_path_reaches_the_exact_objective(monkeypatch):
    ub, va = torch.linalg.qr(rand(600, 12, seed=1))[0], torch.linalg.qr(rand(600, 12, seed=2))[0]
    facs = [linalg.canonical(ub @ rand(12, 16, seed=10 + i) + 0.05 * rand(600, 16, seed=100 + i),
                             rand(16, 12, seed=200 + i) @ va.T + 0.05 * rand(16, 600, seed=300 + i))
            for i in range(24)]
    w = [1.0 / float(st.square().sum()) for _, st, _ in facs]
    sw = [c ** 0.5 for c in w]

    def fit(iters):
        u0, _ = linalg.top_left_singular([ut * (st * c) for (ut, st, _), c in zip(facs, sw)], 12)
        v0, _ = linalg.top_left_singular([vt * (st * c) for (_, st, vt), c in zip(facs, sw)], 12)
        u, v = linalg.refine_bases(facs, w, u0, v0, iters=iters)
        return linalg.objective(facs, w, u0, v0), linalg.objective(facs, w, u, v), u, v

    found, iterate = [], linalg.subspace_left_singular

    def recording(*args, **kwargs):
        found.append(iterate(*args, **kwargs))
        return found[-1]

    monkeypatch.setattr(linalg, "subspace_left_singular", recording)
    fast = {iters: fit(iters) for iters in (2, 10)}  # 2 rounds (the benchmarks'), converged
    assert len(found) >= 8 and all(f is not None for f in found)  # every stack took the fast path
    monkeypatch.setattr(linalg, "subspace_budget", lambda *a: 0)
    for iters, (start, got, u, v) in fast.items():
        _, exact, ue, ve = fit(iters)
        assert got > start  # refinement gained, and no accepted round lost energy
        assert abs(got - exact) <= 1e-12 * exact
        # at the converged maximum the objective is flat: rounds gaining 1e-15 (round-off)
        # are taken or not, and move the bases by ~1e-7 without changing the objective
        tol = 1e-8 if iters == 2 else 1e-6
        assert spectral(u @ u.T, ue @ ue.T) <= tol and spectral(v @ v.T, ve @ ve.T) <= tol


def test_rounding_gauge_keeps_the_core_in_one_gauge_whatever_the_input_gauge():
    lb, la = rand(12, 4, seed=3) @ rand(4, 6, seed=4), rand(9, 6, seed=5)  # core of rank 4
    g = rand(6, 6, seed=6) + 3 * torch.eye(6, dtype=F64)
    b1, a1 = linalg.rounding_gauge(lb, la)
    b2, a2 = linalg.rounding_gauge(lb @ g, la @ torch.linalg.inv(g).T)
    torch.testing.assert_close(b1 @ a1.T, lb @ la.T)
    torch.testing.assert_close((b1, a1), (b2, a2))  # the same factors, not just the same core
    assert b1.shape == lb.shape and a1.shape == la.shape
    assert torch.linalg.matrix_rank(b1) == torch.linalg.matrix_rank(a1) == 4
    zero_b = torch.zeros(12, 6, dtype=F64)
    assert linalg.rounding_gauge(zero_b, la)[1] is la  # a fresh task keeps its random side
