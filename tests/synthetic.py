"""Synthetic adapters with a planted answer, and the LoRA gauge transform."""

from __future__ import annotations

import torch

from vlora import LoRAWeights, save_adapter

MODULES = ["layer.0.q", "layer.0.v", "layer.1.q"]


def planted(n: int, dim: int = 6, d_out: int = 40, d_in: int = 32, r: int = 4, seed: int = 0,
            modules=MODULES, noise: float = 0.0, scale: float = 2.0,
            dtype: torch.dtype = torch.float32) -> list[LoRAWeights]:
    """``n`` adapters whose dW all lie in one ``dim``-dimensional subspace per module side."""
    g = torch.Generator().manual_seed(seed)
    bases = {m: (torch.linalg.qr(torch.randn(d_out, dim, generator=g, dtype=torch.float64))[0],
                 torch.linalg.qr(torch.randn(d_in, dim, generator=g, dtype=torch.float64))[0])
             for m in modules}
    out = []
    for _ in range(n):
        a, b = {}, {}
        for m, (u, v) in bases.items():
            b[m] = (u @ torch.randn(dim, r, generator=g, dtype=torch.float64)
                    + noise * torch.randn(d_out, r, generator=g, dtype=torch.float64)).to(dtype)
            a[m] = (torch.randn(r, dim, generator=g, dtype=torch.float64) @ v.T
                    + noise * torch.randn(r, d_in, generator=g, dtype=torch.float64)).to(dtype)
        out.append(LoRAWeights(list(modules), a, b, {m: scale for m in modules},
                               config={"r": r, "lora_alpha": scale * r}))
    return out


def regauge(adapter: LoRAWeights, seed: int = 1) -> LoRAWeights:
    """The same adapter as ``(B G, G^-1 A)`` for a random invertible G times a permutation."""
    g = torch.Generator().manual_seed(seed)
    a, b = {}, {}
    for m in adapter.layer_names:
        r = adapter.lora_a[m].shape[0]
        mix = torch.randn(r, r, generator=g, dtype=torch.float64) + 2 * torch.eye(r, dtype=torch.float64)
        mix = mix[torch.randperm(r, generator=g)]
        b[m] = (adapter.lora_b[m].double() @ mix).to(adapter.lora_b[m].dtype)
        a[m] = (torch.linalg.solve(mix, adapter.lora_a[m].double())).to(adapter.lora_a[m].dtype)
    return LoRAWeights(list(adapter.layer_names), a, b, dict(adapter.scales), dict(adapter.extra),
                       dict(adapter.config), adapter.source, adapter.sha256)


def dense_error(original: LoRAWeights, recon: LoRAWeights) -> float:
    num = sum(float((original.delta_weight(m) - recon.delta_weight(m)).norm() ** 2)
              if m in recon.lora_a else float(original.delta_weight(m).norm() ** 2)
              for m in original.layer_names)
    den = sum(float(original.delta_weight(m).norm() ** 2) for m in original.layer_names)
    return (num / den) ** 0.5


def saved(adapters: list[LoRAWeights], folder, prefix: str = "t") -> list:
    """Save each adapter as a PEFT folder ``folder/<prefix><i>`` (originals on disk, as
    exact errors need); returns the paths."""
    paths = [folder / f"{prefix}{i}" for i in range(len(adapters))]
    for a, p in zip(adapters, paths):
        save_adapter(a, p)
    return paths
