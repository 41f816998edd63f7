"""vlora's opt-in vLLM platform (:mod:`vlora.serving.vllm_platform`): the grouped LoRA wrapper
gives the stock engine's tokens, and nothing changes unless ``VLORA_VLLM_PLATFORM=1``.

The platform is chosen once per process, so the engine comparison takes two starts of
vLLM's offline engine (:mod:`vlora.serving.vllm_driver`), stock and with the platform, on
the same job: three planted adapters (ranks 4, 8, 8 under ``max_lora_rank`` 8, so padded
rank is exercised) each alone, and all three plus a base-model request mixed in one batch
(``max_loras`` 3). Tokens are compared exactly (float32, greedy), log-probabilities within
``LOGPROB_TOL`` nats: the two wrappers sum in different orders (measured: about 2e-5).
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import time

import pytest

# with test_vllm's fixtures base, shapes and prompt_ids (imported, so pytest sees them here)
from test_vllm import VLLM_PYTHON, _vllm_env, base, needs_vllm, plant, prompt_ids, shapes  # noqa: F401

LOGPROB_TOL = 1e-4
N_TOKENS = 12
# the mixed batch: (prompt, adapter or None); a1 twice and not adjacent (rows gathered)
MIXED = [(0, "a1"), (1, "a2"), (2, "a3"), (0, "a2"), (1, None), (2, "a1")]


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


@pytest.fixture(scope="module")
def arms(base, shapes, prompt_ids, tmp_path_factory) -> dict:  # noqa: F811
    """``{"stock": OUT, "vlora": OUT}`` of vllm_driver on the same job, and each one's log."""
    from vlora.io import save_adapter

    root = tmp_path_factory.mktemp("vllm-platform")
    cases = []
    for seed, r in ((1, 4), (2, 8), (3, 8)):
        save_adapter(plant(shapes, seed, r=r), root / f"a{seed}", for_vllm=True)
        cases.append({"name": f"a{seed}", "path": str(root / f"a{seed}")})
    job = {"model": str(base), "max_lora_rank": 8, "max_tokens": N_TOKENS, "prompts": prompt_ids,
           "max_loras": 3, "cases": cases,
           "batches": [[{"prompt": p, "case": c} for p, c in MIXED]]}
    (root / "job.json").write_text(json.dumps(job))
    out = {}
    for arm, extra in (("stock", {}), ("vlora", {"VLORA_VLLM_PLATFORM": "1"})):
        start = time.perf_counter()
        proc = subprocess.run([str(VLLM_PYTHON), "-m", "vlora.serving.vllm_driver",
                               str(root / "job.json"), str(root / f"{arm}.json")],
                              env=_vllm_env(**extra), capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-4000:]
        out[arm] = json.loads((root / f"{arm}.json").read_text())
        out[arm]["log"] = proc.stdout + proc.stderr
        print(f"{arm}: {time.perf_counter() - start:.0f} s, engine start {out[arm]['engine_s']:.0f} s")
    return out


@pytest.mark.slow
@needs_vllm
def test_grouped_wrapper_gives_the_stock_engines_tokens(arms):
    """With the platform on, vLLM uses the grouped wrapper, and every LoRA request (each
    adapter alone, and the adapters mixed in one batch) gets the stock engine's greedy
    tokens, log-probabilities within LOGPROB_TOL; without it, vLLM's own wrapper."""
    stock, ours = arms["stock"], arms["vlora"]
    assert stock["punica_wrapper"] == "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"
    assert ours["punica_wrapper"] == "vlora.serving.vllm_platform.GroupedPunicaWrapper"
    assert "Using GroupedPunicaWrapper" in ours["log"]  # the engine core's own choice
    assert "zero-padded rank skipped" in ours["log"]  # a1 is rank 4 in rank-8 stacks
    assert "Using PunicaWrapperCPU" in stock["log"] and "GroupedPunicaWrapper" not in stock["log"]
    # the base model's own kernels either way: the same tokens and log-probabilities within
    # the tolerance (bit-equal in earlier runs, not in one at load 2.7 beside other tests)
    assert ours["base"]["tokens"] == stock["base"]["tokens"]
    diffs = {"base": _max_diff(ours["base"]["logprobs"], stock["base"]["logprobs"])}
    for name in stock["cases"]:
        assert ours["cases"][name]["tokens"] == stock["cases"][name]["tokens"], name
        assert stock["cases"][name]["tokens"] != stock["base"]["tokens"], f"{name} changes nothing"
        diffs[name] = _max_diff(ours["cases"][name]["logprobs"], stock["cases"][name]["logprobs"])
    mixed_s, mixed_o = stock["batches"][0], ours["batches"][0]
    for i, (p, case) in enumerate(MIXED):
        if case is None:
            continue
        assert mixed_o["tokens"][i] == mixed_s["tokens"][i], (p, case)
        # and the mixed batch gives what the adapter gives alone
        assert mixed_o["tokens"][i] == ours["cases"][case]["tokens"][p], (p, case)
        diffs[f"mixed {i} {case}"] = _max_diff([mixed_o["logprobs"][i]], [mixed_s["logprobs"][i]])
    print("max |logprob grouped - stock|:", {k: f"{v:.1e}" for k, v in diffs.items()})
    assert max(diffs.values()) < LOGPROB_TOL, diffs


@pytest.mark.slow
@needs_vllm
def test_a_base_request_batched_with_adapters_gets_no_adapter(arms):
    """A base-model request in a batch with LoRA requests gets the base model's tokens with
    the grouped wrapper. vLLM 0.32's CPU wrapper indexes its stacked weights with the
    request's -1 (no adapter), i.e. the last slot, which holds a3 here."""
    i = [c for _, c in MIXED].index(None)
    p = MIXED[i][0]
    ours, stock = arms["vlora"], arms["stock"]
    assert ours["batches"][0]["tokens"][i] == ours["base"]["tokens"][p]
    assert _max_diff([ours["batches"][0]["logprobs"][i]], [ours["base"]["logprobs"][p]]) < LOGPROB_TOL
    same = stock["batches"][0]["tokens"][i] == stock["base"]["tokens"][p]
    print(f"stock vLLM: base request in the mixed batch {'=' if same else '!='} base alone")


_OPS = textwrap.dedent("""
    import json, os, torch
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    from vllm.platforms import resolve_current_platform_cls_qualname
    from vlora.serving.vllm_platform import GroupedPunicaWrapper, platform_plugin

    out = {"platform": resolve_current_platform_cls_qualname(), "plugin": platform_plugin()}
    g = torch.Generator().manual_seed(0)
    L, r, d, outs = 4, 8, 64, (64, 16, 16)
    def stacked(*shape):  # the last slot empty: stock's -1 reads it
        t = torch.randn(L, 1, *shape, generator=g); t[L - 1] = 0; return t
    A = tuple(stacked(r, d) for _ in outs); B = tuple(stacked(o, r) for o in outs)
    ids = [None, 11, 12, None]
    tok = [11] * 5 + [12] * 3 + [11] * 2 + [0] * 4 + [12]
    ws = [cls(64, 8, "cpu") for cls in (PunicaWrapperCPU, GroupedPunicaWrapper)]
    for w in ws:
        w.update_metadata(LoRAMapping(tuple(tok), tuple(tok), is_prefill=True), ids, L + 1, 100)
    x, xr = torch.randn(len(tok), d, generator=g), torch.randn(len(tok), r, generator=g)
    E, Al, Bl = stacked(32, r), stacked(r, d), stacked(100, r)
    def run(w):
        res = {}
        y = torch.randn(len(tok), sum(outs), generator=torch.Generator().manual_seed(1))
        w.add_lora_linear(y, x, A, B, 0.5, outs); res["linear"] = y
        buf = torch.zeros(len(outs), len(tok), r); w.add_shrink(buf, x, A, 2.0); res["shrink"] = buf
        y = torch.zeros(len(tok), 200); w.add_expand(y, buf, B, outs, offset_start=7)
        res["expand"] = y
        y = torch.zeros(len(tok), 32); w.add_lora_embedding(y, xr, E, add_input=True)
        res["embedding"] = y
        y = torch.zeros(len(tok), 100); w.add_lora_logits(y, x, Al, Bl, 1.0); res["logits"] = y
        # slot 1 at rank 3 of 8 (A's rows past 3 zero, B's columns past 5), then rewritten
        # in place at full rank as vLLM's set_lora does: the grouped wrapper's cached rank follows
        A3, B3 = tuple(t.clone() for t in A), tuple(t.clone() for t in B)
        for a, b in zip(A3, B3):
            a[1, 0, 3:] = 0; b[1, 0, :, 5:] = 0
        def linear():
            y = torch.zeros(len(tok), sum(outs)); w.add_lora_linear(y, x, A3, B3, 1.0, outs)
            return y
        res["padded"] = linear()
        if hasattr(w, "_rank"):
            out["rank"] = [w._rank(A3[0], B3[0], 1)]
        for a, b, a0, b0 in zip(A3, B3, A, B):
            a[1, 0].copy_(a0[1, 0]); b[1, 0].copy_(b0[1, 0])
        res["rewritten"] = linear()
        if hasattr(w, "_rank"):
            out["rank"].append(w._rank(A3[0], B3[0], 1))
        return res
    stock, ours = run(ws[0]), run(ws[1])
    out["rel_err"] = {k: float((stock[k] - ours[k]).abs().max() / stock[k].abs().max()) for k in stock}
    print(json.dumps(out))
""")


@needs_vllm
def test_platform_is_off_unless_asked_and_ops_match_stock():
    """In vLLM's environment: without VLORA_VLLM_PLATFORM vLLM resolves its own CPU platform
    (the plugin answers None); with it, vlora's. Each wrapper operation (linear with packed
    slices and a scale, shrink, expand at an offset, embedding, logits) on random stacked
    weights, tokens of two adapters interleaved and some with none, equals PunicaWrapperCPU's
    (the last slot left empty, where PunicaWrapperCPU sends the tokens with none); so does
    the linear one where an adapter's rank is below the stacks' (the zero padding skipped)
    and after that slot is rewritten in place."""
    got = {}
    for arm, extra in (("off", {}), ("on", {"VLORA_VLLM_PLATFORM": "1"})):
        proc = subprocess.run([str(VLLM_PYTHON), "-c", _OPS], env=_vllm_env(**extra),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        got[arm] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["off"]["platform"] == "vllm.platforms.cpu.CpuPlatform" and got["off"]["plugin"] is None
    assert got["on"]["platform"] == got["on"]["plugin"] == "vlora.serving.vllm_platform.VLoRACpuPlatform"
    print("relative error, grouped vs PunicaWrapperCPU:", got["on"]["rel_err"])
    assert got["on"]["rank"] == [3, 8]  # the padded rank skipped, then the rewrite seen
    assert all(e < 1e-5 for e in got["on"]["rel_err"].values()), got["on"]["rel_err"]


def test_plugin_answers_none_without_the_variable(monkeypatch):
    """vlora without vLLM: the module imports, and the plugin is off without the variable."""
    from vlora.serving import vllm_platform

    monkeypatch.delenv("VLORA_VLLM_PLATFORM", raising=False)
    assert vllm_platform.platform_plugin() is None
    monkeypatch.setenv("VLORA_VLLM_PLATFORM", "0")
    assert vllm_platform.platform_plugin() is None
    with pytest.raises(AttributeError):
        vllm_platform.NoSuchThing  # noqa: B018
