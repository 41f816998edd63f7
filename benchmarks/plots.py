"""PNG figures of the benchmark results (``python -m benchmarks.plots [--quick]``).

Each figure is drawn from one part's JSON in ``benchmarks/results``; a part that was not
run (or wrote another layout) is skipped with a message, never invented.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def fidelity(plt, data: dict, out: Path) -> None:
    """Mean relative dW error against N, one panel per byte ratio, every baseline beside."""
    regimes = data["regimes"]
    ratios = sorted({row["ratio_target"] for reg in regimes.values() for row in reg["rows"]})
    fig, axes = plt.subplots(len(regimes), len(ratios), figsize=(4.5 * len(ratios), 3.4 * len(regimes)),
                             squeeze=False)
    methods = [("vlora", "vlora"), ("svd", "per-adapter SVD"), ("vlora_dev", "vlora-dev 1.0.0"),
               ("flat_pca", "flat-factor PCA (re-impl.)"), ("mean_adapter", "mean adapter")]
    for i, (regime, reg) in enumerate(regimes.items()):
        for j, ratio in enumerate(ratios):
            ax, rows = axes[i][j], [r for r in reg["rows"] if r["ratio_target"] == ratio]
            for key, label in methods:
                pts = [(r["n"], r[key]) for r in rows if r.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=label)
            ax.set(title=f"{regime}, {ratio:g}x fewer bytes", xlabel="adapters N",
                   ylabel="mean relative dW error", ylim=(0, 1.05))
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def scale(plt, data: dict, out: Path) -> None:
    """Seconds per adapter and peak memory against N, per shape family and mode."""
    series = defaultdict(list)
    for row in data["rows"]:
        series[(row.get("family", ""), row.get("method", "vlora"), row["mode"])].append(row)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.6))
    for (family, method, mode), rows in sorted(series.items()):
        rows = sorted(rows, key=lambda r: r["n"])
        label = " ".join(x for x in (method, mode, family) if x)
        ns = [r["n"] for r in rows]
        ax_t.plot(ns, [r["seconds"] / r["n"] for r in rows], marker="o", label=label)
        ax_m.plot(ns, [r["peak_rss_mb"] for r in rows], marker="o", label=label)
    for ax, what in ((ax_t, "seconds per adapter"), (ax_m, "peak RSS (MB)")):
        ax.set(xscale="log", xlabel="adapters N", ylabel=what)
        ax.grid(alpha=0.3)
    ax_m.set_yscale("log")
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def serving(plt, data: dict, out: Path) -> None:
    """Throughput relative to the bare base model against the number of distinct tasks."""
    rows = data["results"]
    panels = list(dict.fromkeys((r["model"], r["phase"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (model, phase) in zip(axes[0], panels):
        mine = [r for r in rows if (r["model"], r["phase"]) == (model, phase)]
        base = next(r["tokens_per_s"] for r in mine if r["method"] == "base")
        for method in dict.fromkeys(r["method"] for r in mine if "mixed" in r["method"]):
            pts = sorted((r["tasks"], r["tokens_per_s"] / base) for r in mine if r["method"] == method)
            ax.plot(*zip(*pts), marker="o", label=method)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set(title=f"{model}, {phase}", xscale="log", xlabel="distinct tasks in the batch",
               ylabel="tokens/s relative to the base model")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def continual(plt, data: dict, out: Path) -> None:
    """Per new task: full LoRA, trained in the subspace, and after every later task."""
    variants = data["variants"]
    fig, axes = plt.subplots(1, len(variants), figsize=(5 * len(variants), 3.4), squeeze=False)
    for ax, v in zip(axes[0], variants):
        tasks = [r["task"] for r in v["rows"]]
        for i, (key, label) in enumerate((("lora_acc", "full LoRA"), ("trained_acc", "trained in subspace"),
                                          ("final_acc", "after all later tasks"))):
            ax.bar([t + 0.27 * (i - 1) for t in range(len(tasks))], [r[key] for r in v["rows"]],
                   width=0.27, label=label)
        ax.set_xticks(range(len(tasks)), tasks, rotation=20, fontsize=7)
        ax.set(title=f"phi = {v['phi']}", ylabel="accuracy", ylim=(0, 1))
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


FIGURES = {"fidelity": fidelity, "scale": scale, "serving": serving, "continual": continual}


def main(argv=None) -> list[Path]:
    """Draw every figure whose results exist; returns the PNG paths written."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="plot the *_quick results")
    args = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for part, draw in FIGURES.items():
        name = f"{part}_quick" if args.quick else part
        data = _load(name)
        if data is None:
            print(f"plots: no results/{name}.json, {part} figure skipped")
            continue
        out = RESULTS / f"{name}.png"
        try:
            draw(plt, data, out)
        except (KeyError, StopIteration, TypeError, ValueError) as exc:
            print(f"plots: results/{name}.json has another layout ({exc!r}), {part} figure skipped")
            continue
        finally:
            plt.close("all")
        written.append(out)
        print(f"plots: wrote {out}")
    return written


if __name__ == "__main__":
    main()
