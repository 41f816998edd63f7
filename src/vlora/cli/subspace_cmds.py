"""Commands on subspaces: compress, info, export, add, remove, validate, diff."""

from __future__ import annotations

import hashlib
import math
import unicodedata
import warnings
from collections import Counter
from pathlib import Path

import click
import torch
from rich.table import Table

from vlora import linalg
from vlora.adapter import LoRAWeights
from vlora.cli.common import (
    JSON,
    QUIET,
    check_adapter_output,
    console,
    human_bytes,
    parse_size,
    print_json,
    progress_enabled,
    split_ids,
)
from vlora.cli.sources import HELP as SOURCES_HELP
from vlora.cli.sources import AdapterSource, any_hub, parse_hub_id, require_no_urls
from vlora.compress import compress as fit_to_bytes
from vlora.devices import fit_device
from vlora.errors import DeviceError, SubspaceError
from vlora.inputs import default_task_id
from vlora.io import adapter_disk_bytes, load_adapter, save_adapter
from vlora.sharing import private_within
from vlora.stats import (
    adapter_lora_bytes,
    directory_bytes,
    growth_headroom,
    ratio_target,
    record_baselines,
    stored_bytes,
    task_stored_bytes,
)
from vlora.storage import MANIFEST, lock
from vlora.subspace import SharedSubspace


def summary(sub: SharedSubspace, path: str | Path | None = None) -> dict:
    """The figures ``compress`` and ``info`` print (also their ``--json``); with ``path``,
    the subspace folder's bytes on disk (every file) against its inputs' adapter files,
    when every task's original is still at hand (None otherwise)."""
    stats = sub.compression_stats()
    ks = [(b.k_out, b.k_in) for b in sub.modules.values()]
    disk = directory_bytes(path) if path is not None else None
    inputs = [adapter_disk_bytes(sub.get_task(t).source) if sub.get_task(t).source else None
              for t in sub.tasks]
    input_disk = sum(inputs) if inputs and None not in inputs else None
    return {
        "tasks": sub.tasks, "num_modules": len(sub.modules),
        "k_out": [min(k for k, _ in ks), max(k for k, _ in ks)],
        "k_in": [min(k for _, k in ks), max(k for _, k in ks)],
        **{k: stats[k] for k in ("basis_bytes", "task_bytes", "private_bytes", "overhead_bytes",
                                 "stored_bytes", "files", "original_bytes",
                                 "extra_bytes", "compression_ratio", "mean_error", "max_error",
                                 "svd_bits", "svd_mean_error", "svd_max_error", "svd_tasks",
                                 "errors_are_bounds", "private_energy_share", "tasks_with_private")},
        "fit_candidates": {n: {"bytes": b, "mean_error": e} for n, (b, e) in sub.fit_report.items()},
        "per_task": {t: {"error": stats["task_errors"][t], "svd_error": stats["svd_task_errors"][t],
                         "coverage": sub.task_coverage(t),
                         "error_is_bound": sub.get_task(t).error_is_bound} for t in sub.tasks},
        "modules": stats["modules"],
        "quantization": sub.quantization,
        "dropped_modules": {t: sorted(sub.get_task(t).dropped_sq) for t in sub.tasks
                            if sub.get_task(t).dropped_sq},
        "disk_bytes": disk, "input_disk_bytes": input_disk,
        "disk_ratio": input_disk / disk if disk and input_disk else None,
    }


def _figure(x: float | None) -> str:
    return "unknown" if x is None else f"{x:.4f}"


def print_summary(sub: SharedSubspace, data: dict, quiet: bool) -> None:
    out = console(quiet)
    table = Table(title="Per-task relative dW error (lower is better)")
    svd = "SVD at equal bytes" + (f" ({data['svd_bits']}-bit)" if data["svd_bits"] < 32 else "")
    for col in ("task", "vlora error", svd, "coverage"):
        table.add_column(col, justify="left" if col == "task" else "right",
                         overflow="fold")  # a cut name could read as another task's
    for t, row in data["per_task"].items():
        err = f"{row['error']:.4f}" + (" (bound)" if row["error_is_bound"] else "")
        table.add_row(t, err, _figure(row["svd_error"]), f"{row['coverage']:.3f}")
    table.add_row("mean", f"{data['mean_error']:.4f}", _figure(data["svd_mean_error"]), "",
                  style="bold")
    out.print(table)
    if data["svd_tasks"]:
        rounding = ", its rounding error too" if data["svd_bits"] < 32 else ""
        out.print(f"(SVD: each adapter truncated alone with the same bytes per adapter, factors, "
                  f"scales and adapter_config.json counted{rounding}; measured when each task "
                  "was stored)")
    if data["svd_tasks"] < len(data["tasks"]):
        out.print(f"(SVD unknown for {len(data['tasks']) - data['svd_tasks']} task(s) stored without "
                  "their original at hand)")
    if data["tasks_with_private"]:
        out.print(f"Private parts: {data['tasks_with_private']} of {len(data['tasks'])} tasks, "
                  f"{human_bytes(data['private_bytes'])}, "
                  f"{100 * data['private_energy_share']:.1f}% of the adapters' energy")
    fits = data["fit_candidates"]
    if fits:
        out.print("Fits compared at this byte target: " + ", ".join(
            f"{n} {f['mean_error']:.4f}" for n, f in fits.items()) + " (mean error)")
    out.print(f"{len(data['tasks'])} tasks, {data['num_modules']} modules, "
              f"k_out {data['k_out'][0]}..{data['k_out'][1]}, k_in {data['k_in'][0]}..{data['k_in'][1]}")
    out.print(f"LoRA bytes: {human_bytes(data['original_bytes'])} -> {human_bytes(data['stored_bytes'])}"
              f" (basis {human_bytes(data['basis_bytes'])} + tasks {human_bytes(data['task_bytes'])}"
              f" + private {human_bytes(data['private_bytes'])} + manifest and headers "
              f"{human_bytes(data['overhead_bytes'])}: the folder's bytes without the heads),"
              f" [bold]{_times(data['compression_ratio'])}[/bold]; non-LoRA tensors "
              f"(heads) kept as they are: {human_bytes(data['extra_bytes'])}")
    if data["disk_bytes"] is not None:
        versus = ("" if data["input_disk_bytes"] is None else
                  f" against {human_bytes(data['input_disk_bytes'])} of input adapter files, "
                  f"{_times(data['disk_ratio'])}")
        out.print(f"Whole folder on disk (heads, manifest and all): "
                  f"{human_bytes(data['disk_bytes'])}{versus}")
    for t, modules in data["dropped_modules"].items():
        out.print(f"{t}: {len(modules)} module(s) not in the subspace, lost in full in its error: "
                  f"{', '.join(modules[:3])}{', ...' if len(modules) > 3 else ''}")
    larger = [f"{what} {x:.2f}x" for what, x in (("LoRA bytes", data["compression_ratio"]),
                                                  ("whole folder", data["disk_ratio"]))
              if x is not None and 0 < x < 1]  # 0: no task holds LoRA bytes
    if larger:
        warnings.warn(f"the subspace is larger than its inputs ({', '.join(larger)}): choose a "
                      "smaller k, --variance-threshold, --ratio or --budget", UserWarning, stacklevel=2)


def _times(ratio: float) -> str:
    """``4.00x smaller``, or ``1.05x larger`` for a ratio below 1 (0: no LoRA bytes in)."""
    if ratio == 0:
        return "no ratio (no task holds LoRA weights)"
    return f"{ratio:.2f}x smaller" if ratio >= 1 else f"{1 / ratio:.2f}x larger"


def _load(path: str) -> SharedSubspace:
    return SharedSubspace.load(path)


def _an_adapter(ray_address: str) -> bool:
    """Whether ``--ray``'s value is an adapter (a path, Hub id or fsspec URL), not a
    cluster's address (``auto``, ``host:6379``, ``ray://host:10001``). ``local`` (bare
    ``--ray``) and ``auto`` are addresses even where a folder of that name exists."""
    if ray_address in ("local", "auto"):
        return False
    return Path(ray_address).exists() or parse_hub_id(ray_address) is not None or (
        "://" in ray_address and not ray_address.startswith("ray://"))


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


@click.command(epilog=SOURCES_HELP + " With --ray, also fsspec URLs (s3://, memory://, hf://, "
               "file://, ...) that the Ray workers read.")
@click.argument("adapters", nargs=-1, required=True, type=AdapterSource(urls=True))
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
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", metavar="[ADDRESS]",
              help="Fit on a Ray cluster (pip install 'vlora[ray]'): a local one with no ADDRESS, "
                   "else e.g. --ray=auto or --ray=ray://host:10001.")
@click.option("--missing-modules", type=click.Choice(["error", "skip", "zero"]), default="error",
              show_default=True, help="What to do with modules only some adapters have.")
@click.option("--private", type=click.Choice(["auto", "none"]), default="auto", show_default=True,
              help="With --budget/--ratio: auto keeps a private part per task where sharing does "
                   "not pay (never worse than compressing each adapter alone); none shares every "
                   "byte (one shared path for mixed batches; info says what it costs).")
@click.option("--device", help="Run the fit's linear algebra here: cpu, cuda or cuda:N (float64 on "
                                "either; the subspace is stored from the CPU). Default: the CPU.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it is already a subspace (only then).")
@QUIET
@JSON
def compress(adapters, output, num_components, k_out, k_in, variance_threshold, budget, ratio, bits,
             module_weights, task_ids, streaming, ray_address, missing_modules, private, device, force,
             quiet, as_json):
    """Compress LoRA adapters (folders, Hub ids org/name[@revision]) into one shared subspace.

    \b
    Examples:
      vlora compress adapters/* -o sub -k 16
      vlora compress org/adapter-a org/adapter-b@v2 adapters/c -o sub --ratio 10
      vlora compress adapters/* -o sub --ratio 10
      vlora compress adapters/* -o sub --ratio 10 --bits 6
      vlora compress a/ b/ c/ -o sub --task-ids sales,legal,support --budget 2MB
      vlora compress adapters/* -o sub --ratio 10 --bits 6 --module-weight value=2
      vlora compress adapters/* -o sub --ratio 10 --device cuda
    """
    if device is not None:
        if ray_address is not None:
            raise click.UsageError("--device runs the fit on this machine; --ray fits on the cluster")
        try:
            device = fit_device(device)
        except DeviceError as e:  # before any adapter is read
            raise click.BadParameter(str(e), param_hint="'--device'") from None
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
    if ids is None and any_hub(adapters):  # a Hub adapter's folder is named by its commit
        ids = [s.task_id for s in adapters]
    k = (k_out, k_in) if k_out is not None else num_components
    progress = progress_enabled(quiet)
    if ray_address is None:
        require_no_urls(adapters, "compress reads adapters from URLs with --ray only (its "
                        "workers fetch them): add --ray, or copy the adapters to local folders")
    if ray_address is not None:
        if _an_adapter(ray_address):  # click took the first adapter for the address
            raise click.UsageError(f"--ray took {ray_address} for the cluster's address: write "
                                   "--ray=ADDRESS, or --ray after the adapters")
        if streaming or module_weights or missing_modules != "error":
            raise click.UsageError("--ray goes without --streaming, --module-weight and "
                                   "--missing-modules (every adapter must have the same modules)")
        if (budget or ratio) and private == "auto":
            warnings.warn("--ray fits shared parts only (no private parts): at this byte target "
                          "it may store the adapters worse than truncating each alone; without "
                          "--ray, compress compares both and keeps the better", UserWarning, stacklevel=2)
        sub = SharedSubspace.from_adapters_distributed(
            [s.local() for s in adapters], task_ids=ids, num_components=k,
            variance_threshold=variance_threshold,
            budget=budget, ratio=ratio, bits=int(bits) if bits else None, address=ray_address,
            progress=progress)
    elif streaming:
        if budget or ratio:
            raise click.UsageError("--streaming takes -k or --variance-threshold")
        sub = SharedSubspace.from_adapters_streaming(
            [s.local() for s in adapters], task_ids=ids, num_components=k or 16,
            variance_threshold=variance_threshold, progress=progress, device=device)
        if bits:
            sub.quantize(int(bits), coordinates=True)
    else:
        loaded = [load_adapter(s.local()) for s in adapters]
        if any_hub(adapters) and task_ids is None:  # a local folder's id as without Hub ids
            ids = [s.task_id if s.kind == "hub" else default_task_id(a, i)
                   for i, (s, a) in enumerate(zip(adapters, loaded))]
        sub = fit_to_bytes(loaded, ids, budget=budget, ratio=ratio,
                           bits=int(bits) if bits else None, num_components=k,
                           variance_threshold=variance_threshold, module_weights=module_weights,
                           missing_modules=missing_modules, private=private, progress=progress,
                           device=device)
    sub.save(output)
    data = summary(sub, output)
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
    """Show modules, k, tasks, bytes and errors of a subspace (computed from what is stored).

    \b
    Examples:
      vlora info sub
      vlora info sub --json
    """
    sub = _load(subspace)
    data = summary(sub, subspace)
    if as_json:
        print_json(data)
        return
    out = console(quiet)
    table = Table(title=f"{subspace}: modules")
    private = bool(data["tasks_with_private"])  # then bytes shared and private per module
    cols = ("module", "d_out x d_in", "k_out", "k_in", *(("shared", "private") if private else ()),
            "mean error")
    for col in cols:  # names whole: cut, q and v look alike
        table.add_column(col, justify="left" if col == "module" else "right",
                         overflow="fold" if col == "module" else "ellipsis")
    for m, row in data["modules"].items():
        split = (human_bytes(row["basis_bytes"] + row["task_bytes"]), human_bytes(row["private_bytes"]))
        table.add_row(m, f"{row['d_out']} x {row['d_in']}", str(row["k_out"]), str(row["k_in"]),
                      *(split if private else ()), f"{row['mean_error']:.4f}")
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
@click.option("--vllm", is_flag=True, help="Write what vLLM accepts (no modules_to_save, one rank); "
              "a task with heads (modules_to_save) is refused, as vLLM would serve another model.")
@click.option("--force", is_flag=True, help="Replace adapters already in the output folders; with "
              "--vllm, also write tasks without the heads vLLM refuses.")
@QUIET
@JSON
def export(subspace, tasks, output, all_tasks, rank, dtype, vllm, force, quiet, as_json):
    """Write tasks back as standard PEFT adapters.

    \b
    Examples:
      vlora export sub sales -o sales-lora
      vlora export sub --all -o exported/ --vllm
    """
    if all_tasks and tasks:
        raise click.UsageError(f"name tasks ({', '.join(tasks)}) or pass --all, not both")
    sub = _load(subspace)
    names = sub.tasks if all_tasks else list(tasks)
    if not names:
        raise (SubspaceError(f"{subspace}: no tasks to export") if all_tasks else
               click.UsageError("name at least one task, or pass --all"))
    folders = _folder_names(names)
    targets = {t: Path(output) / folders[t] if len(names) > 1 or all_tasks else Path(output)
               for t in names}
    if len(names) > 1 or all_tasks:
        check_adapter_output(output, force=True)  # the parent folder: not a subspace's either
    for t, target in targets.items():  # fail before writing anything
        if not any(sub.get_task(t).ranks().values()):
            raise SubspaceError(f"task {t!r} has no LoRA weights in {subspace} (rank 0 in every "
                                "module): nothing to export")
        check_adapter_output(target, force)
    heads = {t: sorted(sub.get_task(t).extra) for t in names if vllm and sub.get_task(t).extra}
    if heads:
        what = "; ".join(f"{t}: {', '.join(k[:4])}{', ...' if len(k) > 4 else ''}"
                         for t, k in list(heads.items())[:3])
        message = (f"--vllm drops the heads (modules_to_save) of {len(heads)} task(s), which vLLM "
                   f"refuses ({what}): the exported adapters are NOT the models the tasks are")
        if not force:
            raise click.UsageError(f"{message}; pass --force to export them anyway, or export "
                                   "without --vllm")
        warnings.warn(message, UserWarning, stacklevel=2)
    out = console(quiet or as_json)
    done = {}
    for t, target in targets.items():
        left_out = save_adapter(sub.reconstruct(t, getattr(torch, dtype) if dtype else None, rank),
                                target, for_vllm=vllm)
        done[t] = {"folder": str(target), "left_out": list(left_out)}
        out.print(f"{t} -> {target}" + (f" (left out: {', '.join(left_out)})" if left_out else ""))
    if as_json:
        print_json({"exported": done})


def _subspace_folder(path: str) -> str:
    """``path`` if it holds a subspace; checked before the lock, which writes a file."""
    if not (Path(path) / MANIFEST).is_file():
        raise SubspaceError(f"{path}: not a vlora subspace (no {MANIFEST}); nothing written")
    return path


def _format_line(sub: SharedSubspace) -> str | None:
    q = sub.quantization
    return q and (f"kept the {q['bits']}-bit {q['method']} storage: changed bases"
                  f"{' and coordinates' if q['coordinates'] else ''} quantized again")


def _bytes_line(before: int, after: int) -> str:
    return f"stored bytes: {human_bytes(before)} -> {human_bytes(after)} ({after - before:+,d} B)"


def _incremental(sub: SharedSubspace, adapter: LoRAWeights, tid: str, grow: str, keeps_private: bool):
    """``absorb_incremental`` of one adapter as ``--grow`` says; returns its report and
    what it chose, in words. In a subspace that keeps private parts, ``auto`` keeps k: the
    new task's bytes go to its own private part, as the fit found better for its tasks."""
    if grow == "none":
        return sub.absorb_incremental(adapter, tid), "kept k"
    if grow == "auto" and keeps_private:
        return sub.absorb_incremental(adapter, tid), "kept k (this subspace keeps private parts: " \
            "the new task gets one, within the compression ratio)"
    ks = {m: (b.k_out, b.k_in) for m, b in sub.modules.items()}
    before = stored_bytes(sub)
    if grow == "full":
        report = sub.absorb_incremental(adapter, tid, grow=True)
    else:  # auto: grow where it keeps the most, as far as the compression ratio allows
        headroom = growth_headroom(sub, sub.project(adapter, tid))
        report = sub.absorb_incremental(adapter, tid, grow_bytes=max(headroom, 0.0))
    grew = {m: (b.k_out - ks[m][0], b.k_in - ks[m][1]) for m, b in sub.modules.items()
            if (b.k_out, b.k_in) != ks[m]}
    if not grew:
        return report, ("kept k" if grow == "full" else
                        "kept k (growing would lower the compression ratio)")
    own = task_stored_bytes(sub.get_task(tid))
    return report, (f"grew k in {len(grew)} of {len(sub.modules)} modules (k_out +"
                    f"{sum(o for o, _ in grew.values())}, k_in +{sum(i for _, i in grew.values())}"
                    f" directions in all): +{human_bytes(stored_bytes(sub) - before - own)} "
                    f"beyond the new task's own {human_bytes(own)}")


@click.command(epilog=SOURCES_HELP)
@click.argument("subspace", type=click.Path(exists=True))
@click.argument("adapters", nargs=-1, required=True, type=AdapterSource())
@click.option("--task-ids", help="Comma-separated ids (default: folder names; a Hub id's "
              "repository name).")
@click.option("--incremental", is_flag=True,
              help="Update the basis at a cost independent of the number of tasks.")
@click.option("--grow", type=click.Choice(["auto", "full", "none"]), default="auto", show_default=True,
              help="With --incremental: let k grow by the new adapter's rank (full), keep k "
                   "(none), or grow where it keeps old tasks best while the compression ratio "
                   "holds (auto).")
@click.option("--project-only", is_flag=True,
              help="Keep the basis; only store the new tasks' coordinates.")
@QUIET
@JSON
def add(subspace, adapters, task_ids, incremental, grow, project_only, quiet, as_json):
    """Add adapters to a subspace; by default the basis is refit on all tasks (absorb).

    Prints each old task's error before and after, the drift of its reconstruction, and
    the stored bytes before and after. A quantized subspace stays quantized.

    \b
    Examples:
      vlora add sub adapters/new_task
      vlora add sub adapters/new_task --incremental
      vlora add sub adapters/new_task --incremental --grow full
      vlora add sub adapters/new_task --project-only
      vlora add sub org/new-task@main
    """
    if incremental and project_only:
        raise click.UsageError("--incremental and --project-only exclude each other: pick one")
    if grow != "auto" and not incremental:
        raise click.UsageError("--grow goes with --incremental")
    mode = "incremental" if incremental else "project" if project_only else "absorb"
    ids = split_ids(task_ids)
    ids = [s.task_id for s in adapters] if ids is None else ids
    if len(ids) != len(adapters):
        raise click.UsageError(f"{len(ids)} task ids for {len(adapters)} adapters")
    folder = _subspace_folder(subspace)
    paths = [s.local() for s in adapters]  # Hub ids fetched (or found in the cache) first
    with lock(folder):
        sub = _load(subspace)
        before = stored_bytes(sub)
        reports, chose, private = {}, {}, {}
        # a subspace whose fit kept private parts gives a new task one too, within its ratio
        keeps_private = mode != "project" and any(sub.get_task(t).private for t in sub.tasks)
        for path, tid in zip(paths, ids):
            adapter = load_adapter(path)
            target = ratio_target(sub, adapter_lora_bytes(sub, adapter))
            if mode == "project":
                sub.add_task(sub.project(adapter, tid))
            elif mode == "incremental":
                reports[tid], chose[tid] = _incremental(sub, adapter, tid, grow, keeps_private)
            else:
                reports[tid] = sub.absorb(adapter, tid)
            if keeps_private:
                private[tid] = private_within(sub, adapter, tid, target)
            record_baselines(sub, {tid: adapter})
        sub.save(subspace)  # re-takes the same (re-entrant) lock
    after = stored_bytes(sub)
    rows = {new: {old: vars(r) for old, r in rep.items()} for new, rep in reports.items()}
    if as_json:
        print_json({"added": ids, "old_tasks": rows, "growth": chose, "private_ranks": private,
                    "new_errors": {t: sub.task_error(t) for t in ids},
                    "dropped_modules": {t: sorted(sub.get_task(t).dropped_sq) for t in ids
                                        if sub.get_task(t).dropped_sq},
                    "stored_bytes_before": before, "stored_bytes_after": after,
                    "quantization": sub.quantization})
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
        if new in chose:
            out.print(f"{new}: {chose[new]}")
    for t in ids:
        dropped = len(sub.get_task(t).dropped_sq)
        own = sum(private.get(t, {}).values())
        out.print(f"added {t}: error {sub.task_error(t):.4f}, coverage {sub.task_coverage(t):.3f}"
                  + (f", private rank {own} over {len(private[t])} module(s)" if own else "")
                  + (f" ({dropped} module(s) not in the subspace, lost in full)" if dropped else ""))
    out.print(_bytes_line(before, after))
    if _format_line(sub):
        out.print(_format_line(sub))


@click.command()
@click.argument("subspace", type=click.Path(exists=True))
@click.argument("tasks", nargs=-1, required=True)
@QUIET
@JSON
def remove(subspace, tasks, quiet, as_json):
    """Remove tasks from a subspace (the basis is kept); prints the stored bytes before
    and after.

    \b
    Examples:
      vlora remove sub old_task
      vlora remove sub task_a task_b --json
    """
    with lock(_subspace_folder(subspace)):
        sub = _load(subspace)
        before = stored_bytes(sub)
        for t in tasks:
            sub.remove_task(t)
        sub.save(subspace)  # re-takes the same (re-entrant) lock
    after = stored_bytes(sub)
    if as_json:
        print_json({"removed": list(tasks), "tasks": sub.tasks, "stored_bytes_before": before,
                    "stored_bytes_after": after, "quantization": sub.quantization})
        return
    out = console(quiet)
    out.print(f"removed {', '.join(tasks)}; {len(sub)} tasks left")
    out.print(_bytes_line(before, after))


@click.command()
@click.argument("subspace", type=click.Path(exists=True))
@QUIET
@JSON
def validate(subspace, quiet, as_json):
    """Check a subspace: checksums, manifest against tensors, NaN/Inf, orthonormal bases,
    and each task's recorded error against its stored coordinates.

    Exits 1 when anything is wrong.

    \b
    Examples:
      vlora validate sub
      vlora validate sub --json
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
            coords = [*task.coords_a.values(), *task.coords_b.values(),
                      *(x for pq in task.private.values() for x in pq)]
            if not all(bool(torch.isfinite(x).all()) for x in coords):
                problems.append(f"task {t}: coordinates have NaN or Inf")
                continue
            # the recorded errors must at least agree with what is stored,
            # ||dW - dW^|| >= | ||dW|| - ||dW^|| | (a bound holds it too)
            for m in sub.modules:
                stored = sub.stored_norm_sq(t, m, grams[m]) ** 0.5
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
    """Compare two tasks of a subspace per module: relative difference and cosine of dW^.

    \b
    Example:
      vlora diff sub sales legal
    """
    sub = _load(subspace)
    rows, num, den, dot, nb = {}, 0.0, 0.0, 0.0, 0.0
    for m in sub.modules:
        (ba, aa), (bb, ab_) = sub.factors(task_a, m), sub.factors(task_b, m)  # shared and private
        d = linalg.frobenius_sq(torch.cat([ba, -bb], 1), torch.cat([aa, ab_], 1).T)
        na, nbm = linalg.frobenius_sq(ba, aa.T), linalg.frobenius_sq(bb, ab_.T)
        ab = linalg.inner(ba, aa.T, 1.0, bb, ab_.T, 1.0)
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
        table.add_column(col, justify="left" if col == "module" else "right",
                         overflow="fold" if col == "module" else "ellipsis")
    for m, r in rows.items():
        table.add_row(m, f"{r['relative_difference']:.4f}", f"{r['cosine']:.4f}")
    table.add_row("all modules", f"{total['relative_difference']:.4f}", f"{total['cosine']:.4f}",
                  style="bold")
    console(quiet).print(table)

