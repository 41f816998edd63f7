"""``device=`` of the fits, VLoRAModel and SubspaceTrainer on a device, and gpu_check.

Every device test is parametrized over ``cpu`` and ``cuda``; the CUDA cases are skipped
(shown as skips, with the reason) where ``torch.cuda.is_available()`` is False. A fit
with ``device="cpu"`` must be the default fit bit for bit; a CUDA fit must match it to
rounding (float64 linear algebra on both, float32 bases stored from either).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from synthetic import planted, saved
from vlora import SharedSubspace, SubspaceTrainer, VLoRAError
from vlora.cli import cli
from vlora.compress import compress
from vlora.devices import fit_device
from vlora.errors import DeviceError
from vlora.model import VLoRAModel

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA device"))]
ROOT = Path(__file__).resolve().parent.parent
# Three stack routes of linalg.top_left_singular at k = 8 with 72 adapters of rank 4
# (288 columns per stack): a square 300 x 300 module is tall (d >= m), big enough for the
# subspace iteration; 200 x 48 is wide (m > d) on both sides (the d x d Gram).
SHAPES = {"big": (300, 300), "wide": (200, 48)}


def family(n: int = 72, seed: int = 0):
    out = []
    for m, (d_out, d_in) in SHAPES.items():
        out.append(planted(n, dim=8, d_out=d_out, d_in=d_in, r=4, seed=seed, modules=[m], noise=0.05))
    ads = []
    for parts in zip(*out):  # one adapter of every module
        a = parts[0]
        for p in parts[1:]:
            a.layer_names.extend(p.layer_names)
            a.lora_a.update(p.lora_a)
            a.lora_b.update(p.lora_b)
            a.scales.update(p.scales)
        ads.append(a)
    return ads


@pytest.fixture(scope="module")
def adapters():
    return family()


def dw(sub: SharedSubspace, t: str, m: str) -> torch.Tensor:
    b, a = sub.factors(t, m)
    return b @ a.T


def assert_same_fit(got: SharedSubspace, want: SharedSubspace, exact: bool, tol: float = 1e-5):
    """Same tasks, modules and ks; bases and coordinates equal (``exact``) or each task's
    stored dW within ``tol`` of its norm and its error within ``tol``."""
    assert got.tasks == want.tasks and list(got.modules) == list(want.modules)
    for m, b in want.modules.items():
        g = got.modules[m]
        assert (g.k_out, g.k_in) == (b.k_out, b.k_in)
        assert g.U.device.type == "cpu" and g.G_u.device.type == "cpu" and g.U.dtype == torch.float32
        if exact:
            assert torch.equal(g.U, b.U) and torch.equal(g.V, b.V)
            assert torch.equal(g.G_u, b.G_u) and torch.equal(g.G_v, b.G_v)
    for t in want.tasks:
        tg, tw = got.get_task(t), want.get_task(t)
        assert abs(tg.error - tw.error) <= (1e-10 if exact else tol)
        for m in want.modules:
            assert tg.coords_b[m].device.type == "cpu"
            assert m not in tg.spectrum or tg.spectrum[m].device.type == "cpu"
            if exact:
                assert torch.equal(tg.coords_b[m], tw.coords_b[m])
                assert torch.equal(tg.coords_a[m], tw.coords_a[m])
            else:
                ref = dw(want, t, m)
                assert float((dw(got, t, m) - ref).norm()) <= tol * max(float(ref.norm()), 1e-30)


def test_the_family_takes_every_stack_route(adapters):
    from vlora import linalg
    m = sum(a.rank for a in adapters)
    assert linalg.subspace_budget(300, m, 8) > 0  # "big": subspace iteration
    assert m > 200 and m > 48  # "wide": the Gram route on both sides


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", [{"num_components": 8}, {"variance_threshold": 0.9},
                                     {"budget": 120_000}])
def test_fit_on_a_device_is_the_default_fit(adapters, device, options):
    want = SharedSubspace.from_adapters(adapters, **options)
    got = SharedSubspace.from_adapters(adapters, device=device, **options)
    assert 0.01 < max(want.get_task(t).error for t in want.tasks) < 0.5  # a fit with work to do
    assert_same_fit(got, want, exact=device == "cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_compress_on_a_device_is_the_default_compress(adapters, device):
    want = compress(adapters[:24], ratio=4)
    got = compress(adapters[:24], ratio=4, device=device)
    assert got.fit_report.keys() == want.fit_report.keys()
    assert_same_fit(got, want, exact=device == "cpu", tol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_streaming_on_a_device_is_the_default_streaming(adapters, device, tmp_path):
    paths = saved(adapters[:20], tmp_path)
    want = SharedSubspace.from_adapters_streaming(paths, num_components=4, chunk_size=8)
    got = SharedSubspace.from_adapters_streaming(paths, num_components=4, chunk_size=8, device=device)
    assert_same_fit(got, want, exact=device == "cpu")


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cuda_without_cuda_is_our_clear_error(adapters, no_cuda, tmp_path):
    for fit in (lambda: SharedSubspace.from_adapters(adapters[:4], num_components=2, device="cuda"),
                lambda: compress(adapters[:4], ratio=4, device="cuda:0"),
                lambda: SharedSubspace.from_adapters_streaming(saved(adapters[:2], tmp_path),
                                                               device="cuda")):
        with pytest.raises(DeviceError, match="CUDA is not available") as e:
            fit()
        assert isinstance(e.value, (VLoRAError, ValueError))


@pytest.mark.parametrize("bad", ["mps", "meta", "gpu", "cuda:x", 3.5])
def test_other_devices_are_refused(bad):
    with pytest.raises(DeviceError, match="cpu"):
        fit_device(bad)


def test_none_and_cpu_devices():
    assert fit_device(None) is None
    assert fit_device("cpu") == torch.device("cpu")


def test_cli_device_cuda_without_cuda(adapters, no_cuda, tmp_path):
    paths = saved(adapters[:3], tmp_path)
    result = CliRunner().invoke(cli, ["compress", *map(str, paths), "-o", str(tmp_path / "sub"), "-k", "2",
                                      "--device", "cuda"])
    assert result.exit_code == 2, result.output
    assert "--device" in result.output and "CUDA is not available" in result.output
    assert not (tmp_path / "sub").exists()


def test_cli_device_with_ray_is_refused(adapters, tmp_path):
    paths = [str(p) for p in saved(adapters[:2], tmp_path)]
    result = CliRunner().invoke(cli, ["compress", *paths, "-o", str(tmp_path / "sub"), "-k", "2",
                                      "--ray=auto", "--device", "cpu"])
    assert result.exit_code == 2 and "--ray fits on the cluster" in result.output, result.output


def test_cli_device_cpu_writes_the_default_subspace(adapters, tmp_path):
    paths = [str(p) for p in saved(adapters[:3], tmp_path)]
    for name, extra in (("a", []), ("b", ["--device", "cpu"])):
        result = CliRunner().invoke(cli, ["compress", *paths, "-o", str(tmp_path / name), "-k", "2", *extra])
        assert result.exit_code == 0, result.output
    a, b = SharedSubspace.load(tmp_path / "a"), SharedSubspace.load(tmp_path / "b")
    assert_same_fit(b, a, exact=True)


# ------------------------------------------------------------------ serving and training
class Toy(nn.Module):
    """Two layers whose Linear modules are the family's: x (48) -> big (300) -> wide (200)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(48, 300)
        self.big = nn.Linear(300, 300)
        self.wide = nn.Linear(48, 200)
        self.out = nn.Linear(500, 5)

    def forward(self, x):
        return self.out(torch.cat([self.big(torch.tanh(self.inp(x))), self.wide(x)], -1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mixed", ["bmm", "grouped"])
def test_mixed_batch_on_a_device(adapters, device, mixed):
    sub = SharedSubspace.from_adapters(adapters[:6], task_ids=list("abcdef"), num_components=4)
    torch.manual_seed(0)
    base = Toy()
    x = torch.randn(7, 3, 48)
    ids = ["a", "b", None, "c", "a", "f", "e"]
    with torch.no_grad():
        cpu_vm = VLoRAModel(_copy(base), sub)
        want = cpu_vm(x, task_ids=ids)
        vm = VLoRAModel(_copy(base).to(device), sub, mixed=mixed)
        layer = vm._layers["big"]
        got = vm(x.to(device), task_ids=ids)
        assert got.device.type == device and layer.cores.device.type == device
        assert float((got.cpu() - want).abs().max()) <= 1e-4 * float(want.abs().max())
        for i, t in enumerate(ids):  # every row is its task run alone, on the device
            vm.set_task(t)
            alone = vm(x[i:i + 1].to(device))
            assert float((alone - got[i:i + 1]).abs().max()) <= 1e-5 * float(want.abs().max())
        vm.clear_task()
        assert not torch.allclose(got[0], got[1], atol=1e-4)  # the tasks differ


def _copy(model: nn.Module) -> nn.Module:
    out = Toy()
    out.load_state_dict(model.state_dict())
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_trainer_on_a_device(adapters, device):
    sub = SharedSubspace.from_adapters(adapters[:6], num_components=4)
    torch.manual_seed(0)
    model = Toy().to(device)
    st = SubspaceTrainer(sub, "new", model=model, lr=5e-2, num_expand=1, train_modules_to_save=False)
    assert all(p.device.type == device for p in st.parameters())
    x, y = torch.randn(16, 48, device=device), torch.randint(0, 5, (16,), device=device)
    losses = [st.step(nn.functional.cross_entropy(st.module(x), y)) for _ in range(5)]
    assert losses[-1] < losses[0]
    st.write_back()  # absorbed (num_expand): the bases learned its new directions
    new = sub.get_task("new")
    assert new.coords_b["big"].device.type == "cpu" and sub.modules["big"].U.device.type == "cpu"
    assert new.norm_sq["big"] > 0  # it learned something


# ------------------------------------------------------------------ the GPU check script
@pytest.mark.parametrize("device", DEVICES)
def test_gpu_check_quick(tmp_path, device):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": "", "OUT": ""}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--quick",
                          "--device", device, "--out", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    import json
    data = json.loads(out.read_text())
    assert data["quick"] and data["device"] == device
    agree, exact = data["agreement"], device == "cpu"  # cpu against cpu: the same fit
    assert agree["fit"]["max_task_error_diff"] <= (1e-10 if exact else 1e-5)
    assert agree["fit"]["max_dw_diff"] <= (1e-10 if exact else 1e-5)
    assert all(f["same_k"] for f in agree["fit"]["fits"].values())
    model = agree["model"]
    assert model["max_abs_logit_diff"] <= 1e-4 * model["max_abs_logit"]
    assert model["row_vs_alone_diff_device"] <= 1e-4 * model["max_abs_logit"]
    assert data["fit_time"]["device_s"] > 0 and data["fit_time"]["cpu_extrapolated_s"] > 0
    tasks = [row["tasks"] for row in data["serving"]["rows"]]
    assert tasks == [1, 4, 16, 32]
    assert all(row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0 for row in data["serving"]["rows"])
    assert "| tasks |" in run.stdout and "target" in run.stdout
