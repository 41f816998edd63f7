"""Commands that look at a subspace: plot and benchmark."""

from __future__ import annotations

import copy
import os
import re
import resource
import statistics
import tempfile
import time

import click
import torch
from rich.table import Table

from vlora.cli.common import JSON, QUIET, console, print_json
from vlora.subspace import SharedSubspace

MAX_BARS = 40  # modules drawn one by one up to this many; more are grouped by type


@click.command()
@click.argument("subspace", type=click.Path(exists=True))
@click.option("-o", "--output", required=True, type=click.Path(), help="PNG file to write.")
@QUIET
@JSON
def plot(subspace, output, quiet, as_json):
    """Draw k per module, per-task error (vlora vs per-adapter SVD) and the bytes breakdown.

    Up to 40 modules get a bar pair each; more are grouped by module type (q_proj,
    v_proj, ...): the mean k over the layers, with a line from the smallest to the largest.

    \b
    Example:
      vlora plot sub -o sub.png
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise click.UsageError("plot needs matplotlib: pip install 'vlora[plot]'") from None
    sub = SharedSubspace.load(subspace)
    stats = sub.compression_stats()
    groups = _module_groups(list(stats["modules"]))
    fig, axes = plt.subplots(3, 1, figsize=(12, 15))
    x = range(len(groups))
    for side, shift in (("k_out", -0.2), ("k_in", 0.2)):
        ks = [[stats["modules"][m][side] for m in ms] for ms in groups.values()]
        mean = [sum(k) / len(k) for k in ks]
        axes[0].bar([i + shift for i in x], mean, 0.4, label=side,
                    yerr=[[a - min(k) for a, k in zip(mean, ks)], [max(k) - a for a, k in zip(mean, ks)]]
                    if any(len(k) > 1 for k in ks) else None, capsize=3)
    axes[0].set_xticks(list(x), list(groups), rotation=_rotation(groups), fontsize=8)
    grouped = len(groups) < len(stats["modules"])
    axes[0].set_title(f"shared directions per module type (mean over {len(stats['modules'])} "
                      "modules; lines: smallest to largest)" if grouped
                      else "shared directions per module")
    tasks = sub.tasks
    t = range(len(tasks))
    axes[1].bar([i - 0.2 for i in t], [stats["task_errors"][k] for k in tasks], 0.4, label="vlora")
    axes[1].bar([i + 0.2 for i in t], [stats["svd_task_errors"][k] or float("nan") for k in tasks], 0.4,
                label="per-adapter SVD, same bytes")
    axes[1].set_xticks(list(t), tasks, rotation=_rotation(tasks), fontsize=8)
    axes[1].set_title("relative dW error per task")
    parts = {"bases": stats["basis_bytes"], "task coordinates": stats["task_bytes"],
             "heads (as they are)": stats["extra_bytes"]}
    axes[2].bar(["original LoRA", "vlora"], [stats["original_bytes"], 0], color="grey")
    bottom = 0
    for label, value in parts.items():
        axes[2].bar(["vlora"], [value], bottom=bottom, label=label)
        bottom += value
    axes[2].set_title(f"bytes ({stats['compression_ratio']:.1f}x fewer LoRA bytes)")
    for ax in axes:  # outside the axes: over the bars it hides them
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    fig.tight_layout()
    fig.savefig(output, dpi=100, bbox_inches="tight")
    plt.close(fig)
    if as_json:
        print_json({"output": output, "modules": len(stats["modules"]),
                    "bars": {g: len(ms) for g, ms in groups.items()}, "grouped": grouped})
    else:
        console(quiet).print(f"wrote {output}")


def _rotation(labels) -> int:
    """Upright tick labels when they fit side by side (about 110 characters at fontsize 8)."""
    return 0 if sum(len(x) + 2 for x in labels) <= 110 else 90


def _module_groups(modules: list[str]) -> dict[str, list[str]]:
    """Label -> modules drawn as one bar pair: each module alone or, past MAX_BARS, the
    modules of one type (the name with its layer numbers as ``*``: BERT has three
    ``dense`` types); labels lose the prefix all share."""
    if len(modules) <= MAX_BARS:
        groups = {m: [m] for m in modules}
    else:
        groups = {}
        for m in modules:
            groups.setdefault(re.sub(r"(?<=\.)\d+(?=\.|$)", "*", m), []).append(m)
    cut = len(os.path.commonprefix(list(groups)).rpartition(".")[0]) + 1 if len(groups) > 1 else 0
    return {k[cut:] or k: v for k, v in groups.items()}


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


@click.command()
@click.argument("subspace", type=click.Path(exists=True))
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Runs per timing (their median is printed).")
@QUIET
@JSON
def benchmark(subspace, repeats, quiet, as_json):
    """Time load, reconstruct, project, absorb and save of a subspace on this machine.

    Medians of ``--repeats`` runs, in milliseconds, and the process's peak RSS.

    \b
    Examples:
      vlora benchmark sub
      vlora benchmark sub --repeats 10 --json
    """
    timings = {"load": _median_ms(lambda: SharedSubspace.load(subspace), repeats)}
    sub = SharedSubspace.load(subspace)
    if not sub.tasks:
        raise click.UsageError(f"{subspace} has no tasks to time")
    task = sub.tasks[0]
    lora = sub.reconstruct(task, torch.float32)
    timings["reconstruct one task"] = _median_ms(lambda: sub.reconstruct(task), repeats)
    timings["project one adapter"] = _median_ms(lambda: sub.project(lora, "bench"), repeats)
    copies = iter([copy.deepcopy(sub) for _ in range(repeats)])  # absorb changes its subspace
    timings["absorb_incremental one adapter"] = _median_ms(
        lambda: next(copies).absorb_incremental(lora, "bench"), repeats)
    with tempfile.TemporaryDirectory() as tmp:
        timings["save"] = _median_ms(lambda: sub.save(tmp), repeats)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    data = {"tasks": len(sub), "modules": len(sub.modules), "median_ms": timings,
            "peak_rss_mb": peak_mb, "torch_threads": torch.get_num_threads()}
    if as_json:
        print_json(data)
        return
    table = Table(title=f"{subspace}: {len(sub)} tasks, {len(sub.modules)} modules")
    table.add_column("operation")
    table.add_column("median ms", justify="right")
    for k, v in timings.items():
        table.add_row(k, f"{v:.2f}")
    console(quiet).print(table)
    console(quiet).print(f"peak RSS {peak_mb:.0f} MB")
