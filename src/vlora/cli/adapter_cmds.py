"""Commands on adapter folders: analyze and merge (all computed on dW)."""

from __future__ import annotations

import dataclasses
import math
import warnings

import click
import torch
from rich import box
from rich.table import Table

from vlora import analysis
from vlora import merge as merging
from vlora.cli.common import JSON, QUIET, check_adapter_output, console, print_json, progress_enabled
from vlora.cli.sources import HELP as SOURCES_HELP
from vlora.cli.sources import AdapterSource
from vlora.io import load_adapter, save_adapter

METHODS = ("linear", "ties", "dare", "dare_ties", "magnitude_prune", "cat")
APPLIES = {"density": ("ties", "magnitude_prune"), "drop_rate": ("dare", "dare_ties"),
           "seed": ("dare", "dare_ties"), "rank": tuple(m for m in METHODS if m != "cat")}


@click.command(epilog=SOURCES_HELP)
@click.argument("adapters", nargs=-1, required=True, type=AdapterSource())
@click.option("--threshold", type=float, default=0.5, show_default=True,
              help="Cluster adapters whose average dW cosine is at least this.")
@click.option("--z", type=float, default=3.5, show_default=True,
              help="Call an adapter an outlier when its mean cosine to the others is this many "
              f"robust spreads (median/MAD) below the median; needs {analysis.MIN_OUTLIER_ADAPTERS}+ "
              "adapters.")
@click.option("--plot", type=click.Path(), help="Write a PNG: similarity heat map and spectrum.")
@QUIET
@JSON
def analyze(adapters, threshold, z, plot, quiet, as_json):
    """Similarity, clusters, outliers and shared spectrum of adapters (gauge-invariant).

    \b
    Examples:
      vlora analyze adapters/* --plot analysis.png
      vlora analyze org/adapter-a org/adapter-b@v2 adapters/c
    """
    items = [load_adapter(s.local()) for s in adapters]
    sim = analysis.compute_similarity_matrix(items)
    # a Hub adapter by its id, not by its snapshot folder's name (the commit hash)
    names = [s.given if s.kind == "hub" else n for s, n in zip(adapters, sim.names)]
    if len(set(names)) == len(names):
        sim = dataclasses.replace(sim, names=names)
    clusters = analysis.find_clusters(sim, threshold=threshold)
    too_few = len(items) < analysis.MIN_OUTLIER_ADAPTERS
    outliers = None if too_few else analysis.find_outliers(sim, z=z)
    spectrum = analysis.shared_spectrum(items)
    curve = _mean_curve(spectrum)
    data = {"names": sim.names, "similarity": sim.matrix.tolist(), "clusters": clusters,
            "outliers": None if too_few else {sim.names[i]: s for i, s in outliers.items()},
            "energy_kept_by_k": curve}
    if plot:
        _plot(sim, curve, plot)
    if as_json:
        print_json(data)
        return
    out = console(quiet)
    _print_similarity(out, sim)
    groups: dict[int, list[str]] = {}
    for n, c in zip(sim.names, clusters):
        groups.setdefault(c, []).append(n)
    out.print(f"clusters (average cosine >= {threshold}): "
              + "; ".join(", ".join(g) for g in groups.values()))
    if too_few:
        out.print(f"outliers: too few adapters to call outliers ({len(items)} < "
                  f"{analysis.MIN_OUTLIER_ADAPTERS})")
    else:
        out.print("outliers: " + (", ".join(f"{k} (robust z={v:.1f})"
                                            for k, v in data["outliers"].items()) or "none"))
    marks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= len(curve["out"])]
    out.print("shared energy kept by k directions (mean over modules, out/in): " + ", ".join(
        f"k={k}: {curve['out'][k - 1]:.2f}/{curve['in'][k - 1]:.2f}" for k in marks))
    if plot:
        out.print(f"wrote {plot}")


def _print_similarity(out, sim: analysis.SimilarityMatrix) -> None:
    """Rows by whole name, columns by number (names cut to fit look alike: chat_…), in
    as many tables as it takes for every column to fit the terminal (rich would crop)."""
    labels = [f"{i + 1} {n}" for i, n in enumerate(sim.names)]
    name_width = min(max(map(len, labels)), max(out.width // 2, 12))
    per_table = max(1, (out.width - name_width - 2) // 7)  # " -0.12" and a space
    for start in range(0, len(labels), per_table):
        cols = range(start, min(start + per_table, len(labels)))
        table = Table(title="dW cosine similarity" + (f" (columns {cols[0] + 1}-{cols[-1] + 1})"
                                                      if len(cols) < len(labels) else ""),
                      box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        table.add_column("adapter", overflow="fold", max_width=name_width)
        for j in cols:
            table.add_column(str(j + 1), justify="right", no_wrap=True)
        for label, row in zip(labels, sim.matrix.tolist()):
            table.add_row(label, *(f"{row[j]:.2f}" for j in cols))
        out.print(table)


def _mean_curve(spectrum: dict[str, analysis.SharedSpectrum]) -> dict[str, list[float]]:
    """Energy kept by k shared directions, averaged over modules (1.0 past a module's rank)."""
    out = {}
    for side in ("out", "in"):
        curves = [getattr(s, f"kept_{side}").tolist() for s in spectrum.values()]
        n = max((len(c) for c in curves), default=0)
        out[side] = [sum(c[min(k, len(c) - 1)] if c else 1.0 for c in curves) / len(curves)
                     for k in range(n)]
    return out


def _plot(sim, curve, path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise click.UsageError("--plot needs matplotlib: pip install 'vlora[plot]'") from None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    im = ax1.imshow(sim.matrix.numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
    ax1.set_xticks(range(len(sim.names)), sim.names, rotation=90, fontsize=7)
    ax1.set_yticks(range(len(sim.names)), sim.names, fontsize=7)
    ax1.set_title("dW cosine similarity")
    fig.colorbar(im, ax=ax1)
    for side in ("out", "in"):
        ax2.plot(range(1, len(curve[side]) + 1), curve[side], label=f"{side} side")
    ax2.set_xlabel("k shared directions")
    ax2.set_ylabel("share of weighted energy kept")
    ax2.set_title("Shared spectrum (mean over modules)")
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@click.command("merge", epilog=SOURCES_HELP)
@click.argument("adapters", nargs=-1, required=True, type=AdapterSource())
@click.option("-o", "--output", required=True, type=click.Path(), help="Merged adapter folder.")
@click.option("--method", type=click.Choice(METHODS), default="linear", show_default=True)
@click.option("--weights", help="Comma-separated weight per adapter (default: 1 each).")
@click.option("--density", type=float, default=0.5, show_default=True,
              help="Share of entries kept (ties, magnitude_prune).")
@click.option("--drop-rate", type=float, default=0.5, show_default=True,
              help="Share of entries dropped (dare, dare_ties).")
@click.option("--seed", type=int, help="DARE seed (dare, dare_ties; default: fresh, and reported).")
@click.option("--rank", type=int, help="Rank of the result (default: the largest input rank; "
              "not with cat, which is exact).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]),
              help="Factors' dtype (default: the inputs' when they share one, else float32; "
              "the merge itself is computed in float64).")
@click.option("--force", is_flag=True, help="Replace an adapter already in OUTPUT (never an input).")
@QUIET
@JSON
def merge_cmd(adapters, output, method, weights, density, drop_rate, seed, rank, dtype, force, quiet,
              as_json):
    """Merge adapters into one PEFT adapter, computed on dW and truncated by SVD.

    \b
    Examples:
      vlora merge a/ b/ -o ab --method ties --density 0.3 --rank 16
      vlora merge a/ b/ c/ -o abc --method linear --weights 0.5,0.3,0.2
      vlora merge org/adapter-a org/adapter-b@v2 -o ab
    """
    ctx = click.get_current_context()
    ignored = [f"--{name.replace('_', '-')}" for name, methods in APPLIES.items()
               if method not in methods
               and ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
    if ignored:
        raise click.UsageError(f"{', '.join(ignored)}: not used by --method {method}"
                               + (" (cat is exact: its rank is the sum of the inputs' ranks; "
                                  "--method linear --rank R truncates the same sum)"
                                  if method == "cat" and "--rank" in ignored else ""))
    try:
        ws = [float(w) for w in weights.split(",")] if weights else None
    except ValueError:
        raise click.UsageError(f"--weights {weights!r}: comma-separated numbers expected") from None
    if ws is not None and len(ws) != len(adapters):
        raise click.UsageError(f"{len(ws)} weights for {len(adapters)} adapters")
    if ws is not None and not all(math.isfinite(w) and abs(w) < 1e150 for w in ws):
        raise click.UsageError(f"--weights {weights!r}: finite numbers below 1e150 expected")
    check_adapter_output(output, force, inputs=[s.given for s in adapters if s.kind == "path"])
    items = [load_adapter(s.local()) for s in adapters]  # a Hub id fetched after every check
    bar = {"progress": progress_enabled(quiet)}  # on stderr: --json's stdout stays clean
    if method == "linear":
        result = merging.task_arithmetic(items, ws, rank=rank, **bar)
    elif method == "cat":
        result = merging.concat(items, ws)
    elif method == "ties":
        result = merging.ties_merge(items, density, ws, rank=rank, **bar)
    elif method == "magnitude_prune":
        result = merging.magnitude_prune_merge(items, density, ws, rank=rank, **bar)
    elif method == "dare":
        result = merging.dare_merge(items, drop_rate, ws, seed=seed, rank=rank, **bar)
    else:
        result = merging.dare_ties_merge(items, drop_rate, ws, seed=seed, rank=rank, **bar)
    # the library warned each note as it arose; the CLI prints a message once, so this
    # repeats none and makes sure every note is said
    for note in result.notes:
        warnings.warn(note, stacklevel=1)
    kinds = {it.lora_a[m].dtype for it in items for m in it.layer_names}
    dtype = getattr(torch, dtype) if dtype else (kinds.pop() if len(kinds) == 1 else torch.float32)
    save_adapter(result, output, dtype=dtype)
    seed = result.info.get("seed")  # DARE's (fresh unless given): printed, to redo the merge
    data = {"output": output, "method": method, "rank": result.rank, "seed": seed,
            "dtype": str(dtype).removeprefix("torch."),
            "kept_energy": result.kept_energy, "info": result.info, "notes": result.notes}
    if as_json:
        print_json(data)
        return
    out = console(quiet)
    out.print(f"merged {len(items)} adapters with {method} -> {output} (rank {result.rank}, "
              f"energy kept by the rank truncation {result.kept_energy:.1%}"
              + (f", seed {seed})" if seed is not None else ")"))
