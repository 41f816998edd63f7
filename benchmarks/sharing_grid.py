"""The fidelity grid of issue 21: vlora (shared, private or hybrid, whichever ``compress``
chooses) against per-adapter truncated SVD at the same bytes, at {4, 10, 20}x of the
adapters' float32 LoRA bytes and {float32, 8, 6, 4} bits, on the shipped adapters and,
when built, on the benchmark test bed (``python -m benchmarks.testbed``).

``python -m benchmarks.sharing_grid [--sets shipped,one-seed,independent] [--name NAME]``
prints a markdown table (and with ``--name`` writes it, with the code and machine, to
``benchmarks/results/NAME.md``); every byte is the subspace directory's (``du``), and the
bound is ``max(1.01 B, B + 0.003)``, B the baseline's mean error.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time

from vlora.compress import compress, lora_bytes
from vlora.io import load_adapter

RATIOS = (4, 10, 20)
BITS = (None, 8, 6, 4)


def adapter_sets(names: list[str]) -> dict[str, list]:
    out = {}
    for name in names:
        if name == "shipped":
            from vlora.examples import example_adapter_dirs
            out[name] = example_adapter_dirs()
        else:
            from benchmarks.testbed import DEFAULT_ROOT, ensure
            out[name] = ensure(DEFAULT_ROOT, progress=False)[name]
    return out


def run(dirs: list, ratio: float, bits: int | None) -> dict:
    items = [load_adapter(d) for d in dirs]
    start = time.perf_counter()
    sub = compress(items, [str(d).rstrip("/").rsplit("/", 1)[-1] + f"#{i}" for i, d in enumerate(dirs)],
                   ratio=ratio, bits=bits)
    seconds = time.perf_counter() - start
    stats = sub.compression_stats()
    b, target = stats["svd_mean_error"], lora_bytes(items) / ratio
    bound = max(1.01 * b, b + 0.003)
    within = {n: e for n, (stored, e) in sub.fit_report.items() if stored <= target}
    return {"n": len(items), "ratio": ratio, "bits": bits or 32, "vlora": stats["mean_error"],
            "svd": b, "bound": bound, "ok": stats["mean_error"] <= bound,
            "chosen": min(within, key=within.get), "candidates": sub.fit_report,
            "stored_bytes": stats["stored_bytes"], "target_bytes": target,
            "disk_ratio": stats["compression_ratio"], "seconds": seconds}


HEADER = ("| set | N | target | bits | vlora | SVD (B) | bound | within | chosen | shared only | "
          "private, equal | folder bytes | s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def row_text(row: dict) -> str:
    c = row["candidates"]
    get = (lambda n: f"{c[n][1]:.4f}" if n in c else "-")  # noqa: E731
    return (f"| {row['set']} | {row['n']} | {row['ratio']:g}x | {row['bits']} | {row['vlora']:.4f} | "
            f"{row['svd']:.4f} | {row['bound']:.4f} | {'yes' if row['ok'] else 'NO'} | {row['chosen']} | "
            f"{get('shared')} | {get('private-equal')} | {row['stored_bytes']:,} | {row['seconds']:.0f} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", default="shipped")
    ap.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    ap.add_argument("--bits", default="32,8,6,4")
    ap.add_argument("--name", default=None,
                    help="write benchmarks/results/NAME.md and .json (the report quotes sharing_grid)")
    args = ap.parse_args(argv)
    rows = []
    print(HEADER, flush=True)
    for name, dirs in adapter_sets(args.sets.split(",")).items():
        for ratio in map(float, args.ratios.split(",")):
            for bits in (None if b == "32" else int(b) for b in args.bits.split(",")):
                rows.append({"set": name, **run(dirs, ratio, bits)})
                print(row_text(rows[-1]), flush=True)
    if args.name:
        from benchmarks.__main__ import RESULTS, machine
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or "unknown"
        met = sum(r["ok"] for r in rows)
        text = "\n".join([
            "# Shared and private parts against per-adapter SVD at the same bytes", "",
            f"`python -m benchmarks.sharing_grid --sets {args.sets} --name {args.name}` at commit "
            f"{commit}, {time.strftime('%Y-%m-%d')}.", "", machine(), "",
            "Mean relative dW error of every task against its original. vlora is what `compress` "
            "chose at the target (shared, private with equal bytes per task, private pooled over "
            "tasks, or the hybrid with half the bytes shared: the fit with the lowest mean error "
            "within the target); B is per-adapter truncated SVD at the same bytes per adapter in "
            "the same number format, charged its factors, block scales and an adapter_config.json, "
            "its rounding error counted. Targets are the adapters' float32 LoRA bytes over the ratio; "
            "folder bytes are the subspace directory's, heads apart (what `du -b` shows). The bound "
            "is max(1.01 B, B + 0.003).", "",
            f"**{met} of {len(rows)} cells at or under their bound.**", "", HEADER,
            *map(row_text, rows), ""])
        (RESULTS / f"{args.name}.md").write_text(text)
        (RESULTS / f"{args.name}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
