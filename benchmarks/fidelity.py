"""Fidelity against bytes on real MiniLM adapters, beside every baseline of DESIGN.md section 6.

For each regime (all adapters from one init seed, as transformers' Trainer gives by
default; or from independent seeds) and each N, at a fixed ratio of LoRA bytes:

* vlora: a subspace fitted by byte budget (float32 bases + coordinates);
* per-adapter truncated SVD at the same total bytes (no sharing at all);
* flattened-factor PCA, the method of vlora-dev 1.0 (PCA over tasks of each module's
  flattened A and B, here re-implemented from its description), at the same bytes;
* the mean adapter (a basis that learnt nothing);
* held-out adapters, only projected onto a subspace fitted without them.

Errors are relative dW errors, averaged over tasks. Accuracy kept (exported adapters
re-scored with PEFT on each task's held-out split) is measured for one ratio.

    python -m benchmarks.fidelity --one-seed DIR... --independent DIR...
"""

from __future__ import annotations

import math
import statistics

import torch

from vlora import LoRAWeights, SharedSubspace
from vlora.stats import svd_baseline_error

F64 = torch.float64


def lora_bytes(adapters: list[LoRAWeights]) -> int:
    return 4 * sum(a.num_lora_params() for a in adapters)


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


def compare_at_ratio(adapters: list[LoRAWeights], ids: list[str], ratio: float) -> dict:
    """Every method at ``lora_bytes / ratio`` total bytes (heads are counted apart)."""
    budget = lora_bytes(adapters) / ratio
    sub = SharedSubspace.from_adapters(adapters, task_ids=ids, budget=budget)
    stats = sub.compression_stats()
    numbers = stats["stored_bytes"] / 4 / len(adapters)
    shapes = adapters[0].shapes()
    svd = [svd_baseline_error({m: torch.linalg.svdvals(a.delta_weight(m)) for m in a.layer_names},
                              shapes, numbers) for a in adapters]
    pca, k_pca = flat_pca(adapters, stats["stored_bytes"])
    return {"n": len(adapters), "ratio_target": ratio, "ratio": stats["compression_ratio"],
            "stored_bytes": stats["stored_bytes"], "vlora": stats["mean_error"],
            "vlora_max": stats["max_error"], "svd": statistics.mean(svd),
            "flat_pca": statistics.mean(pca), "flat_pca_k": k_pca,
            "mean_adapter": statistics.mean(mean_adapter_errors(adapters)), "subspace": sub}


def held_out(adapters: list[LoRAWeights], ids: list[str], ratio: float, n_out: int) -> dict:
    """Fit on all but ``n_out`` adapters, then only project those."""
    fit, rest = adapters[:-n_out], adapters[-n_out:]
    sub = SharedSubspace.from_adapters(fit, task_ids=ids[:-n_out], budget=lora_bytes(fit) / ratio)
    errs = [sub.project(a, t).error for a, t in zip(rest, ids[-n_out:])]
    return {"fitted_mean": sub.compression_stats()["mean_error"], "held_out_mean": statistics.mean(errs),
            "n_fit": len(fit), "n_held_out": n_out}
