"""Scale: time and peak memory of building a subspace from N synthetic adapters.

Adapters are shaped like real ones (d=1024, r=16, 16 modules by default) and share a
planted 48-dimensional subspace per module plus noise, so the fit has real work to do.
Each build runs in a fresh subprocess whose peak RSS (VmHWM) is read, because
tracemalloc does not see torch tensors. Batch keeps every adapter in memory; streaming
keeps the bases plus one chunk.

    python -m benchmarks.scale --sizes 10 100 1000
    python -m benchmarks.scale --quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def make_adapters(root: Path, n: int, d: int, r: int, modules: int, dim: int = 48,
                  seed: int = 0) -> list[Path]:
    from vlora import LoRAWeights, save_adapter
    g = torch.Generator().manual_seed(seed)
    names = [f"model.layers.{i // 2}.self_attn.{'q' if i % 2 == 0 else 'v'}_proj"
             for i in range(modules)]
    bases = {m: (torch.linalg.qr(torch.randn(d, dim, generator=g))[0],
                 torch.linalg.qr(torch.randn(d, dim, generator=g))[0]) for m in names}
    paths = []
    for i in range(n):
        a = {m: torch.randn(r, dim, generator=g) @ v.T + 0.05 * torch.randn(r, d, generator=g)
             for m, (_, v) in bases.items()}
        b = {m: u @ torch.randn(dim, r, generator=g) + 0.05 * torch.randn(d, r, generator=g)
             for m, (u, _) in bases.items()}
        path = root / f"adapter_{i:05d}"
        save_adapter(LoRAWeights(names, a, b, {m: 2.0 for m in names},
                                 config={"r": r, "lora_alpha": 2 * r}), path)
        paths.append(path)
    return paths


CHILD = r"""
import json, sys, time, torch
from pathlib import Path
from vlora import SharedSubspace
mode, root, k, iters = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
paths = sorted(root.iterdir())
t0 = time.perf_counter()
if mode == "streaming":
    sub = SharedSubspace.from_adapters_streaming(paths, num_components=k)
else:
    sub = SharedSubspace.from_adapters(paths, num_components=k, refine_iters=iters)
seconds = time.perf_counter() - t0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
stats = sub.compression_stats()
print(json.dumps({"seconds": seconds, "peak_rss_mb": int(hwm) / 1024,
                  "mean_error": stats["mean_error"], "ratio": stats["compression_ratio"]}))
"""


def run_child(mode: str, root: Path, k: int, iters: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(root), str(k), str(iters)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def baseline_rss() -> float:
    code = ("import torch, vlora; print([l for l in open('/proc/self/status') "
            "if l.startswith('VmHWM')][0].split()[1])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--modules", type=int, default=16)
    ap.add_argument("--k", type=int, default=48)
    ap.add_argument("--refine-iters", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="small sizes, for CI")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.d, args.modules, args.k = [8, 32], 256, 4, 24
    results = {"config": vars(args), "torch_threads": torch.get_num_threads(),
               "baseline_rss_mb": baseline_rss(), "rows": []}
    tmp = Path(tempfile.mkdtemp(prefix="vlora-scale-"))
    try:
        for n in args.sizes:
            root = tmp / f"n{n}"
            root.mkdir()
            make_adapters(root, n, args.d, args.r, args.modules)
            disk = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
            for mode in ("batch", "streaming"):
                row = {"n": n, "mode": mode, "adapters_mb": disk / 2**20,
                       **run_child(mode, root, args.k, args.refine_iters)}
                print(json.dumps(row), flush=True)
                results["rows"].append(row)
            shutil.rmtree(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    name = "scale_quick" if args.quick else "scale"
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1))
    lines = [f"# Scale ({args.d}x{args.d}, r={args.r}, {args.modules} modules, k={args.k})", "",
             f"Python-process baseline RSS: {results['baseline_rss_mb']:.0f} MB", "",
             "| N | mode | seconds | s per adapter | peak RSS MB | adapters on disk MB | mean err |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['n']} | {r['mode']} | {r['seconds']:.1f} | {r['seconds'] / r['n']:.3f} "
                     f"| {r['peak_rss_mb']:.0f} | {r['adapters_mb']:.0f} | {r['mean_error']:.4f} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
