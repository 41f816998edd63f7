"""The fidelity grid of issue 21: vlora (shared, private or hybrid, whichever ``compress``
chooses) against per-adapter truncated SVD at the same bytes, at {4, 10, 20}x of the
adapters' float32 LoRA bytes and {float32, 8, 6, 4} bits, on the shipped adapters and,
when built, on the benchmark test bed (``python -m benchmarks.testbed``).

``python -m benchmarks.sharing_grid [--sets shipped,one-seed,independent] [--out FILE]``
prints a markdown table; every byte is the subspace directory's (``du``), and the bound
is ``max(1.01 B, B + 0.003)``, B the baseline's mean error.
"""

from __future__ import annotations

import argparse
import json
import time

from vlora.compress import compress
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
    stats = sub.compression_stats()
    b = stats["svd_mean_error"]
    chosen = min(sub.fit_report, key=lambda n: sub.fit_report[n][1])
    return {"n": len(items), "ratio": ratio, "bits": bits or 32, "vlora": stats["mean_error"],
            "svd": b, "bound": max(1.01 * b, b + 0.003), "ok": stats["mean_error"] <= max(1.01 * b, b + 0.003),
            "chosen": chosen, "candidates": sub.fit_report, "stored_bytes": stats["stored_bytes"],
            "disk_ratio": stats["compression_ratio"], "seconds": time.perf_counter() - start}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", default="shipped")
    ap.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    ap.add_argument("--bits", default="32,8,6,4")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    rows = []
    print("| set | N | ratio | bits | vlora | SVD (B) | bound | within | chosen | shared-only | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, dirs in adapter_sets(args.sets.split(",")).items():
        for ratio in map(float, args.ratios.split(",")):
            for bits in (None if b == "32" else int(b) for b in args.bits.split(",")):
                row = {"set": name, **run(dirs, ratio, bits)}
                rows.append(row)
                shared = row["candidates"].get("shared", (0, float("nan")))[1]
                print(f"| {name} | {row['n']} | {ratio:g}x | {row['bits']} | {row['vlora']:.4f} | "
                      f"{row['svd']:.4f} | {row['bound']:.4f} | {'yes' if row['ok'] else 'NO'} | "
                      f"{row['chosen']} | {shared:.4f} | {row['seconds']:.0f} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
