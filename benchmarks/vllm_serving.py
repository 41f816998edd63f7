"""vLLM serving tasks of a subspace by name vs the same tasks from PEFT folders (issue 24).

One ``vlora serve`` start (SmolLM2-135M, float32, ``--enforce-eager``) serves both arms
side by side, so a shared machine's drift hits them alike:

* subspace: the task ids of a vlora subspace, resolved by vlora's plugin (exported on
  first use);
* PEFT folders: the same tasks' vLLM exports in a folder that vLLM's own filesystem
  resolver serves (``VLLM_LORA_RESOLVER_CACHE_DIR``), names ``peft-<task>``.

Measured: disk bytes (subspace directory vs the PEFT folders); first-request latency
(one token, the adapter not yet loaded) and a second request's; tokens/s with 1, 4, 16 and
32 distinct tasks in flight (one concurrent request per task: a prompt of
``--prompt-tokens`` tokens, ``--new-tokens`` greedy tokens, EOS ignored), best of
``--repeats`` rounds, arms alternating. The adapters (rank ``--rank`` on q/k/v/o/gate/up/down)
are planted in a ``--k``-dimensional subspace per module side, as in benchmarks/serving.py.

    python -m benchmarks.vllm_serving            # needs scripts/vllm_env.sh's environment

Writes ``benchmarks/results/vllm_serving.json`` and ``.md``.
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

HERE = Path(__file__).parent
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _planted(base: Path, n: int, r: int, k: int, seed: int = 0):
    from vlora.adapter import LoRAWeights

    c = json.loads((base / "config.json").read_text())
    h, inter, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["head_dim"]
    dims = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
            "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    g = torch.Generator().manual_seed(seed)
    shapes = {f"model.layers.{i}.{'mlp' if m in MODULES[4:] else 'self_attn'}.{m}": dims[m]
              for i in range(c["num_hidden_layers"]) for m in MODULES}
    bases = {m: (torch.linalg.qr(torch.randn(o, k, generator=g))[0],
                 torch.linalg.qr(torch.randn(i, k, generator=g))[0]) for m, (o, i) in shapes.items()}
    out = []
    for _ in range(n):
        a = {m: torch.randn(r, k, generator=g) @ v.T * 0.5 for m, (_, v) in bases.items()}
        b = {m: u @ torch.randn(k, r, generator=g) * 0.02 for m, (u, _) in bases.items()}
        config = {"r": r, "lora_alpha": r, "target_modules": list(MODULES), "peft_type": "LORA",
                  "task_type": "CAUSAL_LM", "bias": "none", "base_model_name_or_path": str(base)}
        out.append(LoRAWeights(list(shapes), a, b, {m: 1.0 for m in shapes}, {}, config, None))
    return out


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, limit_s: float = 900) -> None:
    """Return once the server at ``url`` answers /health; exit naming ``log`` if it dies or
    takes over ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=5).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start; see {log}") from None
            time.sleep(2)


def _complete(url: str, model: str, prompt: list[int], n: int) -> int:
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())["usage"]["completion_tokens"]


def _throughput(url: str, names: list[str], prompt: list[int], n: int) -> float:
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(len(names)) as pool:
        tokens = sum(pool.map(lambda m: _complete(url, m, prompt, n), names))
    return tokens / (time.perf_counter() - start)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--k", type=int, default=24)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--in-flight", default="1,4,16,32")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    from vlora.io import save_adapter
    from vlora.subspace import SharedSubspace
    from vlora.testbed.llm import ensure_base

    base = ensure_base()
    work = Path(tempfile.mkdtemp(prefix="vlora-vllm-bench-"))
    ids = [f"t{i}" for i in range(args.tasks)]
    sub = SharedSubspace.from_adapters(_planted(base, args.tasks, args.rank, args.k), task_ids=ids,
                                       num_components=args.k)
    sub.save(work / "sub")
    for t in ids:
        save_adapter(sub.reconstruct(t), work / "peft" / f"peft-{t}", for_vllm=True)
    disk = {"subspace": _bytes(work / "sub"), "peft_folders": _bytes(work / "peft")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1",
           "VLLM_LORA_RESOLVER_CACHE_DIR": str(work / "peft")}
    cmd = [sys.executable, "-c", "from vlora.cli import main; main()", "serve", str(work / "sub"),
           "--model", str(base), "--cache", str(work / "cache"), "--host", "127.0.0.1",
           "--port", str(port), "--enforce-eager", "--max-model-len", "512",
           "--max-loras", str(args.tasks), "--max-cpu-loras", str(2 * args.tasks),
           "--max-adapter-folders", str(2 * args.tasks)]
    log = (work / "serve.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    prompt = list(range(1000, 1000 + args.prompt_tokens))
    result = {"args": vars(args), "disk_bytes": disk, "first_request_s": {}, "second_request_s": {},
              "tokens_per_s": {}}
    try:
        wait_healthy(url, proc, work / "serve.log")
        arms = {"subspace": ids, "peft_folders": [f"peft-{t}" for t in ids]}
        for arm, names in arms.items():
            # the first task (the resolver reads the subspace then), its second request,
            # and another task's first request (subspace already read)
            for key, name in (("first_request_s", names[0]), ("second_request_s", names[0]),
                              ("another_task_first_s", names[1])):
                start = time.perf_counter()
                _complete(url, name, prompt, 1)
                result.setdefault(key, {})[arm] = time.perf_counter() - start
            for name in names[2:]:  # every adapter loaded before the timed rounds
                _complete(url, name, prompt, 1)
        result["tokens_per_s"]["base"] = {}
        for c in [int(x) for x in args.in_flight.split(",")]:
            for arm in ("base", *arms):
                names = [str(base)] * c if arm == "base" else arms[arm][:c]
                best = max(_throughput(url, names, prompt, args.new_tokens)
                           for _ in range(args.repeats))
                result["tokens_per_s"].setdefault(arm, {})[c] = best
                print(f"{c:>3} in flight  {arm:<13} {best:8.1f} tokens/s", flush=True)
        result["load_average"] = os.getloadavg()
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "vllm_serving.json").write_text(json.dumps(result, indent=1))
    tps = result["tokens_per_s"]
    lines = ["| in flight | base tokens/s | subspace tokens/s | PEFT folders tokens/s | subspace / PEFT |",
             "|---:|---:|---:|---:|---:|"]
    for c in tps["subspace"]:
        lines.append(f"| {c} | {tps['base'][c]:.1f} | {tps['subspace'][c]:.1f} | "
                     f"{tps['peft_folders'][c]:.1f} | {tps['subspace'][c] / tps['peft_folders'][c]:.2f} |")
    lines += ["", f"disk: subspace {disk['subspace'] / 1e6:.1f} MB, PEFT folders "
              f"{disk['peft_folders'] / 1e6:.1f} MB; first request (1 token, adapter not loaded): "
              f"subspace {result['first_request_s']['subspace']:.2f} s, PEFT folder "
              f"{result['first_request_s']['peft_folders']:.2f} s; second: subspace "
              f"{result['second_request_s']['subspace']:.2f} s, PEFT folder "
              f"{result['second_request_s']['peft_folders']:.2f} s; another task's first: "
              f"subspace {result['another_task_first_s']['subspace']:.2f} s, PEFT folder "
              f"{result['another_task_first_s']['peft_folders']:.2f} s; load average "
              f"{result['load_average'][0]:.1f} on {os.cpu_count()} cores"]
    (HERE / "results" / "vllm_serving.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)  # ~20 MB per PEFT folder (kept on failure, with the log)


if __name__ == "__main__":
    main()
