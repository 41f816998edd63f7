"""A task's private part of a module: ``P Q^T``, a low-rank term of its own beside the
shared ``U C V^T`` (docs/DESIGN.md, "Shared and private parts").

Pure tensor mathematics, no I/O. A task's module is stored as

    dW^ = U L_B L_A^T V^T + P Q^T,     P (d_out, q), Q (d_in, q),

so per-adapter truncated SVD is the special case k = 0 (every part private) and today's
shared subspace the case q = 0. The private part is the best rank-q approximation of
what the shared part leaves, ``dW - U L_B L_A^T V^T``, computed from factors (never a
dense ``d_out x d_in`` matrix), and rounded in the same gauge-free way as coordinates.
"""

from __future__ import annotations

import torch

from vlora import linalg
from vlora.quantize import QuantizedTensor, dequantize, general_error_sq, quantize

F64 = torch.float64


def residual(us: torch.Tensor, vt: torch.Tensor, shared_b: torch.Tensor, shared_a: torch.Tensor
             ) -> linalg.Factor:
    """Canonical form ``(U, S, V)`` of ``dW - shared_b shared_a^T`` for ``dW = us vt^T``.

    Shapes: us ``(d_out, r)``, vt ``(d_in, r)``, shared_b ``(d_out, p)``, shared_a
    ``(d_in, p)``; the result has rank at most ``r + p``."""
    b = torch.cat([us.to(F64), -shared_b.to(F64)], dim=1)
    a = torch.cat([vt.to(F64), shared_a.to(F64)], dim=1)
    return linalg.canonical(b, a.T)


def fit(us: torch.Tensor, vt: torch.Tensor, shared_b: torch.Tensor, shared_a: torch.Tensor,
        rank: int, quant: tuple[int, str, int] | None = None
        ) -> tuple[torch.Tensor, torch.Tensor, QuantizedTensor | None, QuantizedTensor | None]:
    """The best rank-``rank`` private part ``P Q^T`` of what the shared part leaves.

    Returns ``P (d_out, q)``, ``Q (d_in, q)`` in float32 with ``q = min(rank, residual
    rank)``, and their codes when ``quant = (bits, method, block)`` rounds them (in
    :func:`~vlora.linalg.rounding_gauge`, so the rounding depends on ``P Q^T`` alone)."""
    u, s, v = residual(us, vt, shared_b, shared_a)
    q = min(rank, int((s > s[:1].clamp_min(1e-300) * 1e-12).sum()) if s.numel() else 0)
    return rounded(u[:, :q] * s[:q], v[:, :q], quant)


def rounded(p: torch.Tensor, q: torch.Tensor, quant: tuple[int, str, int] | None
            ) -> tuple[torch.Tensor, torch.Tensor, QuantizedTensor | None, QuantizedTensor | None]:
    """``P Q^T`` as stored: in the rounding gauge, float32, and rounded with ``quant =
    (bits, method, block)`` when given (then with its two codes)."""
    if p.shape[1] == 0:
        return p.float(), q.float(), None, None
    p, q = linalg.rounding_gauge(p.to(F64), q.to(F64))
    if quant is None:
        return p.float().contiguous(), q.float().contiguous(), None, None
    qp, qq = quantize(p.float(), *quant), quantize(q.float(), *quant)
    return dequantize(qp).float(), dequantize(qq).float(), qp, qq


def error_sq(us: torch.Tensor, vt: torch.Tensor, shared_b: torch.Tensor, shared_a: torch.Tensor,
             p: torch.Tensor, q: torch.Tensor) -> float:
    """``||dW - shared_b shared_a^T - P Q^T||^2`` for ``dW = us vt^T``, exact for any factors
    (rounded ones included), through Grams of width ``p + q`` (float64)."""
    b = torch.cat([shared_b.to(F64), p.to(F64)], dim=1)
    a = torch.cat([shared_a.to(F64), q.to(F64)], dim=1)
    return general_error_sq(us, vt, b, a, torch.eye(b.shape[1], dtype=F64))

