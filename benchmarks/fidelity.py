"""Fidelity against bytes on real MiniLM adapters, beside every baseline of DESIGN.md section 6.

For each regime (all adapters from one init seed, as transformers' Trainer gives by
default; or from independent seeds) and each N, at a fixed ratio of LoRA bytes:

* vlora: a subspace fitted by byte budget (float32 bases + coordinates);
* per-adapter truncated SVD at the same total bytes (no sharing at all);
* flattened-factor PCA, the method of vlora-dev 1.0 (PCA over tasks of each module's
  flattened A and B, here re-implemented from its description), at the same bytes;
* vlora-dev 1.0.0 itself (its own venv, see vlora_dev.py) at the same bytes as its
  compression_stats counts them, or at k=1 (marked) when even that is over;
* the mean adapter (a basis that learnt nothing);
* held-out adapters, only projected onto a subspace fitted without them.

Errors are relative dW errors, averaged over tasks. Accuracy kept (adapters exported from
a subspace stored in 6 bits, re-scored with PEFT on each task's held-out split, every row
by default) is measured for one ratio, beside per-adapter SVD at the same bytes and bits
and vlora-dev's exports.

    python -m benchmarks.fidelity --one-seed DIR... --independent DIR...
"""

from __future__ import annotations

import math
import statistics

import torch

from vlora import LoRAWeights, SharedSubspace
from vlora.baseline import svd_quantized
from vlora.compress import compress, lora_bytes
from vlora.stats import stored_bytes

F64 = torch.float64


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


def vlora_dev_k(adapters: list[LoRAWeights], budget_bytes: float) -> int:
    """The largest num_components whose floats, as vlora-dev's compression_stats counts them
    (components + means + loadings), fit ``budget_bytes``; at least 1, at most N."""
    n, mods = len(adapters), len(adapters[0].layer_names)
    per_comp = adapters[0].num_lora_params()
    return max(1, min(n, int((budget_bytes / 4 - per_comp) // (per_comp + 2 * n * mods))))


def vlora_dev_fit(adapters: list[LoRAWeights], budget_bytes: float, out: str) -> dict:
    """Fit vlora-dev 1.0.0 at the budget's k and export every task as a PEFT folder
    (the original's files with lora_A/lora_B replaced) under ``out``; errors are ours."""
    import shutil
    from pathlib import Path

    from benchmarks.vlora_dev import call
    from vlora import load_adapter
    k = vlora_dev_k(adapters, budget_bytes)
    fit = call({"op": "fit", "adapters": [a.source for a in adapters], "ks": [k], "out": out})["fits"][0]
    folders = [Path(out) / f"k{k}" / str(i) for i in range(len(adapters))]
    for a, folder in zip(adapters, folders):
        shutil.copytree(a.source, folder, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("adapter_model.safetensors"))
    errs = [rel_error(dense(a), dense(load_adapter(f))) for a, f in zip(adapters, folders)]
    stored = 4 * fit["total_params_compressed"]
    return {"vlora_dev": statistics.mean(errs), "vlora_dev_k": k,
            "vlora_dev_ratio": lora_bytes(adapters) / stored,
            "vlora_dev_over_budget": stored > budget_bytes, "vlora_dev_seconds": fit["seconds"]}


def compare_at_ratio(adapters: list[LoRAWeights], ids: list[str], ratio: float,
                     vlora_dev: bool = False, dev_out: str | None = None) -> dict:
    """Every method at ``lora_bytes / ratio`` total bytes (heads are counted apart).

    With ``vlora_dev``, vlora-dev's exports go to ``dev_out`` (default: a temporary folder).
    """
    sub = compress(adapters, ids, ratio=ratio)  # shared, private or hybrid: what compress keeps
    stats = sub.compression_stats()
    svd = [svd_quantized(a, stats["stored_bytes"] / len(adapters))[1] for a in adapters]
    pca, k_pca = flat_pca(adapters, stats["stored_bytes"])
    row = {"n": len(adapters), "ratio_target": ratio, "ratio": stats["compression_ratio"],
           "stored_bytes": stats["stored_bytes"], "vlora": stats["mean_error"],
           "vlora_max": stats["max_error"], "svd": statistics.mean(svd),
           "flat_pca": statistics.mean(pca), "flat_pca_k": k_pca,
           "mean_adapter": statistics.mean(mean_adapter_errors(adapters)), "subspace": sub}
    if vlora_dev:
        import tempfile

        from benchmarks.vlora_dev import VloraDevUnavailable
        with tempfile.TemporaryDirectory(prefix="vlora-dev-") as tmp:
            try:
                row.update(vlora_dev_fit(adapters, stats["stored_bytes"], dev_out or tmp))
            except VloraDevUnavailable as e:
                row["vlora_dev_not_run"] = str(e)
    return row


def quantized_at_ratio(adapters: list[LoRAWeights], ids: list[str], ratio: float,
                       bits: int = 6) -> tuple[SharedSubspace, dict[str, LoRAWeights], dict]:
    """vlora with bases and coordinates stored in ``bits`` bits, at ``lora_bytes / ratio``
    (:func:`vlora.compress.compress`: the fit's float budget is scaled until the quantized
    subspace lands just under the bytes), and beside it per-adapter SVD at the same bytes,
    its factors also in ``bits`` bits plus one float32 scale per 64 numbers and an
    adapter_config.json (:mod:`vlora.baseline`; its quantization error counted, as vlora's is)."""
    sub = compress(adapters, ids, ratio=ratio, bits=bits)
    stats = sub.compression_stats()
    svd = {t: svd_quantized(a, stats["svd_bytes_per_task"], bits)[:2] for a, t in zip(adapters, ids)}
    return sub, {t: x[0] for t, x in svd.items()}, {
        "bits": bits, "ratio": stats["compression_ratio"], "vlora": stats["mean_error"],
        "vlora_max": stats["max_error"], "svd": statistics.mean(x[1] for x in svd.values()),
        "svd_max": max(x[1] for x in svd.values())}


def held_out(adapters: list[LoRAWeights], ids: list[str], ratio: float, n_out: int,
             dirs: list | None = None, limit: int | None = None, keep: dict | None = None,
             refine_iters: int = 10) -> dict:
    """Fit on all but the last ``n_out`` adapters at ``lora_bytes(fit) / ratio``, then add
    those one by one in each of the three ways a user can: only projected (the bases stay),
    absorbed incrementally (the bases turn toward each, k kept, cost free of N) and by a
    full refit. Reports the new tasks' and the fitted tasks' mean dW error after each (an
    absorb moves the bases under the old tasks) and, with ``dirs`` (the adapters' folders,
    in ``adapters``' order), the new tasks' accuracy kept (:func:`accuracy_kept`). ``keep``
    (a dict) receives the three subspaces by way."""
    import copy

    fit, new = adapters[:-n_out], adapters[-n_out:]
    fit_ids, new_ids = ids[:-n_out], ids[-n_out:]
    start = SharedSubspace.from_adapters(fit, task_ids=fit_ids, budget=lora_bytes(fit) / ratio,
                                         refine_iters=refine_iters)
    out = {"n_fit": len(fit), "n_held_out": n_out, "fitted_mean": start.compression_stats()["mean_error"]}
    subs = {}
    for way, add in (("projected", lambda s, a, t: s.add_task(s.project(a, t))),
                     ("incremental", lambda s, a, t: s.absorb_incremental(a, t)),
                     ("full", lambda s, a, t: s.absorb(a, t, refine_iters, exact_errors=False))):
        sub = subs[way] = copy.deepcopy(start)
        for a, t in zip(new, new_ids):
            add(sub, a, t)
        err = {t: rel_error(dense(a), dense(sub.reconstruct(t))) for a, t in zip(adapters, ids)}
        out[way] = {"new_mean": statistics.mean(err[t] for t in new_ids),
                    "fitted_mean": statistics.mean(err[t] for t in fit_ids),
                    "fitted_max": max(err[t] for t in fit_ids),
                    "ratio": lora_bytes(adapters) / stored_bytes(sub)}
    out["held_out_mean"] = out["projected"]["new_mean"]
    if keep is not None:
        keep.update(subs)
    if dirs is not None:
        out["accuracy"] = accuracy_kept(dirs[-n_out:], {w: {t: s.reconstruct(t) for t in new_ids}
                                                        for w, s in subs.items()}, limit)
    return out


def task_id(path) -> str:
    """``<folder>:<parent>``: unique when variants of one task live in different folders."""
    return f"{path.name}:{path.parent.name}"


def load_dirs(dirs: list[str]) -> tuple[list[LoRAWeights], list[str]]:
    from pathlib import Path

    from vlora import load_adapter
    paths = sorted(Path(d) for d in dirs)
    return [load_adapter(p) for p in paths], [task_id(p) for p in paths]


def paired(before: list[int], after: list[int], gold: list[int]) -> dict:
    """How a copy's answers differ from the original's on the same rows: its accuracy, the
    rows it loses (original right, copy wrong) and gains, the share of rows where it gives
    the original's answer, and the exact two-sided McNemar p-value (a binomial test on the
    rows that changed): whether the loss is more than chance at this many rows."""
    lost = sum(b == g != a for b, a, g in zip(before, after, gold))
    gained = sum(a == g != b for b, a, g in zip(before, after, gold))
    n = lost + gained
    tail = sum(math.comb(n, i) for i in range(min(lost, gained) + 1))
    return {"accuracy": sum(a == g for a, g in zip(after, gold)) / max(1, len(gold)),
            "lost": lost, "gained": gained, "p": min(1.0, 2 * tail / 2 ** n),
            "agree": sum(a == b for a, b in zip(after, before)) / max(1, len(gold))}


def original_predictions(d, limit: int | None) -> tuple[list[int], list[int]]:
    """The original adapter's answers on its eval split, cached (like its recorded accuracy,
    a fixed property of an adapter trained once) under ~/.cache/vlora/predictions, keyed by
    the adapter's and the eval split's sha256 and the row limit: the suite re-scores only
    the copies."""
    import hashlib
    import json
    from pathlib import Path

    from vlora import load_adapter
    from vlora.testbed import adapter_predictions
    digest = hashlib.sha256(f"{load_adapter(d).sha256}:{limit}:".encode()
                            + (Path(d) / "eval.json").read_bytes()).hexdigest()[:32]
    cache = Path.home() / ".cache" / "vlora" / "predictions" / f"{digest}.json"
    if cache.is_file():
        got = json.loads(cache.read_text())
        return got["predicted"], got["gold"]
    predicted, gold = adapter_predictions(d, limit=limit)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps({"adapter": str(d), "predicted": predicted, "gold": gold}))
    tmp.replace(cache)
    return predicted, gold


def accuracy_kept(dirs: list, copies: dict[str, dict], limit: int | None) -> list[dict]:
    """Re-score each task's original adapter (folders ``dirs``) and its copies on the
    first ``limit`` rows (None: all) of its own held-out split, row by row (:func:`paired`).

    ``copies[key][task_id]`` is a LoRAWeights (written to a scratch folder first) or an
    adapter folder; a row holds ``key``, ``kept_key``, ``lost_key``... for each copy."""
    import tempfile
    from pathlib import Path

    from vlora import save_adapter
    from vlora.testbed import adapter_predictions
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for d in sorted(Path(x) for x in dirs):
            ev = d / "eval.json"
            before, gold = original_predictions(d, limit)
            row = {"task": task_id(d), "eval_rows": len(gold),
                   "original": paired(before, before, gold)["accuracy"]}
            for key, of_task in copies.items():
                copy = of_task[task_id(d)]
                if isinstance(copy, LoRAWeights):
                    save_adapter(copy, Path(tmp) / d.name, overwrite=True)
                    copy = Path(tmp) / d.name
                after = adapter_predictions(copy, ev, limit)[0]
                row.update(paired_row(key, paired(before, after, gold), row["original"]))
            rows.append(row)
    return rows


def paired_row(key: str, p: dict, original: float) -> dict:
    """One copy's :func:`paired` numbers as a row's ``key``, ``kept_key``, ``lost_key``..."""
    return {key: p["accuracy"], f"kept_{key}": p["accuracy"] / original if original else 1.0,
            **{f"{k}_{key}": p[k] for k in ("lost", "gained", "p", "agree")}}


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
    ap.add_argument("--limit", type=int, help="eval rows per task (default: all, up to 400)")
    ap.add_argument("--bits", type=int, default=6, help="bits of the accuracy run's subspace")
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument("--no-vlora-dev", action="store_true", help="skip the real vlora-dev 1.0.0 baseline")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fidelity"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # reproducible decompositions; the suite runs parts side by side
    results: dict = {"regimes": {}}
    use_dev = not args.no_vlora_dev
    if use_dev:
        from benchmarks.vlora_dev import VloraDevUnavailable, ensure_venv
        try:
            ensure_venv()
        except VloraDevUnavailable as e:
            use_dev, results["vlora_dev_not_run"] = False, str(e)
            print(f"vlora-dev not run: {e}", flush=True)
    for regime, dirs in (("one-seed", args.one_seed), ("independent", args.independent)):
        if not dirs:
            continue
        adapters, ids = load_dirs(dirs)
        paths = sorted(Path(d) for d in dirs)  # load_dirs' order
        order = list(range(len(adapters)))
        random.Random(0).shuffle(order)  # which adapters form each N: fixed, task-mixed
        rows = []
        for n in [s for s in args.sizes if s <= len(adapters)]:
            pick = sorted(order[:n])
            for ratio in args.ratios:
                row = compare_at_ratio([adapters[i] for i in pick], [ids[i] for i in pick], ratio,
                                       vlora_dev=use_dev)
                row.pop("subspace")
                rows.append(row)
                print(regime, json.dumps(row), flush=True)
        reg = {"n_adapters": len(adapters), "rows": rows,
               "held_out": held_out([adapters[i] for i in order], [ids[i] for i in order],
                                    args.accuracy_ratio, max(2, len(adapters) // 5),
                                    None if args.no_accuracy else [paths[i] for i in order], args.limit)}
        if not args.no_accuracy:
            import tempfile
            with tempfile.TemporaryDirectory(prefix="vlora-dev-") as tmp:
                full = compare_at_ratio(adapters, ids, args.accuracy_ratio, vlora_dev=use_dev, dev_out=tmp)
                dev = ({t: Path(tmp) / f"k{full['vlora_dev_k']}" / str(i) for i, t in enumerate(ids)}
                       if "vlora_dev" in full else None)
                full.pop("subspace")
                q_sub, svd, reg["quantized"] = quantized_at_ratio(adapters, ids, args.accuracy_ratio,
                                                                  args.bits)
                print(regime, "quantized", json.dumps(reg["quantized"]), flush=True)
                copies = {"vlora_q": {t: q_sub.reconstruct(t) for t in ids}, "svd_q": svd,
                          **({"vlora_dev": dev} if dev else {})}
                reg["accuracy"] = accuracy_kept(dirs, copies, args.limit)
            reg["accuracy_summary"] = full
        results["regimes"][regime] = reg
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(report(results))
    print(report(results))
    return results


def dev_cell(r: dict) -> str:
    """vlora-dev's table cell: error (k), and its own ratio when k=1 is over the budget."""
    if "vlora_dev" not in r:
        return "not run" if "vlora_dev_not_run" in r else "-"
    over = f", over budget: {r['vlora_dev_ratio']:.1f}x" if r["vlora_dev_over_budget"] else ""
    return f"{r['vlora_dev']:.4f} ({r['vlora_dev_k']}{over})"


def target_line(what: str, acc: list[dict], key: str) -> str:
    """The issue's target at 10x: every task keeps 97% of its accuracy, the mean 99%; with
    how many of the misses are more than chance (exact McNemar on the task's rows) and the
    rows lost and gained over all tasks together."""
    kept = [a[f"kept_{key}"] for a in acc]
    ok = min(kept) >= 0.97 and statistics.mean(kept) >= 0.99
    misses = [a for a in acc if a[f"kept_{key}"] < 0.97]
    line = (f"Target (every task >= 97%, mean >= 99%), {what}: {'met' if ok else 'MISSED'} "
            f"({len(misses)} of {len(kept)} tasks under 97%")
    if misses and f"p_{key}" in acc[0]:
        line += f", {sum(a[f'p_{key}'] < 0.05 for a in misses)} of them lost more than chance (p < 0.05)"
    if f"lost_{key}" in acc[0]:
        lost, gained = (sum(a[f"{k}_{key}"] for a in acc) for k in ("lost", "gained"))
        line += f"; over all tasks {lost} rows lost, {gained} gained"
    return line + ")."


HOW = {"projected": "projected (bases unchanged)", "incremental": "absorbed incrementally (k kept)",
       "full": "absorbed by a full refit (k kept)"}


def held_out_lines(h: dict) -> list[str]:
    """The held-out part of the report: one row per way of adding the new adapters."""
    head = (f"Held out: a subspace fitted on {h['n_fit']} adapters (mean dW error "
            f"{h['fitted_mean']:.4f}), then {h['n_held_out']} more added one by one")
    if "projected" not in h:  # results of an older run
        return ["", f"{head}, projected: mean error {h['held_out_mean']:.4f}.", ""]
    acc = h.get("accuracy")
    lines = ["", head + (", their accuracy re-scored as above." if acc else "."), "",
             "| added by | new tasks' dW error | fitted tasks' dW error (mean / max) | ratio after"
             + (" | new tasks' accuracy kept (mean / min) | rows lost / gained" if acc else "") + " |",
             "|---|---|---|---|" + ("---|---|" if acc else "")]
    for way, what in HOW.items():
        r = h[way]
        line = (f"| {what} | {r['new_mean']:.4f} | {r['fitted_mean']:.4f} / {r['fitted_max']:.4f} "
                f"| {r['ratio']:.1f}x")
        if acc:
            kept = [a[f"kept_{way}"] for a in acc]
            line += (f" | {statistics.mean(kept):.1%} / {min(kept):.1%} | "
                     f"{sum(a[f'lost_{way}'] for a in acc)} / {sum(a[f'gained_{way}'] for a in acc)}")
        lines.append(line + " |")
    return lines + [""]


def agreement(acc: list[dict], key: str) -> str:
    """``"; same answer as the original on x% of rows (task mean), y% at least"``, if measured."""
    if f"agree_{key}" not in acc[0]:
        return ""
    agree = [a[f"agree_{key}"] for a in acc]
    return (f"; same answer as the original on {statistics.mean(agree):.1%} of rows (task mean), "
            f"{min(agree):.1%} at least")


def report(results: dict) -> str:
    lines = ["# Fidelity against bytes (real MiniLM LoRA adapters, r=8, query/value)", "",
             "Mean relative dW error over tasks at equal total bytes (float32; heads apart). "
             "vlora's bytes are its subspace folder's on disk (manifest and headers included); "
             "vlora is what `compress` keeps at the target (shared, private or hybrid parts).",
             "Baselines: per-adapter truncated SVD (no sharing) at the same bytes per adapter, "
             "charged its factors and an adapter_config.json; flattened-factor PCA "
             "(vlora-dev 1.0's method), the mean adapter.", ""]
    dev = any("vlora_dev" in r or "vlora_dev_not_run" in r
              for reg in results["regimes"].values() for r in reg["rows"])
    if dev:
        lines += ["vlora-dev 1.0.0 is the released package run in its own venv, at the largest "
                  "num_components (k) whose floats as its compression_stats counts them "
                  "(components + means + loadings) fit the same bytes; it cannot store k=0, so "
                  "where even k=1 is over the budget its own ratio at k=1 is given. Errors are "
                  "computed here against the original adapters.", ""]
    if "vlora_dev_not_run" in results:
        lines += [f"vlora-dev not run: {results['vlora_dev_not_run']}", ""]
    for regime, reg in results["regimes"].items():
        lines += [f"## {regime} ({reg['n_adapters']} adapters)", "",
                  "| N | target ratio | achieved | vlora | per-adapter SVD | flat-factor PCA (k) "
                  + ("| vlora-dev 1.0.0 (k) " if dev else "")
                  + "| mean adapter | vlora wins vs SVD |", "|---|---|---|---|---|---|---|---|"
                  + ("---|" if dev else "")]
        for r in reg["rows"]:
            lines.append(f"| {r['n']} | {r['ratio_target']:.0f}x | {r['ratio']:.1f}x | {r['vlora']:.4f} "
                         f"| {r['svd']:.4f} | {r['flat_pca']:.4f} ({r['flat_pca_k']}) "
                         + (f"| {dev_cell(r)} " if dev else "")
                         + f"| {r['mean_adapter']:.4f} | {'yes' if r['vlora'] < r['svd'] else 'no'} |")
        lines += held_out_lines(reg["held_out"])
        if "accuracy" in reg:
            acc, s, q = reg["accuracy"], reg["accuracy_summary"], reg["quantized"]
            kq, n = [a["kept_vlora_q"] for a in acc], [a["eval_rows"] for a in acc]
            lines += [f"Accuracy kept at {s['ratio_target']:.0f}x fewer LoRA bytes, exports re-scored "
                      "with PEFT "
                      f"on each task's held-out split ({min(n)}-{max(n)} rows: one example is "
                      f"{1 / max(n):.2%}-{1 / min(n):.2%} of a task's accuracy). vlora float32 at "
                      f"{s['ratio']:.1f}x has dW "
                      f"error {s['vlora']:.4f} (not re-scored).",
                      f"vlora with {q['bits']}-bit bases and coordinates at {q['ratio']:.1f}x "
                      f"(dW error {q['vlora']:.4f}, max {q['vlora_max']:.4f}): mean kept "
                      f"{statistics.mean(kq):.1%}, min kept {min(kq):.1%}{agreement(acc, 'vlora_q')}."]
            with_svd, with_dev = "svd_q" in acc[0], "vlora_dev" in acc[0]
            if with_svd:
                ks = [a["kept_svd_q"] for a in acc]
                lines.append(f"Per-adapter SVD at the same bytes, factors in {q['bits']} bits "
                             f"(dW error {q['svd']:.4f}, max {q['svd_max']:.4f}, quantization "
                             f"counted): mean kept {statistics.mean(ks):.1%}, min kept {min(ks):.1%}"
                             f"{agreement(acc, 'svd_q')}.")
            if with_dev:
                kd = [a["kept_vlora_dev"] for a in acc]
                lines.append(f"vlora-dev 1.0.0 at k={s['vlora_dev_k']} ({s['vlora_dev_ratio']:.1f}x"
                             f"{', over budget' if s['vlora_dev_over_budget'] else ''}, dW error "
                             f"{s['vlora_dev']:.4f}): mean kept {statistics.mean(kd):.1%}, "
                             f"min kept {min(kd):.1%}.")
            lines.append(target_line(f"vlora ({q['bits']}-bit)", acc, "vlora_q"))
            if with_svd:
                lines.append(target_line(f"per-adapter SVD ({q['bits']}-bit)", acc, "svd_q"))
            if "agree_vlora_q" in acc[0]:
                lines += ["", "Each copy is paired with the original row by row: rows lost (the original "
                          "right, the copy wrong) and gained, p the exact two-sided McNemar p-value of "
                          "that change, and agrees the share of rows where the copy gives the "
                          "original's answer, right or wrong."]
            cols = [("vlora_q", f"from vlora {q['bits']}-bit"), ("svd_q", f"from SVD {q['bits']}-bit"),
                    ("vlora_dev", "from vlora-dev")]
            cols = [c for c in cols if c[0] in acc[0]]
            detail = "agree_vlora_q" in acc[0]
            head = " | ".join(f"{name} | kept" + (" | lost/gained (p) | agrees" if detail else "")
                              for _, name in cols)
            lines += ["", f"| task | eval rows | original | {head} |",
                      "|---|---|---|" + ("---|" * (4 if detail else 2)) * len(cols)]
            lines += [f"| {a['task']} | {a['eval_rows']} | {a['original']:.3f} | "
                      + " | ".join(f"{a[k]:.3f} | {a['kept_' + k]:.1%}" + (
                          f" | -{a['lost_' + k]}/+{a['gained_' + k]} ({a['p_' + k]:.2f}) | "
                          f"{a['agree_' + k]:.1%}" if detail else "") for k, _ in cols) + " |"
                      for a in acc]
            lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
