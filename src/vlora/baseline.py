"""The baseline every figure is measured against: each adapter truncated on its own.

Per-adapter truncated SVD with a byte budget per adapter, charged what a user storing it
would pay: its factors' numbers (float32, or ``bits``-bit codes with one float32 scale per
block of 64, padded to whole blocks, one tensor per factor), and an ``adapter_config.json``
per adapter as PEFT writes it. Its rounding error is counted exactly (the factors are
rounded in the same gauge-free way vlora rounds its own numbers). Ranks are shared over
the adapter's modules greedily, by the squared singular value kept per byte.
"""

from __future__ import annotations

import json
import math

import torch

from vlora import linalg
from vlora.adapter import LoRAWeights
from vlora.io import config_for
from vlora.packing import code_bytes
from vlora.quantize import dequantize, general_error_sq, quantize

F64 = torch.float64
BLOCK = 64


def factor_bytes(d: int, rank: int, bits: int | None) -> int:
    """Bytes of one ``(d, rank)`` factor: float32, or codes plus block scales."""
    if bits is None:
        return 4 * d * rank
    nbytes, blocks = code_bytes(d * rank, (bits, "symmetric", BLOCK, None))
    return nbytes + 4 * blocks


def config_bytes(adapter: LoRAWeights) -> int:
    """Bytes of the adapter_config.json PEFT needs beside the factors."""
    return len(json.dumps(config_for(adapter), indent=2, sort_keys=True).encode())


def svd_ranks(spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
              nbytes: float, bits: int | None) -> dict[str, int]:
    """Ranks per module within ``nbytes`` (factors only), greedily by the squared singular
    value kept per byte, each rank priced at what it adds to the two padded factors."""
    def steps(m: str) -> list[int]:
        size = [sum(factor_bytes(d, r, bits) for d in shapes[m]) for r in range(spectra[m].numel() + 1)]
        return [b - a for a, b in zip(size, size[1:])]

    return linalg.allocate_budget({m: s.square() for m, s in spectra.items()},
                                  {m: steps(m) for m in spectra}, nbytes, minimum=0)


def svd_quantized(adapter: LoRAWeights, nbytes: float, bits: int | None = None
                  ) -> tuple[LoRAWeights, float, int]:
    """Per-adapter truncated SVD of ``adapter`` in at most ``nbytes`` (config included).

    Returns the adapter as it would be loaded (scale 1), its relative dW error with the
    rounding counted, and the bytes it takes."""
    shapes = adapter.shapes()
    can = {m: linalg.canonical(adapter.lora_b[m], adapter.lora_a[m], adapter.scales[m])
           for m in adapter.layer_names}
    config = config_bytes(adapter)
    ranks = svd_ranks({m: s for m, (_, s, _) in can.items()}, shapes, nbytes - config, bits)
    a, b, lost, total, used = {}, {}, 0.0, 0.0, config
    for m, (u, s, v) in can.items():
        q = ranks[m]
        lb, la = linalg.rounding_gauge(u[:, :q] * s[:q], v[:, :q]) if q else (u[:, :0], v[:, :0])
        if bits is not None and q:
            lb, la = (dequantize(quantize(x.float(), bits)).to(F64) for x in (lb, la))
        lost += general_error_sq(u * s, v, lb, la, torch.eye(q, dtype=F64))
        total += float(s.square().sum())
        used += factor_bytes(shapes[m][0], q, bits) + factor_bytes(shapes[m][1], q, bits)
        if q:
            b[m], a[m] = lb.float(), la.T.contiguous().float()
    out = LoRAWeights(list(a), a, b, {m: 1.0 for m in a}, dict(adapter.extra), dict(adapter.config))
    out.config = config_for(out) if a else out.config
    return out, math.sqrt(lost / total) if total > 0 else 0.0, used
