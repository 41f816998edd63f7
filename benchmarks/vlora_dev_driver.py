"""Runs inside vlora-dev 1.0.0's venv (see vlora_dev.py): one JSON request on stdin,
one JSON answer as the last line of stdout. Imports only vlora-dev, never our vlora.

Requests (``op``):

* ``version``: vlora-dev's version, where it was imported from, the peak RSS with it loaded.
* ``fit``: ``adapters`` (PEFT folders), ``ks``, ``out``: for each k, ``from_adapters``
  with ``num_components=k``, then each task's reconstruction written as
  ``out/k<k>/<i>/adapter_model.safetensors`` (the original file with its lora_A/lora_B
  tensors replaced, every other tensor kept). Answers compression_stats and seconds.
* ``scale``: ``paths`` (adapter folders), ``k``, ``mode`` (``batch`` or ``streaming``),
  optional ``absorb`` (one more folder): time of the build, the process's peak RSS after
  it, the mean relative dW error over tasks, and the time of one ``absorb_incremental``
  (on a copy) and, unless ``absorb_full`` is false, one ``absorb`` after it.
"""

import copy
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import vlora
from vlora import SharedSubspace, load_adapter
from vlora.io import _LORA_KEY_RE

VERSION = "1.0.0"


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) / 1024


def fit(req: dict) -> dict:
    paths = [Path(p) for p in req["adapters"]]
    adapters = [load_adapter(p) for p in paths]
    ids = [str(i) for i in range(len(paths))]
    fits = []
    for k in req["ks"]:
        t0 = time.perf_counter()
        sub = SharedSubspace.from_adapters(adapters, task_ids=ids, num_components=k)
        seconds = time.perf_counter() - t0
        stats = sub.compression_stats()
        del stats["components_per_layer"]
        for tid, path in zip(ids, paths):
            rec = sub.reconstruct(tid)
            state = load_file(str(path / "adapter_model.safetensors"))
            replaced = 0
            for key, tensor in state.items():
                match = _LORA_KEY_RE.search(key)
                if match and match.group(1) in rec.lora_a:
                    side = rec.lora_a if match.group(2) == "lora_A" else rec.lora_b
                    state[key] = side[match.group(1)].to(tensor.dtype).contiguous()
                    replaced += 1
            if replaced != 2 * len(rec.layer_names):
                raise RuntimeError(f"{path}: replaced {replaced} of {2 * len(rec.layer_names)} tensors")
            out = Path(req["out"]) / f"k{k}" / tid
            out.mkdir(parents=True)
            save_file(state, str(out / "adapter_model.safetensors"))
        fits.append({"k": k, "seconds": seconds, **stats})
    return {"fits": fits}


def mean_error(sub: SharedSubspace, paths: list[Path]) -> float:
    """Mean over tasks of ||B A - B^ A^|| / ||B A|| (one scale per adapter cancels), from r x r
    products: <B A, B' A'> = trace((B^T B') (A' A^T))."""
    errs = []
    for p in paths:
        orig, rec = load_adapter(p), sub.reconstruct(p.name)
        num = den = 0.0
        for m in rec.layer_names:
            a, b = orig.lora_a[m].double(), orig.lora_b[m].double()
            a2, b2 = rec.lora_a[m].double(), rec.lora_b[m].double()
            nn = float(((b.T @ b) * (a @ a.T)).sum())
            rr = float(((b2.T @ b2) * (a2 @ a2.T)).sum())
            nr = float(((b.T @ b2) * (a @ a2.T)).sum())
            num, den = num + max(nn + rr - 2 * nr, 0.0), den + nn
        errs.append((num / den) ** 0.5)
    return sum(errs) / len(errs)


def scale(req: dict) -> dict:
    paths = [Path(p) for p in req["paths"]]
    t0 = time.perf_counter()
    if req["mode"] == "streaming":
        sub = SharedSubspace.from_adapters_streaming(paths, num_components=req["k"])
    else:
        sub = SharedSubspace.from_adapters([load_adapter(p) for p in paths],
                                           task_ids=[p.name for p in paths], num_components=req["k"])
    row = {"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}
    stats = sub.compression_stats()
    row.update(stored_mb=4 * stats["total_params_compressed"] / 2**20,
               ratio=stats["compression_ratio"], k=sub.num_components,
               mean_error=mean_error(sub, paths))
    if req.get("absorb"):
        extra, twin = load_adapter(req["absorb"]), copy.deepcopy(sub)
        t0 = time.perf_counter()
        twin.absorb_incremental(extra, "absorbed")
        row["absorb_incremental_seconds"] = time.perf_counter() - t0
        if req.get("absorb_full", True):
            t0 = time.perf_counter()
            sub.absorb(extra, "absorbed")
            row["absorb_seconds"] = time.perf_counter() - t0
    return row


def main() -> None:
    if vlora.__version__ != VERSION or "site-packages" not in vlora.__file__:
        sys.exit(f"imported vlora {vlora.__version__} from {vlora.__file__}, not vlora-dev {VERSION}")
    torch.set_num_threads(1)
    req = json.loads(sys.stdin.read())
    if req["op"] == "version":
        ans = {"version": vlora.__version__, "path": vlora.__file__, "torch": torch.__version__,
               "peak_rss_mb": peak_rss_mb()}
    elif req["op"] == "fit":
        ans = fit(req)
    elif req["op"] == "scale":
        ans = scale(req)
    else:
        sys.exit(f"unknown op {req['op']!r}")
    print(json.dumps(ans))


if __name__ == "__main__":
    main()
