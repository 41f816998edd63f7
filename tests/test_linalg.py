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
