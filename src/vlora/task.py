"""One task inside a subspace: its coordinates, and how far it is from its original.

A task stores, per module, coordinates ``L_B = U^T (s B)`` ``(k_out, r)`` and
``L_A = V^T A^T`` ``(k_in, r)``; its core ``C = L_B L_A^T`` is gauge-invariant
(DESIGN.md section 3). It may also hold a private part ``P Q^T`` per module
(:mod:`vlora.private`): ``dW^ = U C V^T + P Q^T``. Errors are kept as absolute squared residuals per module
in float64, so that per-module and whole-adapter figures, and bounds after the
basis moves, all follow exactly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vlora import linalg, private
from vlora.adapter import LoRAWeights
from vlora.quantize import QuantizedTensor, dequantize, general_error_sq, quantize

F64 = torch.float64


@dataclass
class ModuleBasis:
    """Shared bases of one module: ``U (d_out, k_out)``, ``V (d_in, k_in)`` and their Grams
    ``G_u = U^T (sum_t w_t dW_t dW_t^T) U`` ``(k_out, k_out)`` (``G_v`` likewise)."""

    U: torch.Tensor
    V: torch.Tensor
    G_u: torch.Tensor
    G_v: torch.Tensor
    quant: dict[str, QuantizedTensor] | None = None  # stored codes of U and V, if quantized

    @property
    def d_out(self) -> int:
        return self.U.shape[0]

    @property
    def d_in(self) -> int:
        return self.V.shape[0]

    @property
    def k_out(self) -> int:
        return self.U.shape[1]

    @property
    def k_in(self) -> int:
        return self.V.shape[1]


@dataclass
class TaskProjection:
    """A task's coordinates in a subspace, with its error against the original adapter.

    Attributes:
        task_id: the task's name (data, never a path).
        coords_b / coords_a: module -> ``L_B (k_out, r)`` / ``L_A (k_in, r)``, float32.
        norm_sq: module -> ``||dW||_F^2`` of the original adapter.
        residual_sq: module -> ``||dW - dW^||_F^2`` (exact, or an upper bound when
            ``error_is_bound`` after the basis moved and the original was not at hand).
        spectrum: module -> singular values of the original ``dW`` (for baselines).
        weight: the task's weight in basis fits (``1 / ||dW||^2`` by default).
        gram_share: how the bases' Grams hold the task's energy: ``"original"`` (its
            adapter's, as fits and incremental absorbs put it), ``"stored"`` (its stored
            reconstruction's, as a full absorb refits old tasks) or None (not at all: a
            projection added on its own).
        extra: non-LoRA tensors (``modules_to_save``), stored as they are.
        config, dtype, source, sha256: what the original adapter was.
        dropped_sq: module -> ``||dW||_F^2`` of the original adapter's modules the subspace
            lacks (``missing_modules="skip"``): lost in full, so they count in :attr:`error`.
        private: module -> ``(P (d_out, q), Q (d_in, q))``, the task's own part ``P Q^T``
            beside the shared one (float32; codes in :attr:`quant` as ``module::P`` and
            ``module::Q`` when rounded). A module not named has private rank 0.
        baseline: what per-adapter truncated SVD of the original achieves, measured when
            the task was stored with the original at hand: ``{"bytes": per-adapter bytes,
            "error": its relative dW error, "bits": its number format}`` (None: unknown).
    """

    task_id: str
    coords_b: dict[str, torch.Tensor]
    coords_a: dict[str, torch.Tensor]
    norm_sq: dict[str, float]
    residual_sq: dict[str, float]
    spectrum: dict[str, torch.Tensor]
    weight: float = 0.0
    error_is_bound: bool = False
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    source: str | None = None
    sha256: str | None = None
    quant: dict[str, QuantizedTensor] | None = None  # "module::B"/"module::A" codes, if any
    gram_share: str | None = None
    dropped_sq: dict[str, float] = field(default_factory=dict)
    private: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    original_ranks: dict[str, int] = field(default_factory=dict)
    baseline: dict[str, float] | None = None

    def __post_init__(self):
        # the original adapter's rank per module (what the compression ratio counts)
        for m, s in self.spectrum.items():
            self.original_ranks.setdefault(m, int(s.numel()))

    @property
    def modules(self) -> list[str]:
        return list(self.coords_b)

    @property
    def total_norm_sq(self) -> float:
        """``||dW||^2`` of the whole original adapter, dropped modules included."""
        return sum(self.norm_sq.values()) + sum(self.dropped_sq.values())

    @property
    def error(self) -> float:
        """Relative dW error of the whole original adapter, ``||dW - dW^|| / ||dW||`` (0 for
        dW = 0); a module the subspace dropped is lost in full."""
        total = self.total_norm_sq
        lost = sum(self.residual_sq.values()) + sum(self.dropped_sq.values())
        return math.sqrt(lost / total) if total > 0 else 0.0

    def module_errors(self) -> dict[str, float]:
        return {m: math.sqrt(self.residual_sq[m] / n) if n > 0 else 0.0
                for m, n in self.norm_sq.items()}

    @property
    def coverage(self) -> float:
        """Share of the adapter's energy in its shared part, ``||C||^2 / ||dW||^2``, for
        orthonormal bases (:meth:`SharedSubspace.task_coverage` holds for quantized ones and
        counts private parts too)."""
        total = self.total_norm_sq
        kept = sum(linalg.frobenius_sq(self.coords_b[m], self.coords_a[m].T) for m in self.modules)
        return kept / total if total > 0 else 1.0

    def ranks(self) -> dict[str, int]:
        return {m: t.shape[1] for m, t in self.coords_b.items()}

    def private_ranks(self) -> dict[str, int]:
        """Rank of the private part per module (0 where it has none)."""
        return {m: self.private[m][0].shape[1] if m in self.private else 0 for m in self.coords_b}

    def private_energy(self) -> float:
        """``sum_m ||P Q^T||^2``: the energy the task keeps in its private parts."""
        return sum(linalg.frobenius_sq(p, q.T) for p, q in self.private.values())

    def num_params(self) -> int:
        return sum(self.coords_b[m].numel() + self.coords_a[m].numel() for m in self.modules) + \
            sum(p.numel() + q.numel() for p, q in self.private.values())


def core_error_sq(us: torch.Tensor, v_t: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                  core: torch.Tensor) -> float:
    """``||dW - U core V^T||^2`` for ``dW = us v_t^T`` and orthonormal U, V, in two
    orthogonal parts: what lies outside the bases, and ``||U^T dW V - core||^2``."""
    us, v_t, u, v = us.to(F64), v_t.to(F64), u.to(F64), v.to(F64)
    m = u.T @ us  # shared by both parts: the most costly product (d_out x k x r)
    inside = m @ (v_t.T @ v) - core.to(F64)
    return linalg.residual_sq(us, v_t, u, v, m) + float(inside.square().sum())


def error_sq(us: torch.Tensor, v_t: torch.Tensor, basis: ModuleBasis, core: torch.Tensor,
             own: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
    """``||dW - U core V^T - P Q^T||^2`` against ``basis`` as stored (``own = (P, Q)``, the
    private part, or None): the orthonormal split when the bases are float and there is
    no private part, else the general Gram form."""
    if own is not None and own[0].shape[1]:
        return private.error_sq(us, v_t, basis.U.to(F64) @ core.to(F64), basis.V, *own)
    if basis.quant:
        return general_error_sq(us, v_t, basis.U, basis.V, core)
    return core_error_sq(us, v_t, basis.U, basis.V, core)


def quantize_coords(lb: torch.Tensor, la: torch.Tensor, coord_quant: tuple[int, str, int],
                    dtype: torch.dtype = torch.float32
                    ) -> tuple[torch.Tensor, torch.Tensor, QuantizedTensor, QuantizedTensor]:
    """A task's coordinates ``L_B (k_out, r)``, ``L_A (k_in, r)`` rounded as a subspace stores
    them: in :func:`~vlora.linalg.rounding_gauge` (the core is rounded, not the adapter's
    gauge), cast to ``dtype``, each after a DCT of its rows, ``coord_quant = (bits, method,
    block)``. Returns the dequantized ``(L_B, L_A)`` in ``dtype`` and the two codes."""
    cb, ca = linalg.rounding_gauge(lb.to(F64), la.to(F64))
    qb = quantize(cb.to(dtype), *coord_quant, transform="dct")
    qa = quantize(ca.to(dtype), *coord_quant, transform="dct")
    return dequantize(qb).to(dtype), dequantize(qa).to(dtype), qb, qa


def adapter_weight(norm_sq_total: float, weighting: str) -> float:
    """A task's weight in basis fits: 1 (``"energy"``) or ``1 / ||dW||^2`` (``"task"``).

    An adapter whose ``||dW||^2`` is so small that its inverse overflows (subnormal) is
    numerically zero and, like an all-zero adapter, gets weight 0."""
    if weighting == "energy":
        return 1.0
    inverse = 1.0 / norm_sq_total if norm_sq_total > 0 else 0.0
    return inverse if math.isfinite(inverse) else 0.0


def project_adapter(adapter: LoRAWeights, task_id: str, bases: dict[str, ModuleBasis],
                    weighting: str = "task", pseudo_rank: int | dict[str, int] | None = None,
                    zero_missing: bool = False, coord_quant: tuple[int, str, int] | None = None,
                    device: torch.device | None = None,
                    factors: Callable[[str], linalg.Factor] | None = None) -> TaskProjection:
    """Coordinates of ``adapter`` in ``bases`` and its exact error (float64, small matrices).

    ``pseudo_rank`` stores each core at rank ``p`` by truncated SVD (one p, or one per
    module: ``{module: p}``); ``zero_missing`` treats modules the adapter lacks as
    ``dW = 0`` (rank-0 coordinates); ``coord_quant = (bits, method, block)`` rounds the
    coordinates as a subspace with quantized coordinates stores them (the error is then
    against the rounded ones). The adapter's modules ``bases`` lacks are lost in full
    (``dropped_sq``).

    ``device`` (a fit's, :func:`vlora.devices.fit_device`): compute there in float64, with
    ``bases`` already moved there; the coordinates and spectra come back to the CPU.
    None computes where the tensors are, as always. ``factors(m)``: the adapter's canonical
    factors of module m where a fit already holds them (on ``device``), else computed here.
    """
    cb, ca, norm, res, spec, quant = {}, {}, {}, {}, {}, {}
    for m, basis in bases.items():
        if m not in adapter.lora_a:
            if not zero_missing:
                raise KeyError(m)
            cb[m], ca[m] = basis.U.new_zeros(basis.k_out, 0), basis.V.new_zeros(basis.k_in, 0)
            if coord_quant is not None:
                cb[m], ca[m], quant[f"{m}::B"], quant[f"{m}::A"] = quantize_coords(
                    cb[m], ca[m], coord_quant, basis.U.dtype)
            norm[m], res[m], spec[m] = 0.0, 0.0, torch.zeros(0, dtype=F64)
            continue
        s = adapter.scales[m]
        b, a = adapter.lora_b[m], adapter.lora_a[m]
        if device is not None:
            b, a = b.to(device), a.to(device)
        ut, st, vt = factors(m) if factors is not None else linalg.canonical(b, a, s)
        u, v = basis.U.to(F64), basis.V.to(F64)
        if basis.quant:  # rounded bases are not orthonormal: U^T X is not the best fit there
            lb = linalg.lstsq_map(u, s * b.to(F64))
            la = linalg.lstsq_map(v, a.to(F64).T)
        else:
            lb = u.T @ (s * b.to(F64))
            la = v.T @ a.to(F64).T
        p = pseudo_rank.get(m) if isinstance(pseudo_rank, dict) else pseudo_rank
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 0):
            raise ValueError(f"pseudo_rank must be a positive integer, not {p!r}")
        if p is not None and p < lb.shape[1]:
            lb, la = linalg.truncate_core(lb, la, p)
        if coord_quant is not None:
            lb, la, quant[f"{m}::B"], quant[f"{m}::A"] = quantize_coords(lb, la, coord_quant, basis.U.dtype)
        lb, la = lb.to(basis.U.dtype), la.to(basis.V.dtype)
        cb[m], ca[m] = lb, la
        norm[m] = float(st.square().sum())
        res[m] = error_sq(ut * st, vt, basis, lb.to(F64) @ la.to(F64).T)
        spec[m] = st
    dropped = {m: linalg.frobenius_sq(adapter.lora_b[m], adapter.lora_a[m], adapter.scales[m])
               for m in adapter.layer_names if m not in bases}
    if device is not None:
        cb, ca, spec = ({m: x.cpu() for m, x in d.items()} for d in (cb, ca, spec))
    dtype = str(next(iter(adapter.lora_a.values())).dtype).removeprefix("torch.")
    return TaskProjection(task_id, cb, ca, norm, res, spec,
                          adapter_weight(sum(norm.values()), weighting), False,
                          dict(adapter.extra), dict(adapter.config), dtype, adapter.source,
                          adapter.sha256, quant or None, dropped_sq=dropped)


def shared_factors(t: TaskProjection, basis: ModuleBasis, m: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U L_B, V L_A)``: the stored shared part of module ``m`` as factors, float64."""
    return basis.U.to(F64) @ t.coords_b[m].to(F64), basis.V.to(F64) @ t.coords_a[m].to(F64)


def residual_spectra(t: TaskProjection, adapter: LoRAWeights, bases: dict[str, ModuleBasis]
                     ) -> dict[str, torch.Tensor]:
    """Singular values of what ``t``'s stored shared part leaves of ``adapter``, per module:
    the energy each further private rank would keep (its square)."""
    out = {}
    for m, basis in bases.items():
        if m in adapter.lora_a:
            ut, st, vt = linalg.canonical(adapter.lora_b[m], adapter.lora_a[m], adapter.scales[m])
            out[m] = private.residual(ut * st, vt, *shared_factors(t, basis, m))[1]
    return out


def with_private(t: TaskProjection, adapter: LoRAWeights, bases: dict[str, ModuleBasis],
                 ranks: dict[str, int], coord_quant: tuple[int, str, int] | None = None
                 ) -> TaskProjection:
    """``t`` (a projection of ``adapter`` on ``bases``) with a private part of rank
    ``ranks[m]`` in module m (0 or absent: none), each the best of that rank for what the
    stored shared part leaves, rounded with ``coord_quant = (bits, method, block)`` when
    given; the residuals are recomputed exactly against the original."""
    own, res, quant = {}, dict(t.residual_sq), dict(t.quant or {})
    for m, basis in bases.items():
        quant.pop(f"{m}::P", None), quant.pop(f"{m}::Q", None)
        if m not in adapter.lora_a:
            continue
        ut, st, vt = linalg.canonical(adapter.lora_b[m], adapter.lora_a[m], adapter.scales[m])
        sb, sa = shared_factors(t, basis, m)
        p, q, qp, qq = private.fit(ut * st, vt, sb, sa, ranks.get(m, 0), coord_quant)
        if p.shape[1]:
            own[m] = (p, q)
            if qp is not None:
                quant[f"{m}::P"], quant[f"{m}::Q"] = qp, qq
        res[m] = private.error_sq(ut * st, vt, sb, sa, p, q)
    return dataclasses.replace(t, private=own, residual_sq=res, quant=quant or None)
