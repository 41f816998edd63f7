"""Fidelity on the LLM test bed: SmolLM2-135M LoRAs on all seven linear module types.

For each regime of the bed (``one-seed``: 33 adapters from one init seed; ``independent``:
8 from seeds of their own), at {4, 10, 20}x of the adapters' float32 LoRA bytes and
{float32, 6-bit}:

* vlora: what ``compress`` keeps (shared, private or hybrid), its folder bytes on disk;
* per-adapter truncated SVD at the same bytes (:mod:`vlora.baseline`: its factors in the
  same bits, block scales and an adapter_config.json charged), the bound of the issue
  "never worse than compressing each adapter alone": ``max(1.01 B, B + 0.003)``;
* vlora-dev 1.0.0 (float32 cells; its own venv, :mod:`benchmarks.vlora_dev`) at the
  same bytes as it counts them.

Then per family of related tasks (one-seed; does sharing pay inside a family?), the
scores of every task at 10x 6-bit (vlora's exports and the SVD copies, loaded by PEFT:
loss kept, greedy and top-1 agreement, :mod:`vlora.testbed.llm`), and held-out tasks
added to a subspace fitted without them by ``project``, ``absorb_incremental`` and
``absorb``.

    python -m benchmarks.llm_fidelity [--quick] [--name llm_fidelity]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

from benchmarks import commit, fidelity
from vlora import SharedSubspace
from vlora.baseline import svd_quantized
from vlora.compress import compress, lora_bytes
from vlora.io import load_adapter, save_adapter
from vlora.testbed import llm

RESULTS = Path(__file__).parent / "results"
# Held out of the one-seed fit and added afterwards: each has relatives in the fit.
SERVED = Path.home() / ".cache" / "vlora" / "llm-bench" / "one-seed-10x-6bit"
HELD_OUT = ("chat_ai_id__s0", "chat_emotion_uk__s0", "trump_debate_later__s0")


def save_fit(sub, folder: Path) -> None:
    import shutil
    if folder.exists():
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    sub.save(folder)


def bed(root: Path) -> dict[str, list[Path]]:
    return {r: sorted(p.parent for p in (root / r).glob("*/adapter_model.safetensors"))
            for r in ("one-seed", "independent")}


def families(dirs: list[Path]) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for d in dirs:
        for f in llm.read_meta(d).get("families", []):
            out.setdefault(f, []).append(d)
    return {f: ds for f, ds in sorted(out.items()) if len(ds) >= 2}


def cell(adapters, ids, ratio: float, bits: int | None, refine_iters: int = 10) -> tuple[dict, object]:
    start = time.perf_counter()
    sub = compress(adapters, ids, ratio=ratio, bits=bits, refine_iters=refine_iters)
    seconds = time.perf_counter() - start
    s = sub.compression_stats()
    b = s["svd_mean_error"]
    bound = max(1.01 * b, b + 0.003)
    rep = sub.fit_report
    return {"n": len(ids), "ratio": ratio, "bits": bits or 32, "vlora": s["mean_error"],
            "vlora_max": s["max_error"], "svd": b, "bound": bound, "ok": s["mean_error"] <= bound,
            "chosen": min((n for n, (st, _) in rep.items() if st <= lora_bytes(adapters) / ratio),
                          key=lambda n: rep[n][1]),
            "shared_only": rep.get("shared", (0, None))[1],
            "private_equal": rep.get("private-equal", (0, None))[1],
            "stored_bytes": s["stored_bytes"], "disk_ratio": s["compression_ratio"],
            "seconds": seconds, "refine_iters": refine_iters}, sub


def scores(sub, adapters, dirs, ids, bits: int | None, scorer, work: Path,
           done=lambda rows: None) -> list[dict]:
    """Every task's vlora export and per-adapter SVD copy at the subspace's bytes, scored;
    ``done(rows)`` after each task."""
    per_task = sub.compression_stats()["svd_bytes_per_task"]
    rows = []
    for a, d, t in zip(adapters, dirs, ids):
        ours, svd = work / f"{t}-vlora", work / f"{t}-svd"
        save_adapter(sub.reconstruct(t), ours)
        save_adapter(svd_quantized(a, per_task, bits)[0], svd)
        rows.append({"task": t, "vlora": scorer.compare(ours, d), "svd": scorer.compare(svd, d)})
        done(rows)
    return rows


def held_out(adapters, dirs, ids, ratio: float, scorer, work: Path, refine_iters: int) -> dict:
    order = [i for i, t in enumerate(ids) if t not in HELD_OUT] + [ids.index(t) for t in HELD_OUT]
    ads, ds, ts = ([x[i] for i in order] for x in (adapters, dirs, ids))
    subs: dict = {}
    out = fidelity.held_out(ads, ts, ratio, len(HELD_OUT), keep=subs, refine_iters=refine_iters)
    for way, sub in subs.items():
        kept = []
        for t, d in zip(ts[-len(HELD_OUT):], ds[-len(HELD_OUT):]):
            save_adapter(sub.reconstruct(t), work / f"{way}-{t}")
            kept.append(scorer.compare(work / f"{way}-{t}", d, greedy=False)["loss_kept"])
        out[way]["loss_kept"] = kept
    return out


def summary(rows: list[dict], key: str) -> dict:
    kept = [r[key]["loss_kept"] for r in rows]
    return {"loss_kept_mean": statistics.mean(kept), "loss_kept_min": min(kept),
            "worst_task": rows[kept.index(min(kept))]["task"],
            "greedy_agreement": statistics.mean(r[key]["greedy_agreement"] for r in rows),
            "top1_agreement": statistics.mean(r[key]["top1_agreement"] for r in rows)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=llm.default_root())
    ap.add_argument("--ratios", type=float, nargs="*", default=[4, 10, 20], help="none: no grid")
    ap.add_argument("--regimes", nargs="+", default=["one-seed", "independent"])
    ap.add_argument("--quick", action="store_true", help="the independent regime at 10x only, no scores")
    ap.add_argument("--no-vlora-dev", action="store_true")
    ap.add_argument("--no-scores", action="store_true", help="skip loss kept, agreement and held-out")
    ap.add_argument("--bits", type=int, nargs="+", default=[32, 6], help="32 for float32")
    ap.add_argument("--no-families", action="store_true")
    ap.add_argument("--scores-of", type=Path, default=None,
                    help="only score the tasks of this saved subspace (fitted by an earlier run)")
    ap.add_argument("--refine-iters", type=int, default=10,
                    help="at most this many refinement rounds of the fit kept (compress's refine_iters; "
                         "a round took 0.1-0.2 s per module with 33 of these adapters on a quiet core)")
    ap.add_argument("--name", default="llm_fidelity")
    args = ap.parse_args(argv)
    if args.quick:
        args.ratios, args.regimes, args.no_scores = [10], ["independent"], True
    regimes = bed(args.root)
    out = {"grid": [], "families": [], "scores": {}, "held_out": None, "refine_iters": args.refine_iters,
           "commit": commit()}
    scorer = None if args.no_scores else llm.Scorer(llm.ensure_base(args.root))
    def scored(regime: str, rows: list[dict]) -> None:
        out["scores"][regime] = {"rows": rows, "vlora": summary(rows, "vlora"), "svd": summary(rows, "svd")}
        save(out, args.name)

    with tempfile.TemporaryDirectory(prefix="vlora-llm-fid-") as tmp:
        work = Path(tmp)
        for regime in args.regimes:
            dirs = regimes[regime]
            adapters, ids = [load_adapter(d) for d in dirs], [d.name for d in dirs]
            if args.scores_of is not None:  # a saved 10x 6-bit fit of this regime: its scores only
                sub = SharedSubspace.load(args.scores_of)
                bits = (sub.quantization or {}).get("bits")
                st = sub.compression_stats()
                out["scored_fit"] = {"folder": str(args.scores_of), "bits": bits or 32,
                                     "disk_ratio": st["compression_ratio"], "mean_error": st["mean_error"]}
                scores(sub, adapters, dirs, ids, bits, scorer, work, partial(scored, regime))
                continue
            for ratio in args.ratios:
                for bits in [None if b == 32 else b for b in args.bits]:
                    row, sub = cell(adapters, ids, ratio, bits, args.refine_iters)
                    row["set"] = regime
                    if bits is None and not args.no_vlora_dev:
                        row.update(dev_cell(adapters, row["stored_bytes"], work / f"dev-{regime}-{ratio}"))
                    print(json.dumps({k: v for k, v in row.items() if k != "candidates"}), flush=True)
                    out["grid"].append(row)
                    save(out, args.name)
                    if ratio == 10 and bits == 6 and regime == "one-seed":
                        save_fit(sub, SERVED)  # what benchmarks.llm_serving serves
                    if ratio == 10 and bits == 6 and scorer is not None:
                        scores(sub, adapters, dirs, ids, bits, scorer, work, partial(scored, regime))
                        print(json.dumps(out["scores"][regime]["vlora"]), flush=True)
            if regime == "one-seed" and not args.no_families:
                # float32 only: where sharing can pay (at 6 bits private parts win everywhere)
                for fam, fdirs in families(dirs).items():
                    sel = [dirs.index(d) for d in fdirs]
                    row, _ = cell([adapters[i] for i in sel], [ids[i] for i in sel], 10, None,
                                  args.refine_iters)
                    out["families"].append({"family": fam, **row})
                    save(out, args.name)
            if regime == "one-seed" and scorer is not None:
                out["held_out"] = held_out(adapters, dirs, ids, 10, scorer, work, args.refine_iters)
                save(out, args.name)
    print(report(out))
    return out


def save(out: dict, name: str) -> None:
    """Written after every step, so a long run that is stopped keeps what it measured."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=1, default=str))
    (RESULTS / f"{name}.md").write_text(report(out))


def dev_cell(adapters, stored: float, folder: Path) -> dict:
    from benchmarks.vlora_dev import VloraDevUnavailable
    try:
        return fidelity.vlora_dev_fit(adapters, stored, str(folder))
    except VloraDevUnavailable as e:
        return {"vlora_dev_not_run": str(e)}


def report(out: dict) -> str:
    rounds = out.get("refine_iters", 10)
    how = ("scoring a saved fit (llm_serving --k fits with one refinement round). " if out.get("scored_fit")
           else f"every fit with {rounds} refinement rounds (compress's default is 10). ")
    lines = ["# Fidelity on the LLM test bed (SmolLM2-135M, 210 modules)", "",
             f"`python -m benchmarks.llm_fidelity` at {out['commit']}, " + how
             + "Relative dW error, mean over tasks; bytes are the subspace folder's; B is per-adapter "
             "SVD at the same bytes and bits; the bound is max(1.01 B, B + 0.003).", "",
             "| set | N | target | bits | vlora | max | SVD (B) | within bound | chosen | shared only | "
             "vlora-dev 1.0.0 (k) | folder bytes | disk ratio | fit s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    if not out["grid"]:  # a run of families or scores alone
        del lines[-2:]
    for r in out["grid"]:
        dev = (f"{r['vlora_dev']:.4f} ({r['vlora_dev_k']}{', over' if r['vlora_dev_over_budget'] else ''})"
               if "vlora_dev" in r else "-")
        shared = f"{r['shared_only']:.4f}" if r["shared_only"] is not None else "-"
        lines.append(f"| {r['set']} | {r['n']} | {r['ratio']:g}x | {r['bits']} | {r['vlora']:.4f} | "
                     f"{r['vlora_max']:.4f} | {r['svd']:.4f} | {'yes' if r['ok'] else 'NO'} | "
                     f"{r['chosen']} | {shared} | {dev} | {r['stored_bytes']:,} | "
                     f"{r['disk_ratio']:.2f}x | {r['seconds']:.0f} |")
    if out["families"]:
        lines += ["", "## Inside each family (one-seed, 10x, float32)", "",
                  "Sharing pays where the shared-only fit beats per-task parts at the same bytes.", "",
                  "| family | N | bits | vlora | chosen | shared only | private, equal | SVD (B) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in out["families"]:
            fmt = (lambda x: f"{x:.4f}" if x is not None else "-")  # noqa: E731
            lines.append(f"| {r['family']} | {r['n']} | {r['bits']} | {r['vlora']:.4f} | {r['chosen']} | "
                         f"{fmt(r['shared_only'])} | {fmt(r['private_equal'])} | {r['svd']:.4f} |")
    if out["scores"]:
        f = out.get("scored_fit")
        title = (f"of {f['folder'].rsplit('/', 1)[-1]} ({f['disk_ratio']:.1f}x on disk, {f['bits']} bits, "
                 f"mean dW error {f['mean_error']:.4f}; SVD copies at its bytes and bits)"
                 if f else "at 10x 6-bit")
        lines += ["", f"## Loss kept and agreement {title}", "",
                  "Exports loaded by PEFT, float32, on each task's held-out eval blocks (16 x 32 "
                  "tokens) and 4 fixed prompts (20 greedy tokens each). Targets: loss kept >= 99% "
                  "mean and >= 97% every task; greedy agreement >= 95%.", "",
                  "| set | copy | loss kept mean | lowest (task) | greedy agreement | top-1 agreement |",
                  "|---|---|---|---|---|---|"]
        for regime, s in out["scores"].items():
            for key in ("vlora", "svd"):
                x = s[key]
                lines.append(f"| {regime} | {key} | {x['loss_kept_mean']:.2%} | {x['loss_kept_min']:.2%} "
                             f"({x['worst_task']}) | {x['greedy_agreement']:.2%} | "
                             f"{x['top1_agreement']:.2%} |")
    h = out["held_out"]
    if h:
        lines += ["", f"## Held-out tasks ({', '.join(HELD_OUT)}), added to a float32 fit of "
                  f"{h['n_fit']} at 10x", "",
                  "| way | new tasks' error | their loss kept | fitted tasks' mean error (max) | ratio |",
                  "|---|---|---|---|---|"]
        for way in ("projected", "incremental", "full"):
            w = h[way]
            kept = ", ".join(f"{x:.1%}" for x in w.get("loss_kept", []))
            lines.append(f"| {way} | {w['new_mean']:.4f} | {kept} | {w['fitted_mean']:.4f} "
                         f"({w['fitted_max']:.4f}) | {w['ratio']:.2f}x |")
        lines.append(f"\nFitted tasks' mean error before any add: {h['fitted_mean']:.4f}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
