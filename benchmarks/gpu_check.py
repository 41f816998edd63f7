"""GPU check of vlora: does it agree with the CPU, and is it fast, on one CUDA device?

Standalone: needs Python 3.12, torch and this repository's ``src`` (put on ``sys.path``
here), nothing else: no download, no transformers, no files on disk. From the repo root::

    python benchmarks/gpu_check.py                        # on a GPU machine: sized for < 5 min on an H100
    python benchmarks/gpu_check.py --quick --device cpu   # tiny sizes on the CPU, seconds
    python benchmarks/gpu_check.py --quick                # tiny sizes, on the GPU where there is one

It prints a markdown report and writes JSON to ``--out`` (default ``$OUT/gpu_check.json``
when ``$OUT`` is set, else none), rewritten after every part so that a run cut short
keeps what it measured. Three parts:

(a) Agreement. The same adapters fitted on the CPU (``device=None``, today's fit) and on
    the device (``device=...``): per task, the relative difference of the two stored dW,
    ``||dW_cpu - dW_dev|| / ||dW||``, and of the two errors against the original. Both
    fits compute in float64; the stored bases are float32, so differences of about 1e-7
    relative are rounding. The stacks are sized so that all three routes of
    ``linalg.top_left_singular`` run (full SVD, subspace iteration, d x d Gram). Then the
    logits of a ``VLoRAModel`` mixed batch (float32) on the CPU and on the device.
(b) Fit time: 1,000 adapters of one Llama-7B layer (q/k/v/o 4096x4096, gate/up
    11008x4096, down 4096x11008, r = 16) generated in device memory, fitted at fixed k
    on the device. The CPU figure is extrapolated, not measured (1,000 adapters on the
    CPU take far longer than this check may run): the same fit on the CPU at two small N,
    a straight line through the two times, read at N = 1,000. The CPU fit runs its
    decompositions at one thread whatever the cores (``linalg.fixed_threads``: saved
    files byte-identical), so this is the time on 2 cores as well. At N = 1,000 the
    stacks are wider than d and go through d x d eigendecompositions the small fits do
    not need, so the line is an estimate of the CPU time, most likely low.
(c) Serving: prefill and decode tokens/s of a mixed batch of 32 rows over 1, 4, 16 and
    32 tasks, against the bare model, on a Llama-shaped decoder (RMSNorm, RoPE, SwiGLU,
    KV cache) built here in plain torch from a config with random weights, bfloat16 on
    CUDA (float32 on the CPU). 1 task is ``set_task``-like (one core for every row);
    more take the default ``mixed="bmm"`` path.

Targets of the issue, printed beside the measurements: fit >= 20x faster than the CPU
(2 cores); mixed-batch decode >= 0.9x the bare model at 32 tasks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from vlora import LoRAWeights, SharedSubspace  # noqa: E402
from vlora.model import VLoRAModel  # noqa: E402
from vlora.task import ModuleBasis, TaskProjection  # noqa: E402

F64 = torch.float64
TARGET_FIT_SPEEDUP = 20.0
TARGET_DECODE_RATIO = 0.9
LLAMA_7B_LAYER = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096),
                  "o_proj": (4096, 4096), "gate_proj": (11008, 4096), "up_proj": (11008, 4096),
                  "down_proj": (4096, 11008)}

FULL = {
    "agree_shapes": {"q": (1024, 1024), "down": (1024, 2816), "small": (256, 256)},
    "agree_n": 48, "agree_r": 8, "agree_k": 16,
    "fit_shapes": LLAMA_7B_LAYER, "fit_n": 1000, "fit_r": 16, "fit_k": 32, "fit_dim": 48,
    "cpu_ns": (4, 8),
    "model": {"hidden": 4096, "inter": 11008, "layers": 8, "heads": 32, "vocab": 32000},
    "agree_model": {"hidden": 256, "inter": 688, "layers": 2, "heads": 4, "vocab": 1000},
    "serve_rows": 32, "prompt": 128, "decode": 32, "serve_r": 16, "serve_k": 32, "reps": 5,
}
QUICK = {
    "agree_shapes": {"q": (64, 64), "down": (64, 96), "small": (24, 24)},
    "agree_n": 12, "agree_r": 4, "agree_k": 4,
    "fit_shapes": {m: (d_out // 64, d_in // 64) for m, (d_out, d_in) in LLAMA_7B_LAYER.items()},
    "fit_n": 20, "fit_r": 4, "fit_k": 8, "fit_dim": 12,
    "cpu_ns": (4, 8),
    "model": {"hidden": 64, "inter": 172, "layers": 2, "heads": 4, "vocab": 256},
    "agree_model": {"hidden": 64, "inter": 172, "layers": 2, "heads": 4, "vocab": 256},
    "serve_rows": 32, "prompt": 8, "decode": 4, "serve_r": 4, "serve_k": 8, "reps": 2,
}


# ------------------------------------------------------------------ adapters
def family(n: int, shapes: dict[str, tuple[int, int]], r: int, dim: int, device: str | torch.device,
           seed: int = 0, noise: float = 0.05, prefix: str = "") -> list[LoRAWeights]:
    """``n`` adapters whose dW share a planted ``dim``-dimensional subspace per module side,
    plus noise, made directly on ``device`` (float32)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=g, device=device)

    names = [prefix + m for m in shapes]
    planted = {m: (torch.linalg.qr(randn(d_out, dim))[0], torch.linalg.qr(randn(d_in, dim))[0])
               for m, (d_out, d_in) in zip(names, shapes.values())}
    out = []
    for _ in range(n):
        a, b = {}, {}
        for m, (u, v) in planted.items():
            b[m] = u @ randn(dim, r) + noise * randn(u.shape[0], r)
            a[m] = randn(r, dim) @ v.T + noise * randn(r, v.shape[0])
        out.append(LoRAWeights(list(names), a, b, dict.fromkeys(names, 2.0),
                               config={"r": r, "lora_alpha": 2 * r}))
    return out


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------ a Llama-shaped decoder
class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope(x, cos, sin):
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    def __init__(self, h: int, heads: int):
        super().__init__()
        self.heads, self.dh = heads, h // heads
        self.q_proj, self.k_proj = nn.Linear(h, h, bias=False), nn.Linear(h, h, bias=False)
        self.v_proj, self.o_proj = nn.Linear(h, h, bias=False), nn.Linear(h, h, bias=False)

    def forward(self, x, cos, sin, cache, pos):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.heads, self.dh).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if cache is not None:
            ck, cv = cache
            ck[:, :, pos:pos + t], cv[:, :, pos:pos + t] = k, v
            k, v = ck[:, :, :pos + t], cv[:, :, :pos + t]
        o = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, h: int, inter: int):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(h, inter, bias=False), nn.Linear(h, inter, bias=False)
        self.down_proj = nn.Linear(inter, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, h: int, inter: int, heads: int):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(h), RMSNorm(h)
        self.self_attn, self.mlp = Attention(h, heads), MLP(h, inter)

    def forward(self, x, cos, sin, cache, pos):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaLike(nn.Module):
    """Llama's layout and module names (``layers.N.self_attn.q_proj``, ``layers.N.mlp.gate_proj``)."""

    def __init__(self, hidden: int, inter: int, layers: int, heads: int, vocab: int):
        super().__init__()
        self.heads, self.dh = heads, hidden // heads
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Block(hidden, inter, heads) for _ in range(layers))
        self.norm = RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, self.dh, 2).float() / self.dh),
                             persistent=False)

    def new_cache(self, rows: int, length: int):
        p = self.lm_head.weight
        return [tuple(p.new_zeros(rows, self.heads, length, self.dh) for _ in range(2)) for _ in self.layers]

    def forward(self, ids, cache=None, pos: int = 0):
        x = self.embed_tokens(ids)
        t = torch.arange(pos, pos + ids.shape[1], device=ids.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat([freqs, freqs], -1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if cache is None else cache[i], pos)
        return self.lm_head(self.norm(x))


def llama_like(cfg: dict, device, dtype, seed: int = 0, init_on: str | None = None) -> LlamaLike:
    """A random ``LlamaLike`` on ``device`` in ``dtype``, its weights drawn on ``init_on``
    (default ``device``: a 2B-parameter model is not built on the CPU first; the CPU to
    give two devices the same weights)."""
    torch.manual_seed(seed)
    with torch.device(init_on or device):
        model = LlamaLike(**cfg)
        for p in model.parameters():  # small weights: activations stay O(1) in bf16
            if p.ndim == 2:
                nn.init.normal_(p, std=0.02)
    return model.to(device, dtype).eval()


def llama_modules(cfg: dict) -> dict[str, tuple[int, int]]:
    h, i = cfg["hidden"], cfg["inter"]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h),
              "mlp.down_proj": (h, i)}
    return {f"layers.{n}.{m}": s for n in range(cfg["layers"]) for m, s in shapes.items()}


def serving_subspace(cfg: dict, tasks: int, r: int, k: int, seed: int = 0) -> SharedSubspace:
    """Random orthonormal bases of ``k`` directions per module side and ``tasks`` random
    rank-``r`` tasks inside them (exact, error 0): serving cost does not depend on how the
    bases were fitted, and 32 tasks of a 7B-shaped model would take a while to project."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for m, (d_out, d_in) in llama_modules(cfg).items():
        u = torch.linalg.qr(torch.randn(d_out, k, generator=g, dtype=F64))[0]
        v = torch.linalg.qr(torch.randn(d_in, k, generator=g, dtype=F64))[0]
        modules[m] = ModuleBasis(u.float(), v.float(), torch.eye(k, dtype=F64), torch.eye(k, dtype=F64))
    sub = SharedSubspace(modules)
    for t in range(tasks):
        cb = {m: torch.randn(k, r, generator=g) * 0.2 for m in modules}
        ca = {m: torch.randn(k, r, generator=g) * 0.1 for m in modules}
        norm = {m: float((cb[m].double() @ ca[m].double().T).square().sum()) for m in modules}
        sub.add_task(TaskProjection(f"task{t}", cb, ca, norm, dict.fromkeys(modules, 0.0),
                                    {m: torch.zeros(0, dtype=F64) for m in modules}, weight=1.0,
                                    config={"r": r, "lora_alpha": 2 * r}))
    return sub


# ------------------------------------------------------------------ (a) agreement
def agreement(p: dict, device: str) -> dict:
    ads_cpu = family(p["agree_n"], p["agree_shapes"], p["agree_r"], dim=p["agree_k"] // 2 + 2,
                     device="cpu", seed=1, noise=0.01)
    fits = {}
    for name, options in (("fixed_k", {"num_components": p["agree_k"]}),
                          ("variance_0.9", {"variance_threshold": 0.9})):
        cpu = SharedSubspace.from_adapters(ads_cpu, **options)
        dev = SharedSubspace.from_adapters(ads_cpu, device=device, **options)
        rows = []
        for t, ad in zip(cpu.tasks, ads_cpu):
            diff = norm = 0.0
            for m in cpu.modules:
                b1, a1 = cpu.factors(t, m)
                b2, a2 = dev.factors(t, m)
                diff += float((b1 @ a1.T - b2 @ a2.T).square().sum())
                norm += float(ad.delta_weight(m).to(F64).square().sum())
            rows.append({"task": t, "error_cpu": cpu.get_task(t).error, "error_device": dev.get_task(t).error,
                         "dw_diff": math.sqrt(diff / norm)})
        fits[name] = {"k": {m: [b.k_out, b.k_in] for m, b in cpu.modules.items()},
                      "same_k": all((b.k_out, b.k_in) == (dev.modules[m].k_out, dev.modules[m].k_in)
                                    for m, b in cpu.modules.items()),
                      "max_dw_diff": max(r["dw_diff"] for r in rows),
                      "max_task_error_diff": max(abs(r["error_cpu"] - r["error_device"]) for r in rows),
                      "mean_error_cpu": statistics.fmean(r["error_cpu"] for r in rows),
                      "tasks": rows}
    # the model: one float32 decoder, a copy on each device, the same mixed batch
    cfg = p["agree_model"]
    shapes = llama_modules(cfg)
    sub = serving_subspace(cfg, tasks=4, r=p["agree_r"], k=p["agree_k"], seed=2)
    assert set(sub.modules) == set(shapes)
    ids = ["task0", "task1", None, "task2", "task3", "task0"]
    tokens = torch.randint(0, cfg["vocab"], (len(ids), 16), generator=torch.Generator().manual_seed(3))
    logits = {}
    for where in ("cpu", device):
        model = llama_like(cfg, where, torch.float32, seed=4, init_on="cpu")  # the same weights
        vm = VLoRAModel(model, sub)
        with torch.no_grad():
            logits[where] = vm(tokens.to(where), task_ids=ids).float().cpu()
            vm.set_task("task1")
            alone = vm(tokens[1:2].to(where)).float().cpu()
        logits[f"{where}_row1_alone"] = alone
    scale = float(logits["cpu"].abs().max())
    model = {"rows": len(ids), "tasks": 4, "max_abs_logit": scale,
             "max_abs_logit_diff": float((logits["cpu"] - logits[device]).abs().max()),
             "row_vs_alone_diff_device":
                 float((logits[device][1:2] - logits[f"{device}_row1_alone"]).abs().max())}
    return {"fit": {"max_dw_diff": max(f["max_dw_diff"] for f in fits.values()),
                    "max_task_error_diff": max(f["max_task_error_diff"] for f in fits.values()),
                    "fits": fits},
            "model": model}


# ------------------------------------------------------------------ (b) fit time
def fit_time(p: dict, device: str) -> dict:
    shapes, r, k, dim = p["fit_shapes"], p["fit_r"], p["fit_k"], p["fit_dim"]
    out = {"n": p["fit_n"], "r": r, "k": k, "shapes": shapes}
    cpu_times = {}
    for n in p["cpu_ns"]:
        ads = family(n, shapes, r, dim, "cpu", seed=5)
        t0 = time.perf_counter()
        SharedSubspace.from_adapters(ads, num_components=k)
        cpu_times[n] = time.perf_counter() - t0
        del ads
    (n1, t1), (n2, t2) = sorted(cpu_times.items())
    slope = max((t2 - t1) / (n2 - n1), 0.0)
    out["cpu_s"] = {str(n): t for n, t in cpu_times.items()}
    out["cpu_extrapolated_s"] = t2 + slope * (p["fit_n"] - n2)
    out["cpu_how"] = (f"CPU (device=None, decompositions at 1 thread) timed at N = {n1} and {n2}; "
                      f"straight line through the two, read at N = {p['fit_n']}")
    sync(device)
    t0 = time.perf_counter()
    ads = family(p["fit_n"], shapes, r, dim, device, seed=5)
    sync(device)
    out["generate_s"] = time.perf_counter() - t0
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    sub = SharedSubspace.from_adapters(ads, num_components=k, device=device)
    sync(device)
    out["device_s"] = time.perf_counter() - t0
    if torch.device(device).type == "cuda":
        out["device_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out["mean_error"] = statistics.fmean(sub.get_task(t).error for t in sub.tasks)
    out["k_fitted"] = {m: [b.k_out, b.k_in] for m, b in sub.modules.items()}
    out["speedup"] = out["cpu_extrapolated_s"] / out["device_s"]
    # at equal N, both measured: the small-N device fits beside the CPU ones
    eq = {}
    for n in p["cpu_ns"]:
        small = ads[:n]
        sync(device)
        t0 = time.perf_counter()
        SharedSubspace.from_adapters(small, num_components=k, device=device)
        sync(device)
        eq[str(n)] = {"cpu_s": cpu_times[n], "device_s": time.perf_counter() - t0}
    out["equal_n"] = eq
    return out


# ------------------------------------------------------------------ (c) serving
def timed(fn, device, reps: int) -> float:
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def serving(p: dict, device: str) -> dict:
    cfg, rows, prompt, steps, reps = p["model"], p["serve_rows"], p["prompt"], p["decode"], p["reps"]
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    model = llama_like(cfg, device, dtype, seed=6)
    tokens = torch.randint(0, cfg["vocab"], (rows, prompt), device=device)
    step_tokens = torch.randint(0, cfg["vocab"], (rows, 1), device=device)

    def run(tasks):
        """Prefill time and decode time (``steps`` one-token steps after the prompt) with
        ``tasks()`` the routing context (as ``VLoRAModel.generate`` routes: once per call)."""
        cache = model.new_cache(rows, prompt + steps)

        def prefill():
            with tasks():
                model(tokens, cache, 0)

        def decode():
            with tasks():
                for s in range(steps):
                    model(step_tokens, cache, prompt + s)

        with torch.no_grad():
            prefill()  # warm up
            decode()
            return timed(prefill, device, reps), timed(decode, device, reps)

    bare_prefill, bare_decode = run(contextlib.nullcontext)  # before wrapping: the bare model
    sub = serving_subspace(cfg, tasks=32, r=p["serve_r"], k=p["serve_k"], seed=7)
    vm = VLoRAModel(model, sub)  # in place: the model's Linears now carry the subspace path
    out = {"config": cfg, "dtype": str(dtype).removeprefix("torch."), "batch_rows": rows,
           "prompt": prompt, "decode_steps": steps, "k": p["serve_k"], "r": p["serve_r"], "mixed": vm.mixed,
           "bare": {"prefill_tok_s": rows * prompt / bare_prefill,
                    "decode_tok_s": rows * steps / bare_decode},
           "rows": []}
    for n in (1, 4, 16, 32):
        ids = [f"task{i % n}" for i in range(rows)]

        pre, dec = run(lambda ids=ids: vm.tasks(ids))
        out["rows"].append({"tasks": n, "prefill_tok_s": rows * prompt / pre,
                            "decode_tok_s": rows * steps / dec,
                            "prefill_vs_bare": bare_prefill / pre, "decode_vs_bare": bare_decode / dec})
    vm.unwrap()
    return out


# ------------------------------------------------------------------ report
def markdown(data: dict) -> str:
    lines = [f"# vlora GPU check ({data['device_name']}{', quick' if data['quick'] else ''})", "",
             f"torch {data['torch']}, device {data['device']}, "
             f"{data.get('wall_s', 0):.0f} s in all", ""]
    a = data.get("agreement")
    if a:
        lines += ["## (a) CPU vs device agreement", "",
                  "| fit | k per module (out, in) | max per-task dW diff / ||dW|| | max task error diff | "
                  "mean task error |", "|---|---|---|---|---|"]
        for name, f in a["fit"]["fits"].items():
            lines.append(f"| {name} | {f['k']} | {f['max_dw_diff']:.2e} | {f['max_task_error_diff']:.2e} | "
                         f"{f['mean_error_cpu']:.4f} |")
        m = a["model"]
        lines += ["", f"VLoRAModel mixed batch ({m['rows']} rows, {m['tasks']} tasks, float32): max |logit "
                  f"CPU - device| = {m['max_abs_logit_diff']:.2e} (max |logit| {m['max_abs_logit']:.2f}); "
                  f"a row against its task alone on the device: {m['row_vs_alone_diff_device']:.2e}.",
                  "Expected: dW differences about 1e-7 (float32 bases stored from float64 fits), "
                  "logits within float32 rounding.", ""]
    b = data.get("fit_time")
    if b:
        lines += [f"## (b) Fit time, {b['n']} adapters of one Llama-7B layer (r = {b['r']}, "
                  f"k = {b['k']})", "",
                  "| | seconds |", "|---|---|",
                  f"| device ({data['device']}) | {b['device_s']:.1f} |",
                  f"| CPU, extrapolated | {b['cpu_extrapolated_s']:.1f} |",
                  "", f"Speedup {b['speedup']:.1f}x (target >= {TARGET_FIT_SPEEDUP:.0f}x: "
                  f"{'met' if b['speedup'] >= TARGET_FIT_SPEEDUP else 'missed'}). {b['cpu_how']}; "
                  "at N = 1,000 the stacks are wider than d (d x d eigendecompositions the small fits "
                  "do not run), so the CPU figure is an estimate, likely low.", "",
                  "At equal N, both measured: " + ", ".join(
                      f"N = {n}: CPU {v['cpu_s']:.1f} s, device {v['device_s']:.1f} s"
                      for n, v in b["equal_n"].items()) + ".", ""]
    c = data.get("serving")
    if c:
        lines += [f"## (c) Mixed-batch serving, Llama-shaped decoder {c['config']} ({c['dtype']}, "
                  f"{c['batch_rows']} rows, prompt {c['prompt']}, {c['decode_steps']} decode steps, "
                  f"k = {c['k']}, "
                  f"mixed={c['mixed']})", "",
                  "| tasks | prefill tok/s | vs bare | decode tok/s | vs bare |", "|---|---|---|---|---|",
                  f"| bare model | {c['bare']['prefill_tok_s']:.0f} | 1.00 | "
                  f"{c['bare']['decode_tok_s']:.0f} | 1.00 |"]
        for r in c["rows"]:
            lines.append(f"| {r['tasks']} | {r['prefill_tok_s']:.0f} | {r['prefill_vs_bare']:.2f} | "
                         f"{r['decode_tok_s']:.0f} | {r['decode_vs_bare']:.2f} |")
        last = c["rows"][-1]["decode_vs_bare"]
        lines += ["", f"Decode at 32 tasks: {last:.2f}x the bare model (target >= {TARGET_DECODE_RATIO}x: "
                  f"{'met' if last >= TARGET_DECODE_RATIO else 'missed'}).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, seconds (a smoke test)")
    ap.add_argument("--device", help="cuda (default; with --quick, cpu where CUDA is absent), cuda:N, "
                    "or cpu (with --quick only)")
    ap.add_argument("--out", help="JSON path (default $OUT/gpu_check.json when $OUT is set)")
    ap.add_argument("--parts", default="agreement,serving,fit_time",
                    help="comma-separated subset of agreement, fit_time, serving (run in this order)")
    ap.add_argument("--fit-n", type=int, help="adapters in part (b) (default 1000)")
    args = ap.parse_args(argv)
    device = args.device or ("cpu" if args.quick and not torch.cuda.is_available() else "cuda")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here (torch.cuda.is_available() is False); "
              "run it on a GPU machine, or with --quick --device cpu as a smoke test", file=sys.stderr)
        return 2
    if not args.quick and torch.device(device).type == "cpu":
        print("gpu_check: the full sizes on the CPU would take hours (1,000 adapters of a 7B layer, "
              "a 2B-parameter decoder); add --quick", file=sys.stderr)
        return 2
    parts = {"agreement": agreement, "fit_time": fit_time, "serving": serving}
    unknown = [name for name in args.parts.split(",") if name not in parts]
    if unknown:
        print(f"gpu_check: unknown parts {unknown}; choose from {sorted(parts)}", file=sys.stderr)
        return 2
    p = dict(QUICK if args.quick else FULL)
    if args.fit_n:
        p["fit_n"] = args.fit_n
    out = args.out or (str(Path(os.environ["OUT"]) / "gpu_check.json") if os.environ.get("OUT") else None)
    if args.quick:
        torch.set_num_threads(1)  # tiny matrices: threads only wait on each other
    cuda = torch.device(device).type == "cuda"
    data = {"quick": args.quick, "device": device, "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name(device) if cuda else "CPU",
            "targets": {"fit_speedup": TARGET_FIT_SPEEDUP, "decode_vs_bare_at_32": TARGET_DECODE_RATIO}}
    start = time.perf_counter()
    failed = []
    for name in args.parts.split(","):
        t0 = time.perf_counter()
        print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
        try:
            data[name] = parts[name](p, device)
            data[name]["part_s"] = time.perf_counter() - t0
        except Exception:  # one part failing must not lose the others' measurements
            failed.append(name)
            data.setdefault("errors", {})[name] = traceback.format_exc()
            print(data["errors"][name], file=sys.stderr, flush=True)
        data["wall_s"] = time.perf_counter() - start
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(data, indent=1))
        print(f"[gpu_check] {name} {'FAILED' if name in failed else 'done'} after "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    print(markdown(data))
    if failed:
        print(f"gpu_check: parts failed: {', '.join(failed)} (tracebacks above and in the JSON)",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
