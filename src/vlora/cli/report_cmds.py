"""Commands that look at a subspace: plot and benchmark."""

from __future__ import annotations

import copy
import resource
import statistics
import tempfile
import time

import click
import torch
from rich.table import Table

from vlora.cli.common import QUIET, console, print_json
from vlora.subspace import SharedSubspace


@click.command()
@click.argument("subspace", type=click.Path(exists=True))
@click.option("-o", "--output", required=True, type=click.Path(), help="PNG file to write.")
def plot(subspace, output):
    """Draw k per module, per-task error (vlora vs per-adapter SVD) and the bytes breakdown.

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
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    mods = list(stats["modules"])
    short = [m.replace("encoder.layer.", "L").replace("attention.self.", "") for m in mods]
    x = range(len(mods))
    axes[0].bar([i - 0.2 for i in x], [stats["modules"][m]["k_out"] for m in mods], 0.4, label="k_out")
    axes[0].bar([i + 0.2 for i in x], [stats["modules"][m]["k_in"] for m in mods], 0.4, label="k_in")
    axes[0].set_xticks(list(x), short, rotation=90, fontsize=6)
    axes[0].set_title("shared directions per module")
    axes[0].legend()
    tasks = sub.tasks
    t = range(len(tasks))
    axes[1].bar([i - 0.2 for i in t], [stats["task_errors"][k] for k in tasks], 0.4, label="vlora")
    axes[1].bar([i + 0.2 for i in t], [stats["svd_task_errors"][k] for k in tasks], 0.4,
                label="per-adapter SVD, same bytes")
    axes[1].set_xticks(list(t), tasks, rotation=90, fontsize=7)
    axes[1].set_title("relative dW error per task")
    axes[1].legend()
    parts = {"bases": stats["basis_bytes"], "task coordinates": stats["task_bytes"],
             "heads (as they are)": stats["extra_bytes"]}
    axes[2].bar(["original LoRA", "vlora"], [stats["original_bytes"], 0], color="grey")
    bottom = 0
    for label, value in parts.items():
        axes[2].bar(["vlora"], [value], bottom=bottom, label=label)
        bottom += value
    axes[2].set_title(f"bytes ({stats['compression_ratio']:.1f}x fewer LoRA bytes)")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)
    click.echo(f"wrote {output}")


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
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def benchmark(subspace, repeats, quiet, as_json):
    """Time load, reconstruct, project, absorb and save of a subspace on this machine.

    Medians of ``--repeats`` runs, in milliseconds, and the process's peak RSS.
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
