"""Distributed fit: single-process streaming against Ray with 1 and 2 workers.

Adapters shaped like Llama-7B layers (q/k/v/o 4096x4096, gate/up 11008x4096, down
4096x11008, r=16) for ``--layers`` layers, sharing a planted 48-dimensional subspace per
module plus noise, are written to a temporary folder. Each fit runs in a fresh subprocess
with one thread per process: streaming (``from_adapters_streaming``, k=16) and
``from_adapters_distributed`` on a local Ray cluster of 1 or 2 CPUs (k=16, oversample 8,
10 refinement rounds). Reported: the fit's seconds (Ray's start apart), seconds per
adapter-module, the driver's peak RSS and the largest worker's (VmHWM, read from every
Ray worker before shutdown; and its private and object-store parts, sampled), the mean error, and the bytes of one module's sketch (what
a merge moves), from which a cluster's time is predicted as
``seconds per adapter-module x N x modules / workers`` plus the merges.

Each fit runs ``--repeats`` times (the order of the kinds alternating) and the median
is reported beside the spread; the results go to ``results/<name>.json`` and ``.md``.

    python -m benchmarks.distributed --n 256 --layers 1 --repeats 3 --name distributed
    nice -n 10 python -m benchmarks.distributed --n 64 --workers 0,2

Timings need a quiet machine: with other work running, two workers wait for two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import commit

SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096),
          "o_proj": (4096, 4096), "gate_proj": (11008, 4096), "up_proj": (11008, 4096),
          "down_proj": (4096, 11008)}
MLP = ("gate_proj", "up_proj", "down_proj")
K, OVERSAMPLE = 16, 8


def make_adapters(root: Path, n: int, layers: int, r: int = 16, dim: int = 48) -> list[Path]:
    from vlora import LoRAWeights, save_adapter
    g = torch.Generator().manual_seed(0)
    shapes = {f"model.layers.{i}.{'mlp' if m in MLP else 'self_attn'}.{m}": s
              for i in range(layers) for m, s in SHAPES.items()}
    bases = {m: (torch.linalg.qr(torch.randn(d_out, dim, generator=g))[0],
                 torch.linalg.qr(torch.randn(d_in, dim, generator=g))[0])
             for m, (d_out, d_in) in shapes.items()}
    paths = []
    for i in range(n):
        a = {m: torch.randn(r, dim, generator=g) @ v.T + 0.05 * torch.randn(r, v.shape[0], generator=g)
             for m, (_, v) in bases.items()}
        b = {m: u @ torch.randn(dim, r, generator=g) + 0.05 * torch.randn(u.shape[0], r, generator=g)
             for m, (u, _) in bases.items()}
        paths.append(root / f"adapter_{i:05d}")
        save_adapter(LoRAWeights(list(shapes), a, b, {m: 2.0 for m in shapes},
                                 config={"r": r, "lora_alpha": 2 * r}), paths[-1])
    return paths


CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from vlora import SharedSubspace
req = json.loads(sys.stdin.read())

def hwm(pid="self"):
    return int([l for l in open(f"/proc/{pid}/status") if l.startswith("VmHWM")][0].split()[1]) / 1024

row = {}
if req["workers"] == 0:
    t0 = time.perf_counter()
    sub = SharedSubspace.from_adapters_streaming(req["paths"], num_components=req["k"])
    row["seconds"] = time.perf_counter() - t0
else:
    import logging, threading, psutil, ray

    def workers():
        out = []
        for p in psutil.Process().children(recursive=True):
            try:
                if any(c.startswith("ray::") for c in p.cmdline()[:1]):
                    out.append(p)
            except psutil.Error:
                pass
        return out

    peaks, stop = {}, threading.Event()

    def sample():  # VmHWM has no private/shared split: RssAnon and RssShmem sampled instead
        while not stop.wait(0.2):
            for p in workers():
                try:
                    fields = dict(l.split(":") for l in open(f"/proc/{p.pid}/status") if l.startswith("Rss"))
                except OSError:
                    continue
                for k in ("RssAnon", "RssShmem"):
                    mb = int(fields[k].split()[0]) / 1024
                    peaks[k] = max(peaks.get(k, 0), mb)

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=req["workers"], include_dashboard=False, logging_level=logging.WARNING)
    row["ray_start_seconds"] = time.perf_counter() - t0
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    sub = SharedSubspace.from_adapters_distributed(req["paths"], num_components=req["k"],
                                                   oversample=req["oversample"], shard_size=req["shard"])
    row["seconds"] = time.perf_counter() - t0
    stop.set()
    sampler.join()
    seen = workers()
    row["worker_peak_rss_mb"] = max(hwm(p.pid) for p in seen)
    row["worker_peak_private_mb"] = peaks["RssAnon"]
    row["worker_peak_shared_mb"] = peaks["RssShmem"]
    row["workers_seen"] = len(seen)
    ray.shutdown()
row["driver_peak_rss_mb"] = hwm()
row["mean_error"] = sub.compression_stats()["mean_error"]
print(json.dumps(row))
"""


def run(req: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD], input=json.dumps(req), env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=32, help="adapters")
    parser.add_argument("--layers", type=int, default=1, help="Llama-7B layers per adapter (7 modules each)")
    parser.add_argument("--shard", type=int, default=8, help="adapters per Ray task")
    parser.add_argument("--workers", default="0,1,2", help="fits to run: 0 streaming, w Ray with w workers")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each fit (the median is reported)")
    parser.add_argument("--name", default=None, help="write results/<name>.json and .md")
    args = parser.parse_args(argv)
    modules = 7 * args.layers
    kinds = list(map(int, args.workers.split(",")))
    runs: dict[int, list[dict]] = {w: [] for w in kinds}
    with tempfile.TemporaryDirectory(prefix="vlora-bench-dist-") as tmp:
        start = time.perf_counter()
        paths = [str(p) for p in make_adapters(Path(tmp), args.n, args.layers)]
        written = time.perf_counter() - start
        disk = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        for rep in range(args.repeats):  # kinds alternate, so a slow spell hits each alike
            for workers in kinds if rep % 2 == 0 else kinds[::-1]:
                runs[workers].append(run({"paths": paths, "workers": workers, "k": K,
                                          "oversample": OVERSAMPLE, "shard": args.shard}))
                print(_name(workers), json.dumps(runs[workers][-1]), flush=True)
    rows = {_name(w): _median_row(rs, args.n * modules) for w, rs in runs.items()}
    w = K + OVERSAMPLE
    sketch = {m: 8 * ((d_out + d_in) * w + 2 * w * w) for m, (d_out, d_in) in SHAPES.items()}
    result = {"n": args.n, "layers": args.layers, "modules": modules, "shard": args.shard,
              "repeats": args.repeats, "rows": rows, "sketch_bytes_per_module": sketch,
              "adapter_bytes_on_disk": disk, "write_seconds": written,
              "load_average": os.getloadavg(), "commit": commit()}
    print(json.dumps(result, indent=1))
    if args.name:
        out = Path(__file__).parent / "results"
        (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
        (out / f"{args.name}.md").write_text(report(result))
    return result


def _name(workers: int) -> str:
    return "streaming (1 process)" if workers == 0 else f"Ray, {workers} worker{'s' * (workers > 1)}"


def _median_row(runs: list[dict], adapter_modules: int) -> dict:
    seconds = [r["seconds"] for r in runs]
    row = {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}
    row["seconds_all"] = seconds
    row["seconds_per_adapter_module"] = row["seconds"] / adapter_modules
    return row


def report(r: dict) -> str:
    rows = r["rows"]
    single = rows.get("streaming (1 process)", {}).get("seconds")
    lines = [f"# Distributed fit: {r['n']} adapters of {r['layers']} Llama-7B layer(s) ({r['modules']} "
             f"modules, r = 16, {r['adapter_bytes_on_disk'] / 1e9:.2f} GB on disk)", "",
             f"k = {K}, oversample {OVERSAMPLE}, {r['shard']} adapters per Ray task, one thread per "
             f"process; median of {r['repeats']} run(s) of each (all runs' seconds in brackets); load "
             f"average after the runs {r['load_average'][0]:.2f}; commit {r['commit']}.", "",
             "Worker memory: the largest worker's peak RSS (VmHWM, which counts the object store's "
             "pages the worker touched) and, sampled every 0.2 s, the largest private (RssAnon) and "
             "object-store (RssShmem) parts of any worker.", "",
             "| fit | seconds | speed-up | s per adapter-module | driver peak RSS MB | "
             "largest worker peak RSS MB | private MB | object store MB | mean error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        speed = f"{single / row['seconds']:.2f}x" if single else "-"
        worker = " | ".join(f"{row[k]:.0f}" if k in row else "-" for k in
                            ("worker_peak_rss_mb", "worker_peak_private_mb", "worker_peak_shared_mb"))
        each = ", ".join(f"{s:.1f}" for s in row["seconds_all"])
        lines.append(f"| {name} | {row['seconds']:.1f} [{each}] | "
                     f"{speed} | {row['seconds_per_adapter_module']:.4f} | {row['driver_peak_rss_mb']:.0f} | "
                     f"{worker} | {row['mean_error']:.4f} |")
    sketch = r["sketch_bytes_per_module"]
    lines += ["", "Cost model: a cluster of W workers takes about (s per adapter-module) x N x modules / W, "
              "plus a tree of sketch merges; one module's sketch is "
              + ", ".join(f"{m} {b / 1e6:.2f} MB" for m, b in sketch.items()) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
