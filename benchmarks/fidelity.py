"""Fidelity against bytes on real MiniLM adapters, beside every baseline of DESIGN.md section 6.

For each regime (all adapters from one init seed, as transformers' Trainer gives by
default; or from independent seeds) and each N, at a fixed ratio of LoRA bytes:

* vlora: a subspace fitted by byte budget (float32 bases + coordinates);
* per-adapter truncated SVD at the same total bytes (no sharing at all);
* flattened-factor PCA, the method of vlora-dev 1.0 (PCA over tasks of each module's
  flattened A and B, here re-implemented from its description), at the same bytes;
* the mean adapter (a basis that learnt nothing);
* held-out adapters, only projected onto a subspace fitted without them.

Errors are relative dW errors, averaged over tasks. Accuracy kept (exported adapters
re-scored with PEFT on each task's held-out split) is measured for one ratio.

    python -m benchmarks.fidelity --one-seed DIR... --independent DIR...
"""

from __future__ import annotations

import math
import statistics

import torch

from vlora import LoRAWeights, SharedSubspace
from vlora.stats import svd_baseline_error

F64 = torch.float64


def lora_bytes(adapters: list[LoRAWeights]) -> int:
    return 4 * sum(a.num_lora_params() for a in adapters)


def dense(a: LoRAWeights) -> dict[str, torch.Tensor]:
    return {m: a.delta_weight(m) for m in a.layer_names}


def rel_error(ref: dict[str, torch.Tensor], approx: dict[str, torch.Tensor]) -> float:
    num = sum(float((ref[m] - approx[m]).square().sum()) for m in ref)
    return math.sqrt(num / sum(float(ref[m].square().sum()) for m in ref))


def mean_adapter_errors(adapters: list[LoRAWeights]) -> list[float]:
    dws = [dense(a) for a in adapters]
    mean = {m: sum(d[m] for d in dws) / len(dws) for m in dws[0]}
    return [rel_error(d, mean) for d in dws]


def flat_pca(adapters: list[LoRAWeights], budget_bytes: float) -> tuple[list[float], int]:
    """vlora-dev's method: PCA over tasks of flattened, gauge-dependent factors."""
    n, mods = len(adapters), adapters[0].layer_names
    per_comp = sum(adapters[0].lora_a[m].numel() + adapters[0].lora_b[m].numel() for m in mods)
    # bytes = 4 * (k * per_comp + per_comp (means) + 2 * n * k * modules (coefficients))
    k = int((budget_bytes / 4 - per_comp) // (per_comp + 2 * n * len(mods)))
    k = max(0, min(k, n))
    recon = [dict() for _ in adapters]
    for m in mods:
        for side in ("a", "b"):
            x = torch.stack([(a.scales[m] * a.lora_b[m] if side == "b" else a.lora_a[m])
                             .to(F64).reshape(-1) for a in adapters])
            mu = x.mean(0)
            u, s, vt = torch.linalg.svd(x - mu, full_matrices=False)
            xk = mu + (u[:, :k] * s[:k]) @ vt[:k]
            for i, a in enumerate(adapters):
                shape = a.lora_b[m].shape if side == "b" else a.lora_a[m].shape
                recon[i][(m, side)] = xk[i].reshape(shape)
    errs = [rel_error(dense(a), {m: recon[i][(m, "b")] @ recon[i][(m, "a")] for m in mods})
            for i, a in enumerate(adapters)]
    return errs, k


def compare_at_ratio(adapters: list[LoRAWeights], ids: list[str], ratio: float) -> dict:
    """Every method at ``lora_bytes / ratio`` total bytes (heads are counted apart)."""
    budget = lora_bytes(adapters) / ratio
    sub = SharedSubspace.from_adapters(adapters, task_ids=ids, budget=budget)
    stats = sub.compression_stats()
    numbers = stats["stored_bytes"] / 4 / len(adapters)
    shapes = adapters[0].shapes()
    svd = [svd_baseline_error({m: torch.linalg.svdvals(a.delta_weight(m)) for m in a.layer_names},
                              shapes, numbers) for a in adapters]
    pca, k_pca = flat_pca(adapters, stats["stored_bytes"])
    return {"n": len(adapters), "ratio_target": ratio, "ratio": stats["compression_ratio"],
            "stored_bytes": stats["stored_bytes"], "vlora": stats["mean_error"],
            "vlora_max": stats["max_error"], "svd": statistics.mean(svd),
            "flat_pca": statistics.mean(pca), "flat_pca_k": k_pca,
            "mean_adapter": statistics.mean(mean_adapter_errors(adapters)), "subspace": sub}


def held_out(adapters: list[LoRAWeights], ids: list[str], ratio: float, n_out: int) -> dict:
    """Fit on all but ``n_out`` adapters, then only project those."""
    fit, rest = adapters[:-n_out], adapters[-n_out:]
    sub = SharedSubspace.from_adapters(fit, task_ids=ids[:-n_out], budget=lora_bytes(fit) / ratio)
    errs = [sub.project(a, t).error for a, t in zip(rest, ids[-n_out:])]
    return {"fitted_mean": sub.compression_stats()["mean_error"], "held_out_mean": statistics.mean(errs),
            "n_fit": len(fit), "n_held_out": n_out}


def task_id(path) -> str:
    """``<folder>:<parent>``: unique when variants of one task live in different folders."""
    return f"{path.name}:{path.parent.name}"


def load_dirs(dirs: list[str]) -> tuple[list[LoRAWeights], list[str]]:
    from pathlib import Path

    from vlora import load_adapter
    paths = sorted(Path(d) for d in dirs)
    return [load_adapter(p) for p in paths], [task_id(p) for p in paths]


def accuracy_kept(sub: SharedSubspace, dirs: list[str], limit: int) -> list[dict]:
    """Re-score each task's adapter exported from ``sub`` on its own held-out split."""
    import tempfile
    from pathlib import Path

    from vlora import save_adapter
    from vlora.testbed import evaluate_adapter
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for d in sorted(Path(x) for x in dirs):
            out = Path(tmp) / d.name
            save_adapter(sub.reconstruct(task_id(d)), out)
            before = evaluate_adapter(d, limit=limit)
            after = evaluate_adapter(out, eval_json=d / "eval.json", limit=limit)
            rows.append({"task": task_id(d), "original": before, "vlora": after,
                         "kept": after / before if before else 1.0})
    return rows


def main(argv=None) -> dict:
    import argparse
    import json
    import random
    from pathlib import Path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--one-seed", nargs="+", default=[], help="adapter folders, one init seed")
    ap.add_argument("--independent", nargs="+", default=[], help="adapter folders, own seeds")
    ap.add_argument("--ratios", type=float, nargs="+", default=[5.0, 10.0, 20.0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16, 24, 32])
    ap.add_argument("--accuracy-ratio", type=float, default=10.0)
    ap.add_argument("--limit", type=int, default=200, help="eval examples per task")
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fidelity"))
    args = ap.parse_args(argv)
    results: dict = {"regimes": {}}
    for regime, dirs in (("one-seed", args.one_seed), ("independent", args.independent)):
        if not dirs:
            continue
        adapters, ids = load_dirs(dirs)
        order = list(range(len(adapters)))
        random.Random(0).shuffle(order)  # which adapters form each N: fixed, task-mixed
        rows = []
        for n in [s for s in args.sizes if s <= len(adapters)]:
            pick = sorted(order[:n])
            for ratio in args.ratios:
                row = compare_at_ratio([adapters[i] for i in pick], [ids[i] for i in pick], ratio)
                row.pop("subspace")
                rows.append(row)
                print(regime, json.dumps(row), flush=True)
        reg = {"n_adapters": len(adapters), "rows": rows,
               "held_out": held_out([adapters[i] for i in order], [ids[i] for i in order],
                                    args.accuracy_ratio, max(2, len(adapters) // 5))}
        if not args.no_accuracy:
            full = compare_at_ratio(adapters, ids, args.accuracy_ratio)
            reg["accuracy"] = accuracy_kept(full.pop("subspace"), dirs, args.limit)
            reg["accuracy_summary"] = full
        results["regimes"][regime] = reg
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(report(results))
    print(report(results))
    return results


def report(results: dict) -> str:
    lines = ["# Fidelity against bytes (real MiniLM LoRA adapters, r=8, query/value)", "",
             "Mean relative dW error over tasks at equal total bytes (float32; heads apart).",
             "Baselines: per-adapter truncated SVD (no sharing), flattened-factor PCA "
             "(vlora-dev 1.0's method), the mean adapter.", ""]
    for regime, reg in results["regimes"].items():
        lines += [f"## {regime} ({reg['n_adapters']} adapters)", "",
                  "| N | target ratio | achieved | vlora | per-adapter SVD | flat-factor PCA (k) "
                  "| mean adapter | vlora wins vs SVD |", "|---|---|---|---|---|---|---|---|"]
        for r in reg["rows"]:
            lines.append(f"| {r['n']} | {r['ratio_target']:.0f}x | {r['ratio']:.1f}x | {r['vlora']:.4f} "
                         f"| {r['svd']:.4f} | {r['flat_pca']:.4f} ({r['flat_pca_k']}) "
                         f"| {r['mean_adapter']:.4f} | {'yes' if r['vlora'] < r['svd'] else 'no'} |")
        h = reg["held_out"]
        lines += ["", f"Held out: fitted on {h['n_fit']}, projected {h['n_held_out']}: mean error "
                  f"fitted {h['fitted_mean']:.4f}, held-out {h['held_out_mean']:.4f}.", ""]
        if "accuracy" in reg:
            acc = reg["accuracy"]
            kept = [a["kept"] for a in acc]
            s = reg["accuracy_summary"]
            lines += [f"Accuracy at {s['ratio']:.1f}x fewer LoRA bytes (dW error {s['vlora']:.4f}): "
                      f"mean kept {statistics.mean(kept):.1%}, min kept {min(kept):.1%}.", "",
                      "| task | original | from vlora | kept |", "|---|---|---|---|"]
            lines += [f"| {a['task']} | {a['original']:.3f} | {a['vlora']:.3f} | {a['kept']:.1%} |"
                      for a in acc]
            lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
