"""SharedSubspace: the properties DESIGN.md section 3 promises, on planted synthetic adapters."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from synthetic import MODULES, dense_error, planted, regauge, saved
from vlora import IncompatibleAdaptersError, LoRAWeights, SharedSubspace, SubspaceError

F64 = torch.float64


def projector(x: torch.Tensor) -> torch.Tensor:
    x = x.to(F64)
    return x @ x.T


def ids(n, prefix="t"):
    return [f"{prefix}{i}" for i in range(n)]


def test_planted_adapters_are_reconstructed_exactly():
    ads = planted(10)
    sub = SharedSubspace.from_adapters(ads, task_ids=ids(10))
    assert all(b.k_out == 6 and b.k_in == 6 for b in sub.modules.values())  # capped at the rank
    for t, a in zip(sub.tasks, ads):
        assert sub.task_error(t) < 1e-5
        assert dense_error(a, sub.reconstruct(t, torch.float64)) < 1e-5


def test_reported_error_equals_dense_error():
    ads = planted(8, noise=0.3)
    sub = SharedSubspace.from_adapters(ads, task_ids=ids(8), num_components=(4, 3))
    for t, a in zip(sub.tasks, ads):
        rec = sub.reconstruct(t, torch.float64)
        assert sub.task_error(t) == pytest.approx(dense_error(a, rec), rel=1e-5)
        for m, e in sub.get_task(t).module_errors().items():
            dense = float((a.delta_weight(m) - rec.delta_weight(m)).norm() / a.delta_weight(m).norm())
            assert e == pytest.approx(dense, rel=1e-5)
        assert 0 < sub.get_task(t).coverage < 1


def test_gauge_invariance_of_bases_errors_and_reconstructions():
    ads = planted(6, noise=0.2, dtype=torch.float64)  # so the regauged copy is exact
    other = [regauge(a, seed=i) for i, a in enumerate(ads)]
    s1 = SharedSubspace.from_adapters(ads, task_ids=ids(6), num_components=4)
    s2 = SharedSubspace.from_adapters(other, task_ids=ids(6), num_components=4)
    for m in MODULES:
        torch.testing.assert_close(projector(s1.modules[m].U), projector(s2.modules[m].U), atol=1e-5, rtol=0)
        torch.testing.assert_close(projector(s1.modules[m].V), projector(s2.modules[m].V), atol=1e-5, rtol=0)
    for t in s1.tasks:
        assert s1.task_error(t) == pytest.approx(s2.task_error(t), rel=1e-5)
        r1, r2 = s1.reconstruct(t, F64), s2.reconstruct(t, F64)
        for m in MODULES:
            torch.testing.assert_close(r1.delta_weight(m), r2.delta_weight(m), atol=1e-5, rtol=0)
    # projecting a regauged adapter gives the same core, error and coverage
    p1, p2 = s1.project(ads[0], "x"), s1.project(other[0], "x")
    assert p1.error == pytest.approx(p2.error, rel=1e-6)
    for m in MODULES:
        torch.testing.assert_close(p1.coords_b[m].double() @ p1.coords_a[m].double().T,
                                   p2.coords_b[m].double() @ p2.coords_a[m].double().T,
                                   atol=1e-5, rtol=0)


def test_weighting_makes_each_task_count_equally():
    ads = planted(6, noise=0.5)
    big = LoRAWeights(ads[0].layer_names, ads[0].lora_a, {m: 100 * b for m, b in ads[0].lora_b.items()},
                      ads[0].scales)
    s_task = SharedSubspace.from_adapters([big, *ads[1:]], task_ids=ids(6), num_components=3)
    s_energy = SharedSubspace.from_adapters([big, *ads[1:]], task_ids=ids(6), num_components=3,
                                            weighting="energy")
    mean = lambda s: sum(s.task_error(t) for t in s.tasks[1:]) / 5  # noqa: E731
    assert mean(s_task) < mean(s_energy)  # the big adapter does not drown the others
    assert s_energy.task_error("t0") < s_task.task_error("t0")


def test_pseudo_rank_error_is_exact():
    ads = planted(5, noise=0.2)
    sub = SharedSubspace.from_adapters(ads, task_ids=ids(5), num_components=5, pseudo_rank=2)
    t = sub.get_task("t1")
    assert all(x.shape[1] == 2 for x in t.coords_b.values())
    assert t.error == pytest.approx(dense_error(ads[1], sub.reconstruct("t1", F64)), rel=1e-5)


def test_variance_threshold_and_budget_choose_k():
    ads = planted(8, dim=10, noise=0.05)
    sub = SharedSubspace.from_adapters(ads, task_ids=ids(8), variance_threshold=0.8)
    assert all(1 <= b.k_out <= 10 for b in sub.modules.values())
    budget = 8000
    sub_b = SharedSubspace.from_adapters(ads, task_ids=ids(8), budget=budget)
    stats = sub_b.compression_stats()
    assert stats["stored_bytes"] <= budget
    assert stats["stored_bytes"] > 0.7 * budget


def test_incremental_absorb_without_truncation_equals_full_refit_start():
    ads = planted(7, dim=8)  # stack rank 8 per side; 6 tasks of rank 4 span it all
    sub = SharedSubspace.from_adapters(ads[:6], task_ids=ids(6), refine_iters=0)
    report = sub.absorb_incremental(ads[6], "t6", grow=True)
    ref = SharedSubspace.from_adapters(ads, task_ids=ids(7), refine_iters=0)
    for m in MODULES:
        torch.testing.assert_close(projector(sub.modules[m].U), projector(ref.modules[m].U), atol=1e-5, rtol=0)
        torch.testing.assert_close(projector(sub.modules[m].V), projector(ref.modules[m].V), atol=1e-5, rtol=0)
    assert all(r.drift < 1e-5 for r in report.values())


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("method", ["absorb", "absorb_incremental"])
def test_absorb_reports_drift_and_a_true_bound(method, quantized):
    ads = planted(9, noise=0.4)
    sub = SharedSubspace.from_adapters(ads[:8], task_ids=ids(8), num_components=4)
    if quantized:  # old bases far from orthonormal: drift is still relative to ||dW^_old||
        sub.quantize(4, coordinates=True, exact_errors=False)
    before = {t: sub.reconstruct(t, F64) for t in sub.tasks}
    report = getattr(sub, method)(ads[8], "t8")
    assert set(report) == set(ids(8)) and "t8" in sub.tasks
    for i, t in enumerate(ids(8)):
        after = sub.reconstruct(t, F64)
        num = sum(float((before[t].delta_weight(m) - after.delta_weight(m)).norm() ** 2) for m in MODULES)
        den = sum(float(before[t].delta_weight(m).norm() ** 2) for m in MODULES)
        assert report[t].drift == pytest.approx(math.sqrt(num / den), rel=1e-4, abs=1e-6)
        true_error = dense_error(ads[i], after)
        assert report[t].after_is_bound  # the originals are not on disk here
        assert report[t].error_after >= true_error - 1e-6
        assert report[t].error_after <= report[t].error_before + report[t].drift + 1e-9
    assert max(r.drift for r in report.values()) > 0  # the basis did move, and it is reported


def test_absorb_uses_exact_error_when_original_is_on_disk(tmp_path):
    from vlora import load_adapter
    ads = planted(6, noise=0.4)
    paths = saved(ads, tmp_path)
    sub = SharedSubspace.from_adapters(paths[:5], num_components=3)
    report = sub.absorb(paths[5], "t5")
    for i in range(5):
        assert not report[f"t{i}"].after_is_bound
        exact = dense_error(load_adapter(paths[i]), sub.reconstruct(f"t{i}", F64))
        assert report[f"t{i}"].error_after == pytest.approx(exact, rel=1e-4)


def test_streaming_matches_batch_on_planted_data(tmp_path):
    from vlora import save_adapter
    ads = planted(20, dim=6)
    paths = []
    for i, a in enumerate(ads):
        save_adapter(a, tmp_path / f"a{i:02d}")
        paths.append(tmp_path / f"a{i:02d}")
    stream = SharedSubspace.from_adapters_streaming(paths, num_components=6, oversample=2, chunk_size=3)
    batch = SharedSubspace.from_adapters(paths, num_components=6, refine_iters=0)
    for m in MODULES:
        torch.testing.assert_close(projector(stream.modules[m].U), projector(batch.modules[m].U),
                                   atol=1e-4, rtol=0)
    for t in batch.tasks:
        assert stream.task_error(t) < 1e-4 and batch.task_error(t) < 1e-4


def test_save_load_round_trip_is_exact_and_deterministic(tmp_path):
    ads = planted(5, noise=0.2)
    sub = SharedSubspace.from_adapters(ads, task_ids=ids(5), num_components=3)
    sub.save(tmp_path / "s")
    loaded = SharedSubspace.load(tmp_path / "s")
    assert loaded.tasks == sub.tasks
    for m in MODULES:
        assert torch.equal(loaded.modules[m].U, sub.modules[m].U)
    for t in sub.tasks:
        assert loaded.task_error(t) == sub.task_error(t)
        for m in MODULES:
            assert torch.equal(loaded.get_task(t).coords_b[m], sub.get_task(t).coords_b[m])
    # same inputs, another thread count: byte-identical files
    old = torch.get_num_threads()
    torch.set_num_threads(1 if old > 1 else 2)
    try:
        again = SharedSubspace.from_adapters(ads, task_ids=ids(5), num_components=3)
    finally:
        torch.set_num_threads(old)
    again.save(tmp_path / "s2")
    for f in (tmp_path / "s").iterdir():
        if f.name != ".vlora.lock":
            assert f.read_bytes() == (tmp_path / "s2" / f.name).read_bytes(), f.name


def test_interrupted_save_leaves_previous_subspace(tmp_path, monkeypatch):
    import vlora.storage as storage
    ads = planted(4)
    sub = SharedSubspace.from_adapters(ads[:3], task_ids=ids(3))
    sub.save(tmp_path / "s")
    sub.add_task(sub.project(ads[3], "t3"))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the manifest")
    monkeypatch.setattr(storage, "atomic_write", crash)
    with pytest.raises(KeyboardInterrupt):
        sub.save(tmp_path / "s")
    assert SharedSubspace.load(tmp_path / "s").tasks == ids(3)


def test_corrupted_data_file_is_detected(tmp_path):
    sub = SharedSubspace.from_adapters(planted(3), task_ids=ids(3))
    sub.save(tmp_path / "s")
    coords = next((tmp_path / "s").glob("coords-*.safetensors"))
    blob = bytearray(coords.read_bytes())
    blob[-3] ^= 0xFF
    coords.write_bytes(bytes(blob))
    with pytest.raises(SubspaceError, match="checksum mismatch"):
        SharedSubspace.load(tmp_path / "s")


def test_modules_in_only_some_adapters():
    ads = planted(4)
    partial = LoRAWeights(MODULES[:2], {m: ads[3].lora_a[m] for m in MODULES[:2]},
                          {m: ads[3].lora_b[m] for m in MODULES[:2]}, dict(ads[3].scales))
    with pytest.raises(IncompatibleAdaptersError, match="layer.1.q missing in \\['t3'\\]"):
        SharedSubspace.from_adapters([*ads[:3], partial], task_ids=ids(4))
    with pytest.warns(UserWarning, match=r"skipping 1 module.*'t0': 1 of 3 \(layer\.1\.q\)"):
        skip = SharedSubspace.from_adapters([*ads[:3], partial], task_ids=ids(4), missing_modules="skip")
    assert list(skip.modules) == MODULES[:2]
    assert skip.task_error("t0") > 0.4 and skip.task_error("t3") < 1e-5  # layer.1.q lost in full
    zero = SharedSubspace.from_adapters([*ads[:3], partial], task_ids=ids(4), missing_modules="zero")
    assert zero.task_error("t3") < 1e-5
    assert "layer.1.q" not in zero.reconstruct("t3").lora_a


def test_task_management_and_bad_ids():
    ads = planted(3)
    sub = SharedSubspace.from_adapters(ads[:2], task_ids=ids(2))
    with pytest.raises(SubspaceError, match="already exists"):
        sub.add_task(sub.project(ads[2], "t0"))
    for bad in ("../evil", "a/b", "", "x\x00"):
        with pytest.raises(SubspaceError, match="invalid task id"):
            sub.project(ads[2], bad)
    with pytest.raises(KeyError, match="no task 'zz'"):
        sub.reconstruct("zz")
    sub.remove_task("t0")
    assert sub.tasks == ["t1"]
    with pytest.raises(ValueError, match="duplicate task ids"):
        SharedSubspace.from_adapters(ads[:2], task_ids=["a", "a"])
    wrong = planted(1, d_out=20)[0]
    with pytest.raises(IncompatibleAdaptersError, match="has shape"):
        sub.project(wrong, "w")


@pytest.mark.parametrize("bits", [None, 6])
def test_stored_bytes_are_every_tensor_the_files_hold_but_heads(tmp_path, bits):
    from safetensors.torch import load_file
    sub = SharedSubspace.from_adapters(planted(6, noise=0.3), task_ids=ids(6), budget=12000)
    if bits:
        sub.quantize(bits, coordinates=True)
    sub.save(tmp_path / "s")
    on_disk = sum(f.stat().st_size for f in (tmp_path / "s").iterdir() if not f.name.startswith("extras-"))
    stats = sub.compression_stats()
    assert on_disk == stats["stored_bytes"] <= 12000
    held = sum(x.numel() * x.element_size() for kind in ("bases", "coords")
               for f in (tmp_path / "s").glob(f"{kind}-*.safetensors") for x in load_file(f).values())
    assert held < on_disk  # headers and the manifest are counted too
    assert stats["overhead_bytes"] > 0
    if not bits:
        assert held <= 12000  # the budget counts them all too


def test_compression_stats_count_bytes_and_svd_baseline():
    ads = planted(6, noise=0.3)
    sub = SharedSubspace.from_adapters(ads, task_ids=ids(6), num_components=3)
    s = sub.compression_stats()
    b = sub.modules[MODULES[0]]
    # bases in float32, and their Grams (diagonal: the bases are their eigenvectors) in float64
    assert torch.equal(b.G_u, torch.diag(torch.diagonal(b.G_u)))
    assert s["modules"][MODULES[0]]["basis_bytes"] == 4 * (40 * b.k_out + 32 * b.k_in) + 8 * (b.k_out + b.k_in)
    assert s["original_bytes"] == 4 * 6 * 3 * 4 * (40 + 32)
    assert s["compression_ratio"] == pytest.approx(s["original_bytes"] / s["stored_bytes"])
    # the SVD baseline, recomputed densely for one task at the same bytes per task
    numbers = s["stored_bytes"] / 4 / 6
    spectra = {m: torch.linalg.svdvals(ads[0].delta_weight(m)) for m in MODULES}
    energy = sorted(((float(x) ** 2 / 72, m) for m in MODULES for x in spectra[m][:4]), reverse=True)
    kept = sum(e for e, _ in energy[: int(numbers // 72)]) * 72
    total = sum(float(spectra[m].square().sum()) for m in MODULES)
    assert s["svd_task_errors"]["t0"] == pytest.approx(math.sqrt(1 - kept / total), rel=1e-4)


def test_bad_in_memory_input_gets_our_errors_and_writes_nothing(tmp_path):
    from vlora import AdapterError
    ads = planted(3)
    with pytest.raises(ValueError, match="num_components"):
        SharedSubspace.from_adapters(ads, num_components=-1)
    nan = planted(1)[0]
    nan.lora_a[MODULES[0]][0, 0] = float("nan")
    with pytest.raises(AdapterError, match="NaN"):
        SharedSubspace.from_adapters([*ads, nan])
    sub = SharedSubspace.from_adapters(ads, num_components=3, missing_modules="zero")
    empty = LoRAWeights([], {}, {}, {}, {}, {})
    with pytest.raises(AdapterError, match="no LoRA modules"):
        sub.project(empty, "empty")
    sub.get_task(sub.tasks[0]).config["target_modules"] = {"q", "v"}  # a set: not JSON
    with pytest.raises(SubspaceError, match="not JSON"):
        sub.save(tmp_path / "s")
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").glob("*.safetensors"))


def test_a_removed_task_leaves_the_grams_that_weight_incremental_absorbs(tmp_path):
    ads = planted(5, noise=0.3)
    paths = saved(ads, tmp_path)
    for items in (paths, ads):  # originals at hand on disk, or only the coordinates
        sub = SharedSubspace.from_adapters(items, task_ids=ids(5), num_components=4)
        m = MODULES[0]
        b = sub.modules[m]

        assert torch.allclose(torch.diagonal(b.G_u), _gram_diag(sub, m, ads, range(5)), rtol=1e-6)
        before = torch.diagonal(b.G_u).clone()
        sub.remove_task(ids(5)[4])
        want, got = _gram_diag(sub, m, ads, range(4)), torch.diagonal(b.G_u)
        err, stale = float((got - want).norm() / want.norm()), float((before - want).norm() / want.norm())
        assert err < 1e-6 if items is paths else err < 0.6 * stale  # the part outside V is not at hand
        assert torch.equal(b.G_u, torch.diag(got))  # still diagonal: stored as k numbers
    # a task projected and added on its own never entered the Grams: removing it takes nothing
    sub.add_task(sub.project(ads[4], "late"))
    sub.save(tmp_path / "s")
    sub = SharedSubspace.load(tmp_path / "s")  # which tasks the Grams hold is kept on disk
    before = sub.modules[MODULES[0]].G_u.clone()
    assert [sub.get_task(t).gram_share for t in sub.tasks] == ["original"] * 4 + [None]
    sub.remove_task("late")
    assert torch.equal(sub.modules[MODULES[0]].G_u, before)
    # removed, added back (as a failed write-back does) and removed again: taken out once
    sub.add_task(sub.remove_task("t0"))
    once = sub.modules[MODULES[0]].G_u.clone()
    sub.remove_task("t0")
    assert torch.equal(sub.modules[MODULES[0]].G_u, once)


def test_grams_after_an_absorb_hold_stored_tasks_and_replacing_a_task_takes_it_out():
    ads = planted(5, noise=0.3)
    sub = SharedSubspace.from_adapters(ads[:4], task_ids=ids(4), num_components=4)
    sub.absorb(ads[4], "t4")  # refits on the old tasks' stored reconstructions
    assert [sub.get_task(t).gram_share for t in sub.tasks] == ["stored"] * 4 + ["original"]
    b = sub.modules[MODULES[0]]
    u = b.U.T.double()

    def share(t):  # what a stored task put in: w ||U^T dW^||^2 per axis, dW^ = U C V^T
        dw = sub.reconstruct(t, torch.float64).delta_weight(MODULES[0], torch.float64)
        return sub.get_task(t).weight * (u @ dw).square().sum(1)
    want = torch.diagonal(b.G_u) - share("t1")
    sub.remove_task("t1")
    assert torch.allclose(torch.diagonal(b.G_u), want.clamp_min(0), rtol=1e-5, atol=1e-9)
    want = torch.diagonal(b.G_u) - share("t2")
    sub.add_task(sub.project(ads[2], "t2"), replace=True)  # a new projection: not in the Grams
    assert torch.allclose(torch.diagonal(b.G_u), want.clamp_min(0), rtol=1e-5, atol=1e-9)
    assert sub.get_task("t2").gram_share is None


def _gram_diag(sub, m, ads, keep):
    """diag of ``U^T (sum_t w_t dW_t dW_t^T) U`` over the kept tasks (ids t0, t1, ...)."""
    u = sub.modules[m].U.T.double()
    return sum(sub.get_task(f"t{i}").weight * (u @ ads[i].delta_weight(m, torch.float64)).square().sum(1)
               for i in keep)


def test_adapters_of_different_base_models_are_warned_about():
    ads = planted(3)
    for a, name in zip(ads, ["/models/all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2",
                             "bert-base-uncased"]):
        a.config = dict(a.config, base_model_name_or_path=name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a local copy and the hub id are one model
        sub = SharedSubspace.from_adapters(ads[:2], task_ids=["a", "b"], num_components=2)
    with pytest.warns(UserWarning, match="different base models.*bert-base-uncased"):
        SharedSubspace.from_adapters(ads, task_ids=["a", "b", "c"], num_components=2)
    with pytest.warns(UserWarning, match="task 'c' and the subspace name different base models"):
        sub.project(ads[2], "c")


@pytest.mark.parametrize("bits", [4, 6])
def test_projecting_onto_quantized_bases_takes_the_best_coordinates_there(bits):
    ads = planted(5, dim=6, d_out=64, d_in=48, r=4, noise=0.1, seed=44)
    sub = SharedSubspace.from_adapters(ads, [f"t{i}" for i in range(5)], num_components=6)
    sub.quantize(bits)
    p = sub.project(ads[0], "again")
    lost = naive = total = 0.0
    for m, b in sub.modules.items():  # the least-squares core in the same (rounded) bases
        u, v = b.U.double(), b.V.double()
        dw = ads[0].delta_weight(m).double()
        best = torch.linalg.pinv(u) @ dw @ torch.linalg.pinv(v).T
        torch.testing.assert_close(p.coords_b[m].double() @ p.coords_a[m].double().T, best,
                                   atol=1e-5, rtol=1e-4)
        lost += float((dw - u @ best @ v.T).square().sum())
        naive += float((dw - u @ (u.T @ dw @ v) @ v.T).square().sum())  # U^T X: orthonormal only
        total += float(dw.square().sum())
    assert p.error == pytest.approx((lost / total) ** 0.5, rel=1e-4)
    assert p.error < (naive / total) ** 0.5


@pytest.mark.parametrize("call", [
    lambda ads: SharedSubspace.from_adapters(ads, list("abc"), num_components=2, pseudo_rank=-1),
    lambda ads: SharedSubspace.from_adapters(ads, list("abc"), num_components=2, pseudo_rank=0),
    lambda ads: SharedSubspace.from_adapters(ads, list("abc"), num_components=2).project(ads[0], "x",
                                                                                          pseudo_rank=-3),
    lambda ads: SharedSubspace.from_adapters(ads, list("abc"), num_components=2).reconstruct("a", rank=-1),
    lambda ads: SharedSubspace.from_adapters(ads, list("abc"), num_components=2).reconstruct("a", rank=1.5),
])
def test_ranks_must_be_positive_integers(call):
    with pytest.raises(ValueError, match="must be a positive integer"):
        call(planted(3))


def test_a_fit_over_different_base_models_warns_once_and_names_none():
    ads = planted(3)
    for a, name in zip(ads, ["m/one", "m/one", "m/two"]):
        a.config = dict(a.config, base_model_name_or_path=name)
    with pytest.warns(UserWarning, match="different base models") as seen:
        sub = SharedSubspace.from_adapters(ads, task_ids=["a", "b", "c"], num_components=2)
    assert len([w for w in seen if "different base models" in str(w.message)]) == 1
    assert sub.base_model is None
    agreeing = SharedSubspace.from_adapters(ads[:2], task_ids=["a", "b"], num_components=2)
    assert agreeing.base_model == "m/one"
