"""Commands on subspaces: compress, info, export, add, remove, validate, diff."""

from __future__ import annotations

import hashlib
import math
import unicodedata
from collections import Counter
from pathlib import Path

import click
import torch
from rich.table import Table

from vlora import linalg
from vlora.cli.common import (
    QUIET,
    check_adapter_output,
    console,
    human_bytes,
    parse_size,
    print_json,
    progress_enabled,
    split_ids,
)
from vlora.compress import compress as fit_to_bytes
from vlora.errors import SubspaceError
from vlora.io import load_adapter, save_adapter
from vlora.storage import MANIFEST, lock
from vlora.subspace import SharedSubspace

JSON = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def summary(sub: SharedSubspace) -> dict:
    """The figures ``compress`` and ``info`` print (also their ``--json``)."""
    stats = sub.compression_stats()
    ks = [(b.k_out, b.k_in) for b in sub.modules.values()]
    return {
        "tasks": sub.tasks, "num_modules": len(sub.modules),
        "k_out": [min(k for k, _ in ks), max(k for k, _ in ks)],
        "k_in": [min(k for _, k in ks), max(k for _, k in ks)],
        **{k: stats[k] for k in ("basis_bytes", "task_bytes", "stored_bytes", "original_bytes",
                                 "extra_bytes", "compression_ratio", "mean_error", "max_error",
                                 "svd_bits", "svd_mean_error", "svd_max_error", "errors_are_bounds")},
        "per_task": {t: {"error": stats["task_errors"][t], "svd_error": stats["svd_task_errors"][t],
                         "coverage": sub.task_coverage(t),
                         "error_is_bound": sub.get_task(t).error_is_bound} for t in sub.tasks},
        "modules": stats["modules"],
    }


def print_summary(sub: SharedSubspace, data: dict, quiet: bool) -> None:
    out = console(quiet)
    table = Table(title="Per-task relative dW error (lower is better)")
    svd = "SVD at equal bytes" + (f" ({data['svd_bits']}-bit)" if data["svd_bits"] < 32 else "")
    for col in ("task", "vlora error", svd, "coverage"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for t, row in data["per_task"].items():
        err = f"{row['error']:.4f}" + (" (bound)" if row["error_is_bound"] else "")
        table.add_row(t, err, f"{row['svd_error']:.4f}", f"{row['coverage']:.3f}")
    table.add_row("mean", f"{data['mean_error']:.4f}", f"{data['svd_mean_error']:.4f}", "",
                  style="bold")
    out.print(table)
    if data["svd_bits"] < 32:
        out.print(f"(the SVD baseline's numbers also take {data['svd_bits']} bits; its rounding error "
                  "is not counted, which favours it)")
    out.print(f"{len(data['tasks'])} tasks, {data['num_modules']} modules, "
              f"k_out {data['k_out'][0]}..{data['k_out'][1]}, k_in {data['k_in'][0]}..{data['k_in'][1]}")
    out.print(f"LoRA bytes: {human_bytes(data['original_bytes'])} -> {human_bytes(data['stored_bytes'])}"
              f" (basis {human_bytes(data['basis_bytes'])} + tasks {human_bytes(data['task_bytes'])}),"
              f" [bold]{data['compression_ratio']:.2f}x[/bold] smaller; non-LoRA tensors "
              f"(heads) kept as they are: {human_bytes(data['extra_bytes'])}")


def _load(path: str) -> SharedSubspace:
    return SharedSubspace.load(path)


def _module_weights(ctx, param, values) -> dict[str, float] | None:
    out = {}
    for v in values:
        key, sep, w = v.partition("=")
        if key.strip() in out:
            raise click.BadParameter(f"{key.strip()!r} is given twice", ctx, param)
        try:
            out[key.strip()] = float(w)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise click.BadParameter(f"{v!r} is not KEY=W, e.g. value=2", ctx, param)
    return out or None


@click.command()
@click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("-o", "--output", required=True, type=click.Path(), help="Subspace directory to write.")
@click.option("-k", "--num-components", type=click.IntRange(min=1), help="k for every module and side.")
@click.option("--k-out", type=click.IntRange(min=1), help="k of the output side (use with --k-in).")
@click.option("--k-in", type=click.IntRange(min=1), help="k of the input side (use with --k-out).")
@click.option("--variance-threshold", type=float, help="Keep this share of energy per module, e.g. 0.9.")
@click.option("--budget", callback=lambda ctx, param, v: None if v is None else parse_size(v),
              help="Total bytes for bases plus coordinates, e.g. 20MB, 1.5MiB or 2e6.")
@click.option("--ratio", type=float, help="Compression ratio of LoRA bytes to reach, e.g. 10.")
@click.option("--bits", type=click.Choice(["4", "5", "6", "8"]),
              help="Store bases and coordinates in this many bits; --budget/--ratio then count "
                   "the quantized bytes, so fewer bits buy more directions.")
@click.option("--module-weight", "module_weights", multiple=True, callback=_module_weights,
              metavar="KEY=W", help="With --budget/--ratio: count this module's errors W times "
              "where bytes are shared out, e.g. value=2 (KEY as in PEFT's target_modules; repeatable).")
@click.option("--task-ids", help="Comma-separated ids, one per adapter (default: folder names).")
@click.option("--streaming", is_flag=True, help="Read adapters a chunk at a time (bounded memory).")
@click.option("--missing-modules", type=click.Choice(["error", "skip", "zero"]), default="error",
              show_default=True, help="What to do with modules only some adapters have.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it is already a subspace (only then).")
@QUIET
@JSON
def compress(adapters, output, num_components, k_out, k_in, variance_threshold, budget, ratio, bits,
             module_weights, task_ids, streaming, missing_modules, force, quiet, as_json):
    """Compress LoRA adapter folders into one shared subspace.

    \b
    Examples:
      vlora compress adapters/* -o sub -k 16
      vlora compress adapters/* -o sub --ratio 10
      vlora compress adapters/* -o sub --ratio 10 --bits 6
      vlora compress a/ b/ c/ -o sub --task-ids sales,legal,support --budget 2MB
      vlora compress adapters/* -o sub --ratio 10 --bits 6 --module-weight value=2
    """
    if module_weights and not (budget or ratio):
        raise click.UsageError("--module-weight shares out a byte target: give --budget or --ratio")
    chosen = [x is not None for x in (num_components, k_out or k_in, variance_threshold, budget, ratio)]
    if sum(chosen) > 1:
        raise click.UsageError("choose one of -k, --k-out/--k-in, --variance-threshold, --budget, --ratio")
    if (k_out is None) != (k_in is None):
        raise click.UsageError("--k-out and --k-in go together")
    if Path(output).exists() and any(Path(output).iterdir()):
        if not force:
            raise click.UsageError(f"{output} exists and is not empty (use --force to replace a subspace)")
        if not (Path(output) / MANIFEST).exists():
            raise click.UsageError(f"{output} is not a subspace: --force replaces a subspace only")
    if streaming and missing_modules != "error":
        raise click.UsageError("--streaming needs every adapter to have the same modules: "
                               "--missing-modules works without --streaming")
    ids = split_ids(task_ids)
    k = (k_out, k_in) if k_out is not None else num_components
    progress = progress_enabled(quiet)
    if streaming:
        if budget or ratio:
            raise click.UsageError("--streaming takes -k or --variance-threshold")
        sub = SharedSubspace.from_adapters_streaming(
            list(adapters), task_ids=ids, num_components=k or 16,
            variance_threshold=variance_threshold, progress=progress)
        if bits:
            sub.quantize(int(bits), coordinates=True)
    else:
        loaded = [load_adapter(p) for p in adapters]
        sub = fit_to_bytes(loaded, ids, budget=budget, ratio=ratio,
                           bits=int(bits) if bits else None, num_components=k,
                           variance_threshold=variance_threshold, module_weights=module_weights,
                           missing_modules=missing_modules, progress=progress)
    sub.save(output)
    data = summary(sub)
    if as_json:
        print_json(data)
    else:
        print_summary(sub, data, quiet)
        console(quiet).print(f"Wrote {output}")


@click.command()
@click.argument("subspace", type=click.Path(exists=True))
@QUIET
@JSON
def info(subspace, quiet, as_json):
    """Show modules, k, tasks, bytes and errors of a subspace (computed from what is stored)."""
    sub = _load(subspace)
    data = summary(sub)
    if as_json:
        print_json(data)
        return
    out = console(quiet)
    table = Table(title=f"{subspace}: modules")
    for col in ("module", "d_out x d_in", "k_out", "k_in", "mean error"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for m, row in data["modules"].items():
        table.add_row(m, f"{row['d_out']} x {row['d_in']}", str(row["k_out"]), str(row["k_in"]),
                      f"{row['mean_error']:.4f}")
    out.print(table)
    out.print(f"base model: {sub.base_model or 'unknown'}")
    print_summary(sub, data, quiet)


@click.command()
@click.argument("subspace", type=click.Path(exists=True))
@click.argument("tasks", nargs=-1)
@click.option("-o", "--output", required=True, type=click.Path(),
              help="Adapter folder (one task) or parent folder (several / --all).")
@click.option("--all", "all_tasks", is_flag=True, help="Export every task.")
@click.option("--rank", type=click.IntRange(min=1),
              help="Truncate each module to this rank (best in the subspace).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]),
              help="Weights dtype (default: each original adapter's).")
@click.option("--vllm", is_flag=True, help="Write what vLLM accepts (no modules_to_save, one rank).")
@click.option("--force", is_flag=True, help="Replace adapters already in the output folders.")
@QUIET
def export(subspace, tasks, output, all_tasks, rank, dtype, vllm, force, quiet):
    """Write tasks back as standard PEFT adapters.

    \b
    Examples:
      vlora export sub sales -o sales-lora
      vlora export sub --all -o exported/ --vllm
    """
    sub = _load(subspace)
    names = sub.tasks if all_tasks else list(tasks)
    if not names:
        raise click.UsageError("name at least one task, or pass --all")
    folders = _folder_names(names)
    targets = {t: Path(output) / folders[t] if len(names) > 1 or all_tasks else Path(output)
               for t in names}
    if len(names) > 1 or all_tasks:
        check_adapter_output(output, force=True)  # the parent folder: not a subspace's either
    for t, target in targets.items():  # fail before writing anything
        sub.get_task(t)
        check_adapter_output(target, force)
    out = console(quiet)
    for t, target in targets.items():
        left_out = save_adapter(sub.reconstruct(t, getattr(torch, dtype) if dtype else None, rank),
                                target, for_vllm=vllm)
        out.print(f"{t} -> {target}" + (f" (left out: {', '.join(left_out)})" if left_out else ""))


@click.command()
@click.argument("subspace", type=click.Path(exists=True))
@click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--task-ids", help="Comma-separated ids (default: folder names).")
@click.option("--incremental", is_flag=True,
              help="Update the basis at a cost independent of the number of tasks.")
@click.option("--project-only", is_flag=True,
              help="Keep the basis; only store the new tasks' coordinates.")
@QUIET
@JSON
def add(subspace, adapters, task_ids, incremental, project_only, quiet, as_json):
    """Add adapters to a subspace; by default the basis is refit on all tasks (absorb).

    Prints each old task's error before and after, and the drift of its reconstruction.
    """
    if incremental and project_only:
        raise click.UsageError("--incremental and --project-only exclude each other: pick one")
    mode = "incremental" if incremental else "project" if project_only else "absorb"
    ids = split_ids(task_ids)
    ids = [Path(p).name for p in adapters] if ids is None else ids
    if len(ids) != len(adapters):
        raise click.UsageError(f"{len(ids)} task ids for {len(adapters)} adapters")
    with lock(subspace):
        sub = _load(subspace)
        reports = {}
        for path, tid in zip(adapters, ids):
            if mode == "project":
                sub.add_task(sub.project(path, tid))
            elif mode == "incremental":
                reports[tid] = sub.absorb_incremental(path, tid)
            else:
                reports[tid] = sub.absorb(path, tid)
        sub.save(subspace)  # re-takes the same (re-entrant) lock
    rows = {new: {old: vars(r) for old, r in rep.items()} for new, rep in reports.items()}
    if as_json:
        print_json({"added": ids, "old_tasks": rows,
                    "new_errors": {t: sub.task_error(t) for t in ids}})
        return
    out = console(quiet)
    for new, rep in reports.items():
        table = Table(title=f"after adding {new}")
        for col in ("old task", "error before", "drift", "error after"):
            table.add_column(col, justify="left" if col == "old task" else "right")
        for old, r in rep.items():
            table.add_row(old, f"{r.error_before:.4f}", f"{r.drift:.4f}",
                          f"{r.error_after:.4f}" + (" (bound)" if r.after_is_bound else ""))
        out.print(table)
    for t in ids:
        out.print(f"added {t}: error {sub.task_error(t):.4f}, coverage {sub.task_coverage(t):.3f}")


@click.command()
@click.argument("subspace", type=click.Path(exists=True))
@click.argument("tasks", nargs=-1, required=True)
@QUIET
def remove(subspace, tasks, quiet):
    """Remove tasks from a subspace (the basis is kept)."""
    with lock(subspace):
        sub = _load(subspace)
        for t in tasks:
            sub.remove_task(t)
        sub.save(subspace)  # re-takes the same (re-entrant) lock
    console(quiet).print(f"removed {', '.join(tasks)}; {len(sub)} tasks left")


@click.command()
@click.argument("subspace", type=click.Path(exists=True))
@QUIET
@JSON
def validate(subspace, quiet, as_json):
    """Check a subspace: checksums, manifest against tensors, NaN/Inf, orthonormal bases,
    and each task's recorded error against its stored coordinates.

    Exits 1 when anything is wrong.
    """
    problems = []
    try:
        sub = _load(subspace)
    except SubspaceError as e:
        sub, problems = None, [str(e)]
    if sub is not None:
        for m, b in sub.modules.items():
            for name, x in (("U", b.U), ("V", b.V)):
                if not bool(torch.isfinite(x).all()):
                    problems.append(f"module {m}: {name} has NaN or Inf")
                    continue
                gram = x.T.double() @ x.double()
                eye = torch.eye(x.shape[1], dtype=gram.dtype)
                dev = float((gram - eye).abs().max()) if x.shape[1] else 0.0
                # rounded bases are orthonormal only to within their rounding step
                bits = b.quant[name].bits if b.quant else None
                tol = 4.0 * 2.0 ** (1 - bits) if bits else 1e-4
                if dev > tol:
                    problems.append(f"module {m}: {name} is not orthonormal (max |U^T U - I| = {dev:.2e}"
                                    f"{f', {bits}-bit bases allow {tol:.2g}' if bits else ''})")
        grams = {m: sub.grams(m) for m in sub.modules}
        for t in sub.tasks:
            task = sub.get_task(t)
            coords = [*task.coords_a.values(), *task.coords_b.values()]
            if not all(bool(torch.isfinite(x).all()) for x in coords):
                problems.append(f"task {t}: coordinates have NaN or Inf")
                continue
            # the manifest's errors are not under a checksum: they must at least agree with
            # what is stored, ||dW - dW^|| >= | ||dW|| - ||dW^|| | (a bound holds it too)
            for m in sub.modules:
                stored = linalg.inner_in_bases(sub.core(t, m), sub.core(t, m), *grams[m]) ** 0.5
                norm = task.norm_sq[m] ** 0.5
                if task.residual_sq[m] ** 0.5 < abs(norm - stored) - 1e-3 * max(norm, stored):
                    problems.append(f"task {t}: module {m}: the manifest's error is below what its "
                                    f"coordinates allow (||dW|| {norm:.4g}, stored {stored:.4g}, "
                                    f"error {task.residual_sq[m] ** 0.5:.4g})")
                    break
    if as_json:
        print_json({"ok": not problems, "problems": problems})
    elif problems:
        for p in problems:
            click.echo(f"FAIL {p}", err=True)
    else:
        console(quiet).print(f"OK {subspace}: {len(sub.modules)} modules, {len(sub)} tasks, "
                             "checksums, tensors and recorded errors checked")
    if problems:
        raise SystemExit(1)


def _folder_names(task_ids: list[str]) -> dict[str, str]:
    """A folder name per task id (ids are data: any printable text up to 256 characters):
    the id itself when it is a usable name, else a shortened one with a hash of the id.
    Names equal but for case or Unicode normalization get hashed names too, or they would
    share one folder on file systems that ignore those (macOS, Windows); so does an id that
    equals another's hashed name."""
    def hashed(t: str) -> str:
        digest = hashlib.sha256(t.encode()).hexdigest()[:12]
        return f"{t.encode()[:100].decode(errors='ignore').strip('.') or 'task'}-{digest}"

    def fold(name: str) -> str:
        return unicodedata.normalize("NFC", name).casefold()

    out = {t: t if t not in (".", "..") and len(t.encode()) <= 200 else hashed(t) for t in task_ids}
    while True:  # each round hashes at least one more id; hashed names differ by their digests
        seen = Counter(fold(n) for n in out.values())
        clash = [t for t, n in out.items() if seen[fold(n)] > 1 and n != hashed(t)]
        if not clash:
            return out
        out.update({t: hashed(t) for t in clash})


def _relative(diff_sq: float, norm_sq: float) -> float:
    """``||a - b|| / ||a||``: inf where a is zero and b is not (as analysis.DiffStats)."""
    if norm_sq:
        return math.sqrt(diff_sq / norm_sq)
    return math.inf if diff_sq else 0.0


@click.command()
@click.argument("subspace", type=click.Path(exists=True))
@click.argument("task_a")
@click.argument("task_b")
@QUIET
@JSON
def diff(subspace, task_a, task_b, quiet, as_json):
    """Compare two tasks of a subspace per module: relative difference and cosine of dW^."""
    sub = _load(subspace)
    rows, num, den, dot, nb = {}, 0.0, 0.0, 0.0, 0.0
    for m in sub.modules:
        ca, cb, grams = sub.core(task_a, m), sub.core(task_b, m), sub.grams(m)  # exact on quantized bases too
        d, na, nbm, ab = (linalg.inner_in_bases(x, y, *grams) for x, y in
                          ((ca - cb, ca - cb), (ca, ca), (cb, cb), (ca, cb)))
        cos = ab / math.sqrt(na * nbm) if na and nbm else 0.0
        rows[m] = {"relative_difference": _relative(d, na), "cosine": cos}
        num, den, dot, nb = num + d, den + na, dot + ab, nb + nbm
    total = {"relative_difference": _relative(num, den),
             "cosine": dot / math.sqrt(den * nb) if den and nb else 0.0}
    if as_json:
        print_json({"modules": rows, "total": total})
        return
    table = Table(title=f"{task_a} vs {task_b}")
    for col in ("module", "||dW_a - dW_b|| / ||dW_a||", "cosine"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for m, r in rows.items():
        table.add_row(m, f"{r['relative_difference']:.4f}", f"{r['cosine']:.4f}")
    table.add_row("all modules", f"{total['relative_difference']:.4f}", f"{total['cosine']:.4f}",
                  style="bold")
    console(quiet).print(table)

