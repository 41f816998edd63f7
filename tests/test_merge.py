"""Merging (DESIGN.md section 5): dense references, gauge invariance, PEFT agreement, export."""

from __future__ import annotations

import math
import weakref

import pytest
import torch

from conftest import base_classifier
from synthetic import MODULES, planted, regauge
from vlora import (
    IncompatibleAdaptersError,
    LoRAWeights,
    SharedSubspace,
    VLoRAError,
    linalg,
    load_adapter,
    save_adapter,
)
from vlora.merge import (
    MergeResult,
    concat,
    dare_merge,
    dare_ties_merge,
    magnitude_prune_merge,
    merge_tasks,
    task_arithmetic,
    ties_merge,
)

F64 = torch.float64
FULL = 32  # min(d_out, d_in) of the planted adapters: a rank that truncates nothing
WEIGHTS = [1.0, 0.75, -0.5]  # exact in float32 too, so PEFT's float32 weight tensor is exact


@pytest.fixture(scope="module")
def ads() -> list[LoRAWeights]:
    """Three float64 adapters of one model with ranks 4, 6, 4 and different scales."""
    a, c = planted(2, noise=0.3, dtype=F64, seed=3)
    (b,) = planted(1, r=6, noise=0.3, dtype=F64, seed=4, scale=0.5)
    return [a, b, c]


# ------------------------------------------------------------ dense references on dW
def dense(adapters, m):
    return [a.delta_weight(m) for a in adapters]


def ref_trim(x, density):
    if density >= 1:
        return x
    k = int(density * x.numel())
    if k == 0:
        return torch.zeros_like(x)
    kth = x.abs().flatten().sort(descending=True).values[k - 1]
    return torch.where(x.abs() >= kth, x, torch.zeros_like(x))


def ref_ties(dws, ws, majority="total"):
    stack = torch.stack(dws)
    votes = stack.sum(0) if majority == "total" else stack.sign().sum(0)
    elected = torch.where(votes < 0, -1.0, 1.0).to(F64)
    agree = (stack.sign() == elected).to(F64)
    num = sum(w * x * g for x, g, w in zip(stack, agree, ws))
    return num / agree.sum(0).clamp_min(1)


def best_rank(x, r):
    u, s, vh = torch.linalg.svd(x)
    return (u[:, :r] * s[:r]) @ vh[:r]


def assert_delta(result, expected: dict, atol=1e-10):
    assert set(result.layer_names) == set(expected)
    for m, x in expected.items():
        torch.testing.assert_close(result.delta_weight(m), x, atol=atol, rtol=0)


def test_task_arithmetic_is_the_best_rank_r_weighted_sum(ads):
    out = task_arithmetic(ads, WEIGHTS, rank=3)
    merged = {m: sum(w * x for w, x in zip(WEIGHTS, dense(ads, m))) for m in MODULES}
    assert_delta(out, {m: best_rank(x, 3) for m, x in merged.items()})
    for m, x in merged.items():
        s = torch.linalg.svdvals(x)
        kept = float(s[:3].square().sum() / s.square().sum())
        assert out.module_kept_energy[m] == pytest.approx(kept)
        assert out.merged_norm_sq[m] == pytest.approx(float(x.square().sum()))
    total = sum(float(x.square().sum()) for x in merged.values())
    kept = sum(float(best_rank(x, 3).square().sum()) for x in merged.values())
    assert out.kept_energy == pytest.approx(kept / total)
    assert out.ranks() == {m: 3 for m in MODULES} and all(s == 1.0 for s in out.scales.values())
    assert task_arithmetic(ads).rank == 6  # default: the largest input rank


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("majority", ["total", "frequency"])
def test_ties_matches_dense_reference(ads, density, majority):
    out = ties_merge(ads, density, WEIGHTS, majority, rank=FULL)
    assert_delta(out, {m: ref_ties([ref_trim(x, density) for x in dense(ads, m)], WEIGHTS, majority)
                       for m in MODULES})
    assert out.kept_energy == pytest.approx(1.0)


@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_magnitude_prune_matches_dense_reference(ads, density):
    out = magnitude_prune_merge(ads, density, WEIGHTS, rank=FULL)
    assert_delta(out, {m: sum(w * ref_trim(x, density) for w, x in zip(WEIGHTS, dense(ads, m)))
                       for m in MODULES})


def ref_dare_masks(adapters, drop_rate, seed):
    """Masks in the documented order (module by module, adapter by adapter), own generator."""
    g = torch.Generator().manual_seed(seed)
    return {m: [torch.bernoulli(torch.full_like(x, 1 - drop_rate), generator=g)
                for x in dense(adapters, m)] for m in MODULES}


def test_dare_matches_dense_reference(ads):
    masks = ref_dare_masks(ads, 0.3, seed=11)
    out = dare_merge(ads, 0.3, WEIGHTS, seed=11, rank=FULL)
    assert_delta(out, {m: sum(w * x * k / 0.7 for w, x, k in zip(WEIGHTS, dense(ads, m), masks[m]))
                       for m in MODULES})
    dropped = 1 - float(torch.stack([k for ks in masks.values() for k in ks]).mean())
    assert dropped == pytest.approx(0.3, abs=0.02)
    ties = dare_ties_merge(ads, 0.3, WEIGHTS, seed=11, rank=FULL)
    assert_delta(ties, {m: ref_ties([x * k / 0.7 for x, k in zip(dense(ads, m), masks[m])], WEIGHTS)
                        for m in MODULES})


def test_dare_is_seeded_and_leaves_the_global_rng_alone(ads):
    state = torch.get_rng_state()
    a = dare_merge(ads, 0.5, seed=7)
    b = dare_merge(ads, 0.5, seed=7)
    c = dare_ties_merge(ads, 0.5, seed=8)
    other = dare_merge(ads, 0.5, seed=8)
    fresh = dare_merge(ads, 0.5)
    assert torch.equal(torch.get_rng_state(), state)
    for m in MODULES:
        assert torch.equal(a.lora_a[m], b.lora_a[m]) and torch.equal(a.lora_b[m], b.lora_b[m])
        assert not torch.allclose(a.delta_weight(m), other.delta_weight(m))
    replay = dare_merge(ads, 0.5, seed=fresh.info["seed"])
    assert_delta(replay, {m: fresh.delta_weight(m) for m in MODULES}, atol=0)
    assert c.info["seed"] == 8 and a.info["method"] == "dare"


def test_dare_with_zero_drop_rate_is_task_arithmetic(ads):
    full = {m: sum(w * x for w, x in zip(WEIGHTS, dense(ads, m))) for m in MODULES}
    assert_delta(dare_merge(ads, 0.0, WEIGHTS, seed=1, rank=FULL), full)


def test_concat_is_exact(ads):
    out = concat(ads, WEIGHTS)
    assert out.ranks() == {m: 14 for m in MODULES} and out.kept_energy == 1.0
    assert_delta(out, {m: sum(w * x for w, x in zip(WEIGHTS, dense(ads, m))) for m in MODULES},
                 atol=1e-13)
    for m in MODULES:  # A is carried over untouched, bit for bit
        assert torch.equal(out.lora_a[m][:4], ads[0].lora_a[m])


MERGES = {
    "task_arithmetic": lambda a: task_arithmetic(a, WEIGHTS, rank=3),
    "concat": lambda a: concat(a, WEIGHTS),
    "ties": lambda a: ties_merge(a, 0.4, WEIGHTS, rank=3),
    "ties_frequency": lambda a: ties_merge(a, 0.4, WEIGHTS, "frequency", rank=3),
    "magnitude_prune": lambda a: magnitude_prune_merge(a, 0.4, WEIGHTS, rank=3),
    "dare": lambda a: dare_merge(a, 0.4, WEIGHTS, seed=2, rank=3),
    "dare_ties": lambda a: dare_ties_merge(a, 0.4, WEIGHTS, seed=2, rank=3),
}


@pytest.mark.parametrize("name", list(MERGES))
def test_every_merge_is_gauge_invariant(ads, name):
    out = MERGES[name](ads)
    other = MERGES[name]([regauge(a, seed=i + 5) for i, a in enumerate(ads)])
    assert_delta(other, {m: out.delta_weight(m) for m in MODULES}, atol=1e-9)
    assert other.kept_energy == pytest.approx(out.kept_energy, abs=1e-12)


def test_merge_tasks_is_exact_on_cores(ads):
    sub = SharedSubspace.from_adapters(ads, task_ids=["a", "b", "c"], num_components=5)
    recon = [sub.reconstruct(t, F64) for t in sub.tasks]
    for rank in (2, 5):
        out = merge_tasks(sub, ["a", "b", "c"], WEIGHTS, rank=rank)
        ref = task_arithmetic(recon, WEIGHTS, rank=rank)
        assert_delta(out, {m: ref.delta_weight(m) for m in MODULES}, atol=1e-5)  # float32 bases
        assert out.kept_energy == pytest.approx(ref.kept_energy, rel=1e-6)
    # gauge invariance: the same subspace fitted on regauged adapters gives the same merge
    sub2 = SharedSubspace.from_adapters([regauge(a, seed=9) for a in ads], task_ids=["a", "b", "c"],
                                        num_components=5)
    out2 = merge_tasks(sub2, ["a", "b", "c"], WEIGHTS, rank=2)
    assert_delta(out2, {m: merge_tasks(sub, ["a", "b", "c"], WEIGHTS, rank=2).delta_weight(m)
                        for m in MODULES}, atol=1e-5)
    assert merge_tasks(sub, ["b"]).rank == 5  # capped at k; default rank is the task's, 6


@pytest.mark.parametrize("bits", [None, 6])
def test_merge_tasks_counts_private_parts(ads, bits):
    sub = SharedSubspace.from_adapters(ads, task_ids=["a", "b", "c"], num_components=2)
    if bits:
        sub.quantize(bits, coordinates=True)
    sub.set_private("a", ads[0], dict.fromkeys(MODULES, 2))
    sub.set_private("c", ads[2], {MODULES[0]: 1})
    recon = [sub.reconstruct(t, F64) for t in sub.tasks]
    out = merge_tasks(sub, ["a", "b", "c"], WEIGHTS, rank=6)
    ref = task_arithmetic(recon, WEIGHTS, rank=6)
    assert_delta(out, {m: ref.delta_weight(m) for m in MODULES}, atol=1e-5)


def test_merge_tasks_on_quantized_bases_is_still_exact(ads):
    sub = SharedSubspace.from_adapters(ads, task_ids=["a", "b", "c"], num_components=5)
    sub.quantize(bits=4)  # dequantized bases are no longer orthonormal
    recon = [sub.reconstruct(t, F64) for t in sub.tasks]
    for rank in (3, 10):
        out = merge_tasks(sub, ["a", "b", "c"], WEIGHTS, rank=rank)
        ref = task_arithmetic(recon, WEIGHTS, rank=rank)
        assert_delta(out, {m: ref.delta_weight(m) for m in MODULES}, atol=1e-5)
        assert out.kept_energy == pytest.approx(ref.kept_energy, rel=1e-6)


def test_missing_modules_count_as_zero_with_a_warning(ads):
    short = LoRAWeights(MODULES[:2], {m: ads[0].lora_a[m] for m in MODULES[:2]},
                        {m: ads[0].lora_b[m] for m in MODULES[:2]}, dict(ads[0].scales))
    with pytest.warns(UserWarning, match="missing from some adapters"):
        out = task_arithmetic([short, ads[1]], [1.0, 2.0], rank=FULL)
    assert_delta(out, {m: (short.delta_weight(m) if m in short.lora_a else 0)
                       + 2 * ads[1].delta_weight(m) for m in MODULES})
    assert any("missing" in n for n in out.notes)


def test_different_shapes_are_refused_naming_the_module(ads):
    (odd,) = planted(1, d_out=24, seed=5, modules=[MODULES[1]])
    with pytest.raises(IncompatibleAdaptersError, match=MODULES[1].replace(".", r"\.")):
        ties_merge([ads[0], odd])


@pytest.mark.parametrize("merge", [
    lambda a, **kw: ties_merge(a, 0.3, **kw), lambda a, **kw: magnitude_prune_merge(a, 0.3, **kw),
    lambda a, **kw: dare_merge(a, 0.3, seed=0, **kw), lambda a, **kw: dare_ties_merge(a, 0.3, seed=0, **kw),
])
def test_dense_merges_hold_one_dense_dw_at_a_time(ads, monkeypatch, merge):
    """Memory per module does not grow with the number of adapters: when a dW_t is formed,
    at most one earlier one is still alive (the last, about to be replaced)."""
    many = ads + planted(3, noise=0.3, dtype=F64, seed=7)
    want = merge(many)
    alive, most = [], [0]
    plain = LoRAWeights.delta_weight

    def counted(self, module, dtype=F64):
        most[0] = max(most[0], sum(r() is not None for r in alive))
        out = plain(self, module, dtype)
        alive.append(weakref.ref(out))
        return out

    monkeypatch.setattr(LoRAWeights, "delta_weight", counted)
    got = merge(many, progress=False)
    assert most[0] <= 1 and len(alive) >= len(many) * len(MODULES)
    assert_delta(got, {m: want.delta_weight(m) for m in MODULES}, atol=0)


def test_trim_keeps_exactly_its_share_when_magnitudes_tie():
    from vlora.merge import _trim

    x = torch.tensor([[3.0, -1.0, 1.0, 0.0], [1.0, -1.0, 0.0, 2.0]], dtype=F64)
    for density, k in ((0.5, 4), (0.25, 2), (0.875, 7), (0.1, 0)):
        keep = _trim(x, density)
        assert int(keep.sum()) == k
        if k:  # the largest magnitudes are kept
            assert float(x[keep].abs().min()) >= float(x[~keep].abs().max())


def test_merge_progress_is_one_bar_over_the_modules(ads, monkeypatch):
    from vlora import progress

    totals = []
    with progress.session():
        monkeypatch.setattr(progress._Bar, "stop", lambda bar: totals.append(
            (bar.progress.tasks[0].total, bar.progress.tasks[0].completed)))
        ties_merge(ads, 0.5, progress=True)
    assert totals[0] == (len(MODULES), len(MODULES))


@pytest.mark.parametrize("call", [
    lambda a: ties_merge(a, density=1.5), lambda a: magnitude_prune_merge(a, density=-0.1),
    lambda a: dare_merge(a, drop_rate=1.0), lambda a: ties_merge(a, majority="mean"),
    lambda a: task_arithmetic(a, rank=0), lambda a: concat(a, [1.0]), lambda a: task_arithmetic([]),
])
def test_bad_arguments_are_refused(ads, call):
    with pytest.raises(ValueError):
        call(ads)


# ------------------------------------------------------------------------ real PEFT
@pytest.fixture(scope="module")
def peft_trio(make_peft_adapter):
    """Three LoRA-only MiniLM adapters (PEFT refuses to merge modules_to_save): ranks 4, 8, 4,
    different alphas, one rslora (not first: PEFT's merged adapter inherits the first's
    use_rslora and then scales its own factors by sqrt(r) instead of 1)."""
    opts = [{"r": 4, "lora_alpha": 8}, {"r": 8, "lora_alpha": 4},
            {"r": 4, "lora_alpha": 16, "use_rslora": True}]
    with linalg.fixed_threads(1):
        return [make_peft_adapter(f"merge{i}", seed=10 + i, task_type=None, **o)[0]
                for i, o in enumerate(opts)]


def as_f64(adapter: LoRAWeights) -> LoRAWeights:
    return LoRAWeights(adapter.layer_names, {m: x.double() for m, x in adapter.lora_a.items()},
                       {m: x.double() for m, x in adapter.lora_b.items()}, adapter.scales,
                       adapter.extra, adapter.config)


@pytest.fixture(scope="module")
def peft_model(peft_trio, minilm_dir):
    from peft import PeftModel
    with linalg.fixed_threads(1):
        model = PeftModel.from_pretrained(base_classifier(minilm_dir), str(peft_trio[0]),
                                          adapter_name="a0")
        for i in (1, 2):
            model.load_adapter(str(peft_trio[i]), adapter_name=f"a{i}")
    # float64, so that magnitude trimming and sign election see the same numbers we do
    return model.double()


@pytest.mark.parametrize("combination, ours", [
    ("svd", lambda p: task_arithmetic(p, WEIGHTS)),
    ("ties_svd", lambda p: ties_merge(p, 0.3, WEIGHTS)),
    ("magnitude_prune_svd", lambda p: magnitude_prune_merge(p, 0.3, WEIGHTS)),
])
def test_agrees_with_peft_add_weighted_adapter(peft_trio, peft_model, combination, ours):
    kwargs = {} if combination == "svd" else {"density": 0.3}
    peft_model.add_weighted_adapter(["a0", "a1", "a2"], WEIGHTS, combination,
                                    combination_type=combination, **kwargs)
    exact = ours([as_f64(load_adapter(p)) for p in peft_trio])  # float64 factors out
    stored = ours(peft_trio)  # from the folders: float32 factors, like the inputs
    assert len(exact.layer_names) == 12 and exact.rank == 8  # PEFT's default: the largest rank
    for m in exact.layer_names:
        ref = peft_model.base_model.model.get_submodule(m).get_delta_weight(combination)
        torch.testing.assert_close(exact.delta_weight(m), ref, atol=1e-10, rtol=0)
        torch.testing.assert_close(stored.delta_weight(m), ref, atol=1e-7, rtol=0)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_draws_peft_masks_for_the_same_seed(peft_trio, method):
    """PEFT draws from the global RNG; seeded alike, our private generator gives its masks."""
    from peft.utils import merge_utils
    ads = [as_f64(load_adapter(p)) for p in peft_trio]
    with torch.random.fork_rng():
        torch.manual_seed(21)
        ref = {m: getattr(merge_utils, method)(dense(ads, m), torch.tensor(WEIGHTS, dtype=F64), 0.6)
               for m in ads[0].layer_names}
    merge = dare_merge if method == "dare_linear" else dare_ties_merge
    assert_delta(merge(ads, 0.4, WEIGHTS, seed=21, rank=384), ref, atol=1e-9)


def test_saved_merge_loads_in_peft_with_averaged_heads(make_peft_adapter, minilm_dir, tmp_path):
    from peft import PeftModel
    (p1, _), (p2, _) = make_peft_adapter("head1", seed=1), make_peft_adapter("head2", seed=2, r=6)
    a1, a2 = load_adapter(p1), load_adapter(p2)
    assert a1.extra, "SEQ_CLS adapters carry a classifier head"
    out = ties_merge([p1, p2], 0.5, [1.0, 3.0])
    assert isinstance(out, MergeResult) and out.config["task_type"] == "SEQ_CLS"
    for k in a1.extra:
        torch.testing.assert_close(out.extra[k], (a1.extra[k] + 3 * a2.extra[k]) / 4)
    save_adapter(out, tmp_path / "merged")
    with linalg.fixed_threads(1):
        model = PeftModel.from_pretrained(base_classifier(minilm_dir, seed=5),
                                          str(tmp_path / "merged"))
    for m in out.layer_names:
        ref = model.base_model.model.get_submodule(m).get_delta_weight("default").double()
        torch.testing.assert_close(ref, out.delta_weight(m), atol=1e-6, rtol=0)
    head = model.base_model.model.classifier.modules_to_save["default"]
    torch.testing.assert_close(head.weight, out.extra["classifier.weight"])


def test_heads_that_cannot_be_averaged_are_left_out(make_peft_adapter):
    (p1, _), (p2, _) = make_peft_adapter("head1", seed=1), make_peft_adapter("head2", seed=2, r=6)
    a1, a2 = load_adapter(p1), load_adapter(p2)
    with pytest.warns(UserWarning, match="sum to 0"):
        out = task_arithmetic([a1, a2], [1.0, -1.0])
    assert out.extra == {} and any("left out" in n for n in out.notes)
    a2.extra = {k: v[:2] for k, v in a2.extra.items()}  # a head with other labels
    with pytest.warns(UserWarning, match="shapes"):
        out = concat([a1, a2])
    assert out.extra == {} and math.isclose(out.kept_energy, 1.0)


def test_weights_must_be_finite_and_the_result_storable(ads):
    with pytest.raises(ValueError, match="finite"):
        task_arithmetic(ads, [float("nan"), 1.0, 1.0])
    with pytest.raises(ValueError, match="finite"):
        concat(ads, [float("inf"), 1.0, 1.0])
    with pytest.raises(VLoRAError, match="cannot be stored"):  # overflows float32, not an inf file
        task_arithmetic(ads, [1e100, 1.0, 1.0])
