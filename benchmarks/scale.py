"""Scale: time and peak memory of building a subspace from N synthetic adapters, against
vlora-dev 1.0.0, and the time of absorbing one more adapter at that N.

Two shape families: square 1024x1024 modules (r=16), and a 7B model's q/v projections
(4096x4096, r=16) for as many modules as the time allows. Adapters share a planted
48-dimensional subspace per module plus noise, so the fit has real work to do. They are
written to a temporary folder (deleted after each family), N+1 of them: every N takes the
first N, the last one is absorbed. Each build runs in a fresh subprocess whose peak RSS
(VmHWM) is read, because tracemalloc does not see torch tensors. Batch keeps every adapter
in memory; streaming keeps the bases plus one chunk. vlora-dev runs in its own venv
(vlora_dev.py) with the same k per module and side; it has no byte budget.

Each family writes its own ``results/scale.<family>.json``; ``scale.json`` and ``scale.md``
are merged from those present, so the suite can run the two families in different lanes
(and one family can be re-run alone).

    python -m benchmarks.scale
    python -m benchmarks.scale --families 7b-qv
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
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
METHODS = ("vlora", "vlora-dev 1.0.0")
FAMILIES = ("square", "7b-qv")


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
import copy, json, sys, time, torch
from pathlib import Path
from vlora import SharedSubspace, load_adapter
torch.set_num_threads(1)
req = json.loads(sys.stdin.read())
paths = [Path(p) for p in req["paths"]]
t0 = time.perf_counter()
if req["mode"] == "streaming":
    sub = SharedSubspace.from_adapters_streaming(paths, num_components=req["k"])
else:
    sub = SharedSubspace.from_adapters(paths, num_components=req["k"], refine_iters=req["refine_iters"])
row = {"seconds": time.perf_counter() - t0}
row["peak_rss_mb"] = int([l for l in open("/proc/self/status")
                          if l.startswith("VmHWM")][0].split()[1]) / 1024
stats = sub.compression_stats()
row.update(stored_mb=stats["stored_bytes"] / 2**20, ratio=stats["compression_ratio"],
           k=max(max(b.k_out, b.k_in) for b in sub.modules.values()), mean_error=stats["mean_error"])
if req["absorb"]:
    extra, twin = load_adapter(req["absorb"]), copy.deepcopy(sub)
    t0 = time.perf_counter()
    twin.absorb_incremental(extra, "absorbed")
    row["absorb_incremental_seconds"] = time.perf_counter() - t0
    if req.get("absorb_full", True):
        t0 = time.perf_counter()
        sub.absorb(extra, "absorbed", refine_iters=req["refine_iters"])
        row["absorb_seconds"] = time.perf_counter() - t0
print(json.dumps(row))
"""


def child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run_vlora(req: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD], input=json.dumps(req), env=child_env(),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def baseline_rss() -> float:
    code = ("import torch, vlora; print([l for l in open('/proc/self/status') "
            "if l.startswith('VmHWM')][0].split()[1])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


def skip_reason(fam: dict, n: int, method: str, what: str, dev: bool) -> str | None:
    """Why ``what`` (a build mode, or "absorb") of ``method`` is not run at N=n, or None."""
    if method != "vlora" and not dev:
        return "vlora-dev not run"
    limit = fam["limits"].get((method, what))
    return f"N > {limit[0]}: {limit[1]}" if limit and n > limit[0] else None


def run_family(fam: dict, args, dev: bool, tmp: Path) -> tuple[dict, list[dict]]:
    """Every build of one shape family at each N, adapters generated once for the largest N.
    Each method absorbs one more adapter after its first build at each N.
    Returns the family's description (with what was skipped) and its rows."""
    from benchmarks import vlora_dev
    root = tmp / fam["name"]
    t0 = time.perf_counter()
    paths = make_adapters(root, max(fam["sizes"]) + 1, fam["d"], fam["r"], fam["modules"])
    extra = paths.pop()
    out = {**{k: v for k, v in fam.items() if k != "limits"}, "generate_seconds": time.perf_counter() - t0,
           "skipped": []}
    rows = []
    print(f"{fam['name']}: {len(paths) + 1} adapters in {out['generate_seconds']:.0f} s", flush=True)

    def skip(n, method, what, why):
        out["skipped"].append({"n": n, "method": method, "mode": what, "why": why})
        print(f"  skip N={n} {method} {what}: {why}", flush=True)

    for n in fam["sizes"]:
        disk = sum(f.stat().st_size for p in paths[:n] for f in p.iterdir())
        for method in METHODS:
            absorb = True
            for mode in ("batch", "streaming"):
                why = skip_reason(fam, n, method, mode, dev)
                if why:
                    skip(n, method, mode, why)
                    continue
                req = {"paths": [str(p) for p in paths[:n]], "mode": mode, "k": args.k,
                       "refine_iters": args.refine_iters, "absorb": str(extra) if absorb else None}
                if absorb and (why := skip_reason(fam, n, method, "absorb", dev)):
                    skip(n, method, "absorb", why)
                    req["absorb_full"] = False
                absorb = False
                try:
                    row = run_vlora(req) if method == "vlora" else vlora_dev.call({"op": "scale", **req})
                except subprocess.CalledProcessError as e:
                    skip(n, method, mode, f"failed: {e.stderr.strip().splitlines()[-1:]}")
                    continue
                except vlora_dev.VloraDevUnavailable as e:
                    skip(n, method, mode, f"failed: {e}")
                    continue
                row = {"family": fam["name"], "n": n, "method": method, "mode": mode,
                       "adapters_mb": disk / 2**20, **row}
                print("  " + json.dumps(row), flush=True)
                rows.append(row)
    shutil.rmtree(root)
    return out, rows


def families(args) -> list[dict]:
    """The shape families and, per (method, build mode or absorb), the largest N run."""
    dev = "vlora-dev 1.0.0"
    stream_dev = "vlora-dev's streaming re-projects every earlier task per adapter, O(N^2)"
    batch_7b = ("a batch build holds every adapter in memory and grows linearly from its N=100 "
                "time: about 10x that, over the suite's time budget (vlora streams)")
    if args.quick:
        return [{"name": "quick", "label": "256x256", "d": 256, "r": 16, "modules": 4,
                 "sizes": [8, 32], "limits": {}}]
    return [
        {"name": "square", "label": "1024x1024", "d": 1024, "r": 16, "modules": args.modules,
         "sizes": args.sizes,
         "limits": {(dev, "streaming"): (args.dev_stream_max, stream_dev),
                    (dev, "absorb"): (args.dev_absorb_max, "vlora-dev's absorb is a batch rebuild "
                                      "on N+1 reconstructed adapters, over the time budget")}},
        {"name": "7b-qv", "label": "4096x4096 (7B q/v)", "d": 4096, "r": 16,
         "modules": args.modules_7b, "sizes": args.sizes_7b,
         "limits": {("vlora", "absorb"): (args.absorb_max_7b, "vlora's full absorb costs a batch refit"),
                    ("vlora", "batch"): (args.batch_max_7b, batch_7b),
                    (dev, "batch"): (args.batch_max_7b, batch_7b),
                    (dev, "streaming"): (args.dev_stream_max_7b, stream_dev)}},
    ]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000], help="N, 1024x1024 family")
    ap.add_argument("--modules", type=int, default=2, help="modules, 1024x1024 family")
    ap.add_argument("--sizes-7b", type=int, nargs="+", default=[10, 100, 1000], help="N, 7B q/v family")
    ap.add_argument("--modules-7b", type=int, default=2, help="modules, 7B q/v family")
    ap.add_argument("--dev-stream-max", type=int, default=100, help="largest N vlora-dev streams")
    ap.add_argument("--dev-stream-max-7b", type=int, default=10, help="the same, 7B q/v family")
    ap.add_argument("--dev-absorb-max", type=int, default=100, help="largest N of vlora-dev's absorb")
    ap.add_argument("--absorb-max-7b", type=int, default=10, help="largest N of vlora's full absorb, 7B")
    ap.add_argument("--batch-max-7b", type=int, default=100, help="largest N of batch builds, 7B")
    ap.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES),
                    help="shape families to run (the others keep their last results)")
    ap.add_argument("--k", type=int, default=48, help="components per module and side, both libraries")
    ap.add_argument("--refine-iters", type=int, default=2)
    ap.add_argument("--no-vlora-dev", action="store_true")
    ap.add_argument("--quick", action="store_true", help="small sizes, for CI")
    ap.add_argument("--no-merge", action="store_true",
                    help="write the family files only (the suite merges once every lane is done)")
    args = ap.parse_args(argv)
    if args.quick:
        args.k = 24
    torch.set_num_threads(1)
    common = {"config": vars(args), "torch_threads": 1, "cpus": os.cpu_count(),
              "baseline_rss_mb": baseline_rss()}
    dev = not args.no_vlora_dev
    if dev:
        from benchmarks.vlora_dev import VloraDevUnavailable, call
        try:
            common["vlora_dev_baseline_rss_mb"] = call({"op": "version"})["peak_rss_mb"]
        except VloraDevUnavailable as e:
            dev, common["vlora_dev_not_run"] = False, str(e)
            print(f"vlora-dev not run: {e}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="vlora-scale-"))
    try:
        for fam in families(args):
            if not args.quick and fam["name"] not in args.families:
                continue
            t_start = time.perf_counter()
            meta, rows = run_family(fam, args, dev, tmp)
            meta.update(date=time.strftime("%Y-%m-%d"), k=args.k, refine_iters=args.refine_iters,
                        vlora_dev_run=dev)
            out = RESULTS / f"scale.{fam['name']}.json"
            part = out.with_suffix(".json.part")  # a reader never sees half a file
            part.write_text(json.dumps({**common, "family": meta, "rows": rows,
                                        "seconds": time.perf_counter() - t_start}, indent=1))
            os.replace(part, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {} if args.no_merge else merge(args.quick)


def merge(quick: bool = False) -> dict:
    """``scale(_quick).json`` and ``.md`` from the families' result files there are."""
    names = ["quick"] if quick else FAMILIES
    parts = [json.loads(f.read_text()) for n in names if (f := RESULTS / f"scale.{n}.json").exists()]
    if not parts:
        return {}
    results = {**{k: v for k, v in parts[-1].items() if k not in ("family", "rows", "seconds")},
               "families": [p["family"] for p in parts], "rows": [r for p in parts for r in p["rows"]],
               "seconds": {p["family"]["name"]: p["seconds"] for p in parts}}
    name = "scale_quick" if quick else "scale"
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1))
    (RESULTS / f"{name}.md").write_text(report(results))
    print(report(results))
    return results


def report(results: dict) -> str:
    cfg = results["config"]
    lines = ["# Scale: building a subspace from N synthetic adapters, vlora against vlora-dev 1.0.0", "",
             f"{results['cpus']} CPUs, torch at 1 thread; one run per cell; the same k per module "
             "and side for both libraries (vlora-dev has no byte budget; each family says its k "
             "and vlora's refine_iters of the batch fit and full absorb). Adapters are generated to a "
             "temporary "
             "folder that is deleted after each family. Peak RSS is the whole process's "
             f"(baseline with torch imported: vlora {results['baseline_rss_mb']:.0f} MB"
             + (f", vlora-dev {results['vlora_dev_baseline_rss_mb']:.0f} MB"
                if "vlora_dev_baseline_rss_mb" in results else "")
             + "). Mean error is the relative dW error over tasks. Baseline: vlora-dev 1.0.0 "
             "(PyPI), run in its own venv.", ""]
    if "vlora_dev_not_run" in results:
        lines += [f"vlora-dev not run (the last family run): {results['vlora_dev_not_run']}", ""]
    for fam in results["families"]:
        lines += [f"## {fam['label']}, r={fam['r']}, {fam['modules']} modules", "",
                  (f"Run on {fam['date']}, " if "date" in fam else "")
                  + f"k={fam.get('k', cfg['k'])}, refine_iters="
                  f"{fam.get('refine_iters', cfg['refine_iters'])}"
                  + ("" if fam.get("vlora_dev_run", True) else ", vlora-dev not run")
                  + f". Generating {max(fam['sizes']) + 1} adapters took "
                  f"{fam['generate_seconds']:.0f} s.", "",
                  "| N | method | mode | seconds | s per adapter | peak RSS MB | k | stored MB | ratio "
                  "| mean err | adapters on disk MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        rows = [r for r in results["rows"] if r["family"] == fam["name"]]
        for r in rows:
            lines.append(f"| {r['n']} | {r['method']} | {r['mode']} | {r['seconds']:.1f} "
                         f"| {r['seconds'] / r['n']:.3f} | {r['peak_rss_mb']:.0f} | {r['k']} "
                         f"| {r['stored_mb']:.1f} | {r['ratio']:.1f}x | {r['mean_error']:.4f} "
                         f"| {r['adapters_mb']:.0f} |")
        lines += ["", "Absorbing one more adapter into the subspace just built at N (seconds; "
                  "vlora: absorb refits on every stored task, absorb_incremental updates the bases "
                  "only; vlora-dev: absorb reruns its SVD on every reconstructed task):", "",
                  "| N | method | after | absorb | absorb_incremental |", "|---|---|---|---|---|"]
        for r in rows:
            if "absorb_incremental_seconds" in r:
                full = r.get("absorb_seconds")
                lines.append(f"| {r['n']} | {r['method']} | {r['mode']} "
                             f"| {'skipped' if full is None else f'{full:.2f}'} "
                             f"| {r['absorb_incremental_seconds']:.2f} |")
        if fam["skipped"]:
            lines += ["", "Skipped:", ""]
            lines += [f"- N={s['n']} {s['method']} {s['mode']}: {s['why']}" for s in fam["skipped"]]
        lines.append("")
    lines.append("Seconds per family: "
                 + ", ".join(f"{k} {v:.0f}" for k, v in results["seconds"].items()) + ".")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
