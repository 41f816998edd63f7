"""Quantized bases and coordinates: really stored small, errors exact against what is stored."""

import json
import math

import pytest
import torch

from synthetic import MODULES, dense_error, planted, regauge, saved
from vlora import SharedSubspace
from vlora.errors import SubspaceError
from vlora.quantize import dct_matrix, dequantize, pack, quantize, unpack
from vlora.task import TaskProjection


@pytest.mark.parametrize("bits,method,tol", [(8, "symmetric", 1 / 254), (6, "symmetric", 1 / 62),
                                              (5, "symmetric", 1 / 30), (4, "symmetric", 1 / 14),
                                              (4, "nf4", 0.16)])
def test_round_trip_error_is_within_half_a_step(bits, method, tol):
    x = torch.randn(100, 7, generator=torch.Generator().manual_seed(0))
    q = quantize(x, bits, method, block=32)
    assert q.codes.dtype == torch.uint8 and q.codes.numel() == 704 * bits // 8  # 700 values padded to 22 blocks of 32
    back = dequantize(q)
    assert back.shape == x.shape
    assert float((back - x).abs().max()) <= tol * float(x.abs().max()) + 1e-7


def test_the_dct_is_orthonormal_and_rounds_rows_that_shrink_more_finely():
    for n in (1, 2, 7, 77):
        d = dct_matrix(n)
        assert torch.allclose(d @ d.T, torch.eye(n, dtype=d.dtype), atol=1e-12)
    g = torch.Generator().manual_seed(0)
    # Coordinates in principal axes: row i of size ~ 0.93^i, so a block's scale is set by
    # its first rows. The DCT spreads them; rounding then loses less, and it is undone.
    x = torch.randn(77, 8, generator=g) * (0.93 ** torch.arange(77.0))[:, None]
    plain, dct = quantize(x, 6), quantize(x, 6, transform="dct")
    assert dct.transform == "dct" and dct.nbytes() == plain.nbytes()
    err = lambda q: float((dequantize(q) - x).norm() / x.norm())  # noqa: E731
    assert err(dct) < 0.8 * err(plain)
    assert err(quantize(x, 8, transform="dct")) < 0.3 * err(dct)  # undone: 4x finer steps
    with pytest.raises(ValueError, match="transform"):
        quantize(x, 6, transform="hadamard")
    for shape in ((0, 4), (3, 0), (1, 5)):  # a module at k = 0, a task at rank 0, k = 1
        assert dequantize(quantize(torch.ones(shape), 6, transform="dct")).shape == shape
    with torch.device("meta"):  # the cached matrix is made on the CPU, whatever the default
        dct_matrix(11).mul_(0)  # and handed out as a copy
    assert dct_matrix(11).device.type == "cpu" and dct_matrix(11).abs().sum() > 0


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
def test_codes_are_packed_little_endian_and_unpack_exactly(bits):
    codes = torch.randint(0, 2 ** bits, (96,), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    data = pack(codes, bits)
    assert data.dtype == torch.uint8 and data.numel() == 96 * bits // 8
    assert torch.equal(unpack(data, bits), codes)
    # bit i of the stream is bit (i mod bits) of code i // bits, lowest bits first
    stream = [(int(data[i // 8]) >> (i % 8)) & 1 for i in range(96 * bits)]
    assert all(stream[i] == (int(codes[i // bits]) >> (i % bits)) & 1 for i in range(96 * bits))
    if bits == 4:  # two codes per byte, the first in the low nibble
        assert torch.equal(data, codes[0::2] | (codes[1::2] << 4))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.zeros(4, 4), bits=3)
    with pytest.raises(ValueError, match="multiple of 8"):
        quantize(torch.zeros(4, 4), bits=5, block=12)
    with pytest.raises(ValueError, match="nf4"):
        quantize(torch.zeros(4, 4), bits=8, method="nf4")


@pytest.mark.parametrize("bits,method,coords", [(8, "symmetric", False), (4, "nf4", True),
                                                (6, "symmetric", True)])
def test_subspace_quantize_reports_exact_errors_and_saves_small(tmp_path, bits, method, coords):
    ads = planted(6, noise=0.3, d_out=256, d_in=192)  # big enough that bases dominate the file
    paths = saved(ads, tmp_path)
    sub = SharedSubspace.from_adapters(paths, num_components=4)
    sub.save(tmp_path / "float")
    before = {t: sub.reconstruct(t, torch.float64) for t in sub.tasks}
    report = sub.quantize(bits, method, coordinates=coords)
    for i, t in enumerate(sub.tasks):
        after = sub.reconstruct(t, torch.float64)
        assert report[t].drift == pytest.approx(dense_error(before[t], after), rel=1e-3, abs=1e-7)
        assert not report[t].after_is_bound  # originals are on disk
        assert report[t].error_after == pytest.approx(dense_error(ads[i], after), rel=1e-3)
        assert report[t].drift > 0
    sub.save(tmp_path / "q")
    size = lambda d: sum(f.stat().st_size for f in d.glob("bases-*"))  # noqa: E731
    assert size(tmp_path / "q") < 0.45 * size(tmp_path / "float")
    loaded = SharedSubspace.load(tmp_path / "q")
    for m in MODULES:
        assert torch.equal(loaded.modules[m].U, sub.modules[m].U)
    for t in sub.tasks:
        assert loaded.task_error(t) == sub.task_error(t)
        assert torch.equal(loaded.get_task(t).coords_b[MODULES[0]], sub.get_task(t).coords_b[MODULES[0]])
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    metas = [q for t in loaded.tasks for q in (loaded.get_task(t).quant or {}).values()]
    assert len(metas) == (2 * len(MODULES) * len(ads) if coords else 0)
    assert all(q.transform == "dct" for q in metas)  # coordinates only: bases gain nothing
    assert all(b.quant["U"].transform is None for b in loaded.modules.values())
    assert manifest["format_version"] == 5
    if coords:  # a transform this vlora does not know is refused, not read as another
        manifest["tasks"][0]["transform"] = "hadamard"
        (tmp_path / "q" / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(SubspaceError, match="bad quantization metadata"):
            SharedSubspace.load(tmp_path / "q")
    stats = loaded.compression_stats()
    assert stats["basis_bytes"] < sum(4 * (b.d_out * b.k_out + b.d_in * b.k_in)
                                      for b in loaded.modules.values()) / {8: 3.5, 6: 4.5, 4: 5}[bits]


def test_quantized_coordinates_do_not_depend_on_the_gauge():
    """Rounding acts on the stored core C, not on the factors the adapter came with:
    (B G, G^-1 A) quantizes to the same task, up to the 1e-5 by which the two float32
    fits differ. (Rounding the factors as given, an ill-conditioned G cost 590% to 1,400%
    dW error, against 4% here.)"""
    ads = planted(4, noise=0.3, d_out=96, d_in=64)
    subs = [SharedSubspace.from_adapters(group, num_components=4) for group in
            (ads, [regauge(a, seed=7) for a in ads])]
    reports = [s.quantize(6, coordinates=True) for s in subs]
    for t in subs[0].tasks:
        plain, gauged = (s.reconstruct(t, torch.float64) for s in subs)
        assert dense_error(plain, gauged) < 1e-4
        assert reports[0][t].drift > 1e-2  # the rounding itself is far larger than that
        assert reports[1][t].drift == pytest.approx(reports[0][t].drift, rel=1e-3)


def test_a_task_just_initialised_keeps_its_random_side_when_quantized():
    from vlora.training import orthogonal_init

    sub = SharedSubspace.from_adapters(planted(4), num_components=4)
    orthogonal_init(sub, "new", seed=0)
    sub.quantize(8, coordinates=True)
    task = sub.get_task("new")
    assert all(bool(task.coords_a[m].any()) and not task.coords_b[m].any() for m in MODULES)


def test_a_basis_that_stays_quantized_moves_no_task():
    # Re-expressing coordinates on a basis that is not orthonormal takes least squares:
    # U^T U != I there, and U^T U L moved every task by 6-9% per call.
    sub = SharedSubspace.from_adapters(planted(5, noise=0.05, seed=3)[:4], num_components=4)
    sub.quantize(4, coordinates=True)
    cores = {t: {m: sub.core(t, m).clone() for m in sub.modules} for t in sub.tasks}
    errors = {t: sub.get_task(t).error for t in sub.tasks}
    report = sub.quantize(4)  # the same grid: the same bases (coordinates not rounded again)
    assert max(r.drift for r in report.values()) < 1e-6
    zero = planted(5, noise=0.05, seed=3)[4]
    zero.lora_b = {m: torch.zeros_like(b) for m, b in zero.lora_b.items()}
    report = sub.absorb_incremental(zero, "zero")  # weight 0: every basis is kept
    assert max(r.drift for r in report.values()) < 1e-6
    for t in cores:
        assert sub.get_task(t).error == pytest.approx(errors[t], rel=1e-6)
        for m in sub.modules:
            assert torch.allclose(sub.core(t, m), cores[t][m], atol=1e-6)


def test_a_module_stored_at_rank_0_keeps_its_whole_error_when_bases_move():
    ads = planted(3, noise=0.05, seed=4)
    sub = SharedSubspace.from_adapters(ads[:2], num_components=3)
    sub.add_task(sub.project(ads[2], "low", pseudo_rank={m: (0 if m == MODULES[0] else 2) for m in sub.modules}))
    before = sub.get_task("low").module_errors()
    assert before[MODULES[0]] == pytest.approx(1.0)
    sub.quantize(8)
    after = sub.get_task("low")
    assert after.module_errors()[MODULES[0]] == pytest.approx(1.0)
    dense = dense_error(ads[2], sub.reconstruct("low"))
    assert after.error_is_bound and dense - 1e-9 <= after.error <= 1.01 * dense  # a bound, not below


def test_coverage_is_the_energy_the_reconstruction_holds_on_quantized_bases():
    ads = planted(4, noise=0.2, seed=6)
    sub = SharedSubspace.from_adapters(ads, num_components=3)
    t = sub.tasks[0]
    assert sub.task_coverage(t) == pytest.approx(sub.get_task(t).coverage, rel=1e-6)
    sub.quantize(4, coordinates=True)
    recon = sub.reconstruct(t, dtype=torch.float64)
    kept = sum(float(recon.delta_weight(m).square().sum()) for m in MODULES)
    total = sum(float(ads[0].delta_weight(m).double().square().sum()) for m in MODULES)
    assert sub.task_coverage(t) == pytest.approx(kept / total, rel=1e-6)


def test_an_exact_float_task_added_to_quantized_coordinates_is_rounded_like_the_others(tmp_path):
    # SubspaceTrainer.write_back (no expansion) stores its trained coordinates as they are:
    # a float task in a subspace that quantizes coordinates undid the format for it
    # (stored, and counted, at 32 bits) with nothing said.
    sub = SharedSubspace.from_adapters(planted(4, noise=0.1, seed=8), num_components=4)
    sub.quantize(6, coordinates=True)
    g = torch.Generator().manual_seed(0)
    cb = {m: torch.randn(b.k_out, 2, generator=g) for m, b in sub.modules.items()}
    ca = {m: torch.randn(b.k_in, 2, generator=g) for m, b in sub.modules.items()}
    exact = {m: (b.U.double() @ cb[m].double()) @ (b.V.double() @ ca[m].double()).T
             for m, b in sub.modules.items()}
    norm = {m: float(x.square().sum()) for m, x in exact.items()}
    sub.add_task(TaskProjection("trained", cb, ca, norm, {m: 0.0 for m in norm},
                                {m: torch.linalg.svdvals(x)[:2] for m, x in exact.items()}, 1.0))
    t = sub.get_task("trained")
    assert t.quant is not None and set(t.quant) == {f"{m}::{s}" for m in MODULES for s in "BA"}
    recon = sub.reconstruct("trained", torch.float64)
    lost = sum(float((exact[m] - recon.delta_weight(m)).square().sum()) for m in MODULES)
    assert t.error > 0 and not t.error_is_bound  # exact: the original is the float task
    assert t.error == pytest.approx(math.sqrt(lost / sum(norm.values())), rel=1e-4)
    sub.save(tmp_path / "q")
    loaded = SharedSubspace.load(tmp_path / "q").get_task("trained")
    assert loaded.quant is not None and loaded.error == t.error


def test_quantized_coordinates_on_a_basis_that_stays_are_not_rounded_again():
    # Since absorbs keep the format, every absorb re-rounded every task's coordinates,
    # even in modules whose bases did not move: three absorbs of a zero adapter moved the
    # old tasks by 4-6% each and raised their errors by 20-30%.
    sub = SharedSubspace.from_adapters(planted(5, noise=0.05, seed=3)[:4], num_components=4)
    sub.quantize(4, coordinates=True)
    cores = {t: {m: sub.core(t, m).clone() for m in sub.modules} for t in sub.tasks}
    errors = {t: sub.get_task(t).error for t in sub.tasks}
    zero = planted(5, noise=0.05, seed=3)[4]
    zero.lora_b = {m: torch.zeros_like(b) for m, b in zero.lora_b.items()}
    for i in range(3):  # weight 0: every basis is kept
        assert max(r.drift for r in sub.absorb_incremental(zero, f"zero{i}").values()) < 1e-6
    for t in cores:
        assert sub.get_task(t).error == pytest.approx(errors[t], rel=1e-6)
        assert sub.get_task(t).quant is not None
        for m in sub.modules:
            assert torch.equal(sub.core(t, m), cores[t][m])
