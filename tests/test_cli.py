"""The command line through click's runner: every command, its JSON, and its error paths."""

from __future__ import annotations

import json
import math
import unicodedata

import pytest
import torch
from click.testing import CliRunner

from synthetic import planted
from vlora import SharedSubspace, load_adapter, merge, save_adapter
from vlora.cli import cli


@pytest.fixture()
def adapters(tmp_path):
    paths = []
    for i, a in enumerate(planted(6, noise=0.3)):
        save_adapter(a, tmp_path / "ad" / f"task{i}")
        paths.append(str(tmp_path / "ad" / f"task{i}"))
    return paths


def run(*args, code=0):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def test_version():
    assert "vlora, version" in run("--version").output


def test_compress_info_export_round_trip(adapters, tmp_path):
    sub = tmp_path / "sub"
    out = run("compress", *adapters[:5], "-o", sub, "-k", "3").output
    assert "SVD at equal bytes" in out and "smaller" in out
    data = json.loads(run("info", sub, "--json").output)
    assert data["tasks"] == [f"task{i}" for i in range(5)] and data["k_out"] == [3, 3]
    assert data["per_task"]["task0"]["error"] == pytest.approx(
        SharedSubspace.load(sub).task_error("task0"))
    run("export", sub, "task1", "-o", tmp_path / "e1")
    exported = load_adapter(tmp_path / "e1")
    assert set(exported.ranks().values()) == {4}
    run("export", sub, "--all", "-o", tmp_path / "all", "--rank", "2", "--vllm")
    before = load_adapter(adapters[1]).sha256
    out = run("export", sub, "--all", "-o", tmp_path / "ad", code=2).output  # the originals' folder
    assert "holds an adapter already" in out and load_adapter(adapters[1]).sha256 == before
    run("export", sub, "task1", "-o", tmp_path / "e1", "--force")
    assert set(load_adapter(tmp_path / "all" / "task3").ranks().values()) == {2}


def test_compress_by_ratio_and_budget(adapters, tmp_path):
    data = json.loads(run("compress", *adapters, "-o", tmp_path / "r", "--ratio", "4", "--json").output)
    assert data["compression_ratio"] >= 4
    data = json.loads(run("compress", *adapters, "-o", tmp_path / "b", "--budget", "6KB", "--json").output)
    assert data["stored_bytes"] <= 6000


def test_compress_module_weights(adapters, tmp_path):
    plain = json.loads(run("compress", *adapters, "-o", tmp_path / "p", "--ratio", "3", "--json").output)
    data = json.loads(run("compress", *adapters, "-o", tmp_path / "w", "--ratio", "3", "--json",
                          "--module-weight", "layer.0.v=8", "--module-weight", "q=0.5").output)
    assert data["compression_ratio"] >= 3 and data["per_task"] != plain["per_task"]
    assert "given twice" in run("compress", *adapters, "-o", tmp_path / "t", "--ratio", "3",
                                "--module-weight", "q=2", "--module-weight", "q=3", code=2).output
    assert "KEY=W" in run("compress", *adapters, "-o", tmp_path / "x", "--ratio", "3",
                          "--module-weight", "v2", code=2).output
    assert "matches no module" in run("compress", *adapters, "-o", tmp_path / "y", "--ratio", "3",
                                      "--module-weight", "valeu=2", code=2).output
    assert "--budget or --ratio" in run("compress", *adapters, "-o", tmp_path / "z", "-k", "3",
                                        "--module-weight", "q=2", code=2).output


def test_compress_quantized_counts_the_quantized_bytes(adapters, tmp_path):
    data = json.loads(run("compress", *adapters, "-o", tmp_path / "q", "--ratio", "4", "--bits", "6",
                          "--json").output)
    assert data["compression_ratio"] >= 4
    assert all(b.quant for b in SharedSubspace.load(tmp_path / "q").modules.values())
    run("compress", *adapters, "-o", tmp_path / "x", "--bits", "3", code=2)


def test_add_remove_validate_diff(adapters, tmp_path):
    sub = tmp_path / "sub"
    run("compress", *adapters[:4], "-o", sub, "-k", "3", "-q")
    out = run("add", sub, adapters[4]).output
    assert "error before" in out and "task0" in out
    data = json.loads(run("add", sub, adapters[5], "--incremental", "--json").output)
    assert set(data["old_tasks"]["task5"]) == {f"task{i}" for i in range(5)}
    run("remove", sub, "task0")
    assert SharedSubspace.load(sub).tasks == [f"task{i}" for i in range(1, 6)]
    assert "OK" in run("validate", sub).output
    diff = json.loads(run("diff", sub, "task1", "task1", "--json").output)
    assert diff["total"]["relative_difference"] == 0 and diff["total"]["cosine"] == pytest.approx(1)


def test_validate_fails_on_corruption(adapters, tmp_path):
    sub = tmp_path / "sub"
    run("compress", *adapters[:3], "-o", sub, "-q")
    bases = next(sub.glob("bases-*.safetensors"))
    blob = bytearray(bases.read_bytes())
    blob[-1] ^= 0x55
    bases.write_bytes(bytes(blob))
    assert "checksum mismatch" in run("validate", sub, code=1).output


def test_validate_checks_the_stored_errors_against_the_coordinates(adapters, tmp_path):
    # residuals are in the checksummed coords file: one rewritten with its checksum fixed
    from safetensors.torch import load_file, save_file

    from benchmarks.fuzz import _fix_checksum
    sub = tmp_path / "sub"
    run("compress", *adapters[:3], "-o", sub, "-k", "2", "-q")  # k = 2: every task has an error
    coords = next(sub.glob("coords-*.safetensors"))
    tensors = load_file(coords)
    tensors["residual_sq"][0] = 0.0
    save_file(tensors, coords)
    _fix_checksum(sub, "coords")
    assert "the manifest's error is below what its coordinates allow" in run("validate", sub, code=1).output


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(fingerprint="0" * 16), "fingerprint does not match"),
    (lambda m: m["tasks"][0].update(weight="no"), "a finite number >= 0 expected"),
    (lambda m: m.update(generation="x"), "an integer >= 0 expected"),
])
def test_validate_checks_the_manifest_numbers_no_checksum_covers(adapters, tmp_path, edit, message):
    sub = tmp_path / "sub"
    run("compress", *adapters[:3], "-o", sub, "-k", "2", "-q")  # k = 2: every task has an error
    manifest = json.loads((sub / "manifest.json").read_text())
    edit(manifest)
    (sub / "manifest.json").write_text(json.dumps(manifest))
    assert message in run("validate", sub, code=1).output


def test_errors_are_one_line_with_exit_2(adapters, tmp_path):
    sub = tmp_path / "sub"
    run("compress", *adapters[:3], "-o", sub, "-q")
    r = run("export", sub, "nope", "-o", tmp_path / "x", code=2)
    assert r.output.strip() == "vlora: error: no task 'nope' in the subspace (3 tasks)"
    assert not (tmp_path / "x").exists()
    r = run("compress", adapters[0], adapters[0], "-o", tmp_path / "d", code=2)
    assert "duplicate task ids: ['task0']" in r.output
    r = run("compress", *adapters[:2], "-o", sub, code=2)  # refuses to overwrite
    assert "exists" in r.output
    run("compress", *adapters[:2], "-o", tmp_path / "z", "-k", "2", "--ratio", "3", code=2)
    (tmp_path / "notadapter").mkdir()
    r = run("add", sub, tmp_path / "notadapter", code=2)
    assert "not a LoRA adapter folder" in r.output
    assert SharedSubspace.load(sub).tasks == ["task0", "task1", "task2"]  # nothing lost


def test_analyze_merge_plot_benchmark(adapters, tmp_path):
    data = json.loads(run("analyze", *adapters, "--json", "--plot", tmp_path / "a.png").output)
    assert len(data["similarity"]) == 6 and data["similarity"][0][0] == pytest.approx(1.0)
    assert len(data["clusters"]) == 6 and (tmp_path / "a.png").stat().st_size > 10_000
    assert data["energy_kept_by_k"]["out"][-1] == pytest.approx(1.0)
    merged = json.loads(run("merge", *adapters[:2], "-o", tmp_path / "m", "--method", "ties",
                            "--density", "0.3", "--rank", "3", "--json").output)
    assert merged["rank"] == 3 and 0 < merged["kept_energy"] <= 1
    assert set(load_adapter(tmp_path / "m").ranks().values()) == {3}
    run("merge", *adapters[:2], "-o", tmp_path / "c", "--method", "cat", "-q")
    assert set(load_adapter(tmp_path / "c").ranks().values()) == {8}
    run("merge", *adapters[:2], "-o", tmp_path / "w", "--weights", "1,2,3", code=2)
    run("merge", *adapters[:2], "-o", tmp_path / "m", code=2)  # an adapter is there already
    before = load_adapter(adapters[0]).sha256
    run("merge", *adapters[:2], "-o", adapters[0], "--force", code=2)  # never onto an input
    assert load_adapter(adapters[0]).sha256 == before
    run("merge", *adapters[:2], "-o", tmp_path / "m", "--force", "-q")
    for method, option in (("cat", "--rank=3"), ("dare", "--density=0.1"), ("ties", "--seed=1"),
                           ("linear", "--drop-rate=0.2")):  # an option the method would ignore
        err = run("merge", *adapters[:2], "-o", tmp_path / "x", "--method", method, option, code=2).output
        assert f"not used by --method {method}" in err and not (tmp_path / "x").exists()
    sub = tmp_path / "sub"
    run("compress", *adapters, "-o", sub, "-k", "3", "-q")
    run("plot", sub, "-o", tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 10_000
    bench = json.loads(run("benchmark", sub, "--repeats", "2", "--json").output)
    assert set(bench["median_ms"]) >= {"load", "project one adapter", "absorb_incremental one adapter"}
    assert SharedSubspace.load(sub).tasks == [f"task{i}" for i in range(6)]  # benchmark changed nothing


def test_outputs_are_checked_before_anything_is_written(adapters, tmp_path):
    sub = tmp_path / "sub"
    run("compress", *adapters[:3], "-o", sub, "-k", "3")
    before = sorted(p.name for p in sub.iterdir())
    assert "subspace folder" in run("export", sub, "task0", "-o", sub, code=2).output
    assert "subspace folder" in run("merge", *adapters[:2], "-o", sub, code=2).output
    assert sorted(p.name for p in sub.iterdir()) == before
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "task1").write_text("a file")
    run("export", sub, "task0", "task1", "-o", tmp_path / "exp", code=2)
    assert not (tmp_path / "exp" / "task0").exists()  # nothing half-written
    assert "x>=1" in run("export", sub, "task0", "-o", tmp_path / "r", "--rank", "0", code=2).output
    for bad in ("1,nan", "1,inf", "1e308,1e308", "1,x"):
        assert "--weights" in run("merge", *adapters[:2], "-o", tmp_path / "m", "--weights", bad, code=2).output
    assert "seed" in run("merge", *adapters[:2], "-o", tmp_path / "m", "--method", "dare").output


def test_merge_writes_the_inputs_dtype(adapters, tmp_path):
    for i, p in enumerate(adapters[:2]):
        save_adapter(load_adapter(p), tmp_path / f"bf{i}", dtype=torch.bfloat16)
    bf = [tmp_path / "bf0", tmp_path / "bf1"]
    assert json.loads(run("merge", *bf, "-o", tmp_path / "m", "--json").output)["dtype"] == "bfloat16"
    assert {x.dtype for x in load_adapter(tmp_path / "m").lora_a.values()} == {torch.bfloat16}
    run("merge", *bf, "-o", tmp_path / "f", "--dtype", "float32", "-q")
    run("merge", bf[0], adapters[2], "-o", tmp_path / "mixed", "-q")  # float32 when they differ
    for name, want in (("f", torch.float32), ("mixed", torch.float32)):
        out = load_adapter(tmp_path / name)
        assert {x.dtype for x in out.lora_a.values()} == {want}


def test_quiet_keeps_warnings_and_their_filters_end_with_the_command(adapters, tmp_path):
    short = load_adapter(adapters[0])
    short = type(short)(short.layer_names[:1], {m: short.lora_a[m] for m in short.layer_names[:1]},
                        {m: short.lora_b[m] for m in short.layer_names[:1]}, short.scales)
    save_adapter(short, tmp_path / "short")
    args = ("merge", tmp_path / "short", adapters[1], "-o", tmp_path / "m", "--force")
    r = run(*args, "-q")  # a warning may be the only word of a loss: -q keeps it
    assert r.stdout == "" and r.stderr.startswith("vlora: warning: 2 module(s) missing from some")
    with pytest.warns(UserWarning, match="missing from some adapters"):  # the library's own
        merge.task_arithmetic([short, load_adapter(adapters[1])])


def test_validate_accepts_quantized_bases_and_diff_of_a_zero_task(adapters, tmp_path):
    run("compress", *adapters[:3], "-o", tmp_path / "q", "-k", "3", "--bits", "4")
    assert "OK" in run("validate", tmp_path / "q").output
    q = SharedSubspace.load(tmp_path / "q")  # diff is exact on the rounded bases too
    ra, rb = (q.reconstruct(t, dtype=torch.float64) for t in ("task0", "task1"))
    dense = {m: (ra.delta_weight(m), rb.delta_weight(m)) for m in q.modules}
    want = math.sqrt(sum(float((a - b).square().sum()) for a, b in dense.values())
                     / sum(float(a.square().sum()) for a, _ in dense.values()))
    got = json.loads(run("diff", tmp_path / "q", "task0", "task1", "--json").output)["total"]
    assert got["relative_difference"] == pytest.approx(want, rel=1e-6)
    sub = SharedSubspace.from_adapters([load_adapter(p) for p in adapters[:3]], num_components=3)
    zero = load_adapter(adapters[3])
    zero.lora_b = {m: b * 0 for m, b in zero.lora_b.items()}
    sub.project(zero, "zero")
    sub.add_task(sub.project(zero, "zero"))
    sub.save(tmp_path / "z")
    out = run("diff", tmp_path / "z", "zero", sub.tasks[0], "--json").output
    data = json.loads(out, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert data["total"]["relative_difference"] is None  # infinite: relative to a zero task


def test_export_names_folders_of_any_task_id(adapters, tmp_path):
    sub = SharedSubspace.from_adapters([load_adapter(p) for p in adapters[:2]], task_ids=["é" * 200, "x" * 256],
                                       num_components=3)
    sub.save(tmp_path / "s")
    run("export", tmp_path / "s", "--all", "-o", tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(names) == 2 and all(len(n.encode()) <= 255 and n not in (".", "..") for n in names)
    # Ids equal but for case would share one folder on macOS or Windows: they get hashed names
    # the last two: NFC and NFD; the one before: the hashed name "Sales" would get
    ids = ["Sales", "sales", "ops", "Sales-8de4e0ea7370", "caf\u00e9", "cafe\u0301"]
    sub = SharedSubspace.from_adapters([load_adapter(p) for p in adapters[:6]], task_ids=ids,
                                       num_components=3)
    sub.save(tmp_path / "c")
    run("export", tmp_path / "c", "--all", "-o", tmp_path / "cout")
    names = sorted(p.name for p in (tmp_path / "cout").iterdir())
    assert len({unicodedata.normalize("NFC", n).casefold() for n in names}) == 6 and "ops" in names


def test_conflicting_or_empty_options_are_refused(adapters, tmp_path):
    sub = tmp_path / "sub"
    run("compress", *adapters[:2], "-o", sub, "-k", "2", "-q")
    r = run("add", sub, adapters[2], "--incremental", "--project-only", code=2)
    assert "exclude each other" in r.output
    assert "x>=1" in run("benchmark", sub, "--repeats", "0", code=2).output
    assert "0 task ids for 1 adapters" in run("add", sub, adapters[2], "--task-ids", ",", code=2).output
    r = run("compress", *adapters[:2], "-o", tmp_path / "s2", "--missing-modules", "skip", "--streaming",
            code=2)
    assert "--streaming needs every adapter to have the same modules" in r.output
    r = run("compress", *adapters[:2], "-o", adapters[3], "-k", "2", "--force", code=2)
    assert "is not a subspace" in r.output and load_adapter(adapters[3])  # an adapter, not replaced
    assert SharedSubspace.load(sub).tasks == ["task0", "task1"]


@pytest.mark.parametrize("budget, ok", [("1e5", True), ("20KB", True), ("0.5", False), ("-5", False),
                                        ("abc", False), ("1e400", False)])
def test_budget_sizes_and_usage_errors_on_one_line(adapters, tmp_path, budget, ok):
    r = run("compress", *adapters[:3], "-o", tmp_path / "s", "--budget", budget, "-q", code=0 if ok else 2)
    if not ok:
        assert len(r.output.strip().splitlines()) == 1, r.output
        assert r.output.startswith("vlora: error: Invalid value for '--budget'")
        assert r.output.rstrip().endswith("compress --help')")
