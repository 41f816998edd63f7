"""The layers :class:`vlora.model.VLoRAModel` puts in place of a base model's modules.

``SubspaceLinear`` wraps one ``nn.Linear`` or transformers ``Conv1D`` and adds the
subspace path of DESIGN.md section 4 to its output::

    y = base(x) + ((x V) M) U^T        M = L_A L_B^T   (k_in, k_out), per task

Where the bases are wide (``k`` near ``d``) and the tasks' ranks small, a layer may be
*factored*: each cached task's whole update is held as low-rank factors and the shared
path is skipped (see :class:`SubspaceLinear`); the output is the same ``dW``.

``RowHead`` wraps a task-specific ``nn.Linear`` head (a ``modules_to_save`` such as
``classifier``) so that a batch mixing tasks applies each row's own head.

Both read what to compute from a :class:`Router` shared by every wrapped layer of
one model: switching tasks changes one Python attribute, nothing per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlora.errors import VLoRAError


@dataclass(eq=False)
class Route:
    """What every wrapped layer computes in the current forward.

    Attributes:
        kind: ``"single"`` (one core for all rows), ``"rows"`` (a core per row),
            ``"blend"`` (a weighted sum of cores per row) or ``"train"`` (a trainer's
            differentiable adapter path, ``deltas``).
        rows: number of batch rows the route was made for, checked against every
            input (0: unchecked, ``set_task``'s route, which serves any batch).
        slot: the core's slot in each layer's ``cores`` (``"single"``; 0: the bare base).
        index: ``(rows,)`` slot of every row (``"rows"``; slot 0 is the zero core).
        groups: ``[(slot, row indices)]``, rows grouped by slot (``"rows"``).
        weights: ``(rows, n)`` blend weights over ``slots`` ``(n,)`` (``"blend"``; for
            ``"rows"``, one-hot over the distinct tasks' slots: row i's own is 1).
        heads: head name -> ``[(row indices, weight, bias)]`` for mixed-task heads
            (weights may differ in output width; see :class:`RowHead`).
        deltas: module name -> ``f(x) = x dW^T``, ``(..., d_in) -> (..., d_out)`` (``"train"``).
    """

    kind: str
    rows: int = 0
    slot: int = 0
    index: torch.Tensor | None = None
    groups: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    weights: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    heads: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = \
        field(default_factory=dict)
    deltas: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)


class Router:
    """The state every wrapped layer of one model reads: the current route (``None``:
    the bare base model) and how per-row cores are applied (``"bmm"`` or ``"grouped"``)."""

    def __init__(self, mixed: str = "bmm"):
        if mixed not in ("bmm", "grouped"):
            raise ValueError(f"mixed must be 'bmm' or 'grouped', not {mixed!r}")
        self.route: Route | None = None
        self.mixed = mixed


GATHER_COST = 4  # a number gathered per row costs about 4 multiply-adds of a plain matmul


def factored_is_cheaper(d_in: int, d_out: int, k_in: int, k_out: int, rank: int) -> bool:
    """Whether a mixed batch's rows cost less through per-row factors of width ``rank``
    than through the shared bases and per-row ``k_in x k_out`` cores.

    Both gather per-row matrices (``rank (d_in + d_out)`` numbers against a core's
    ``k_in k_out``), which is memory traffic and costs more per number than the shared
    path's batched matmuls (``d_in k_in + k_in k_out + k_out d_out`` per row). Measured on
    CPU decode steps of SmolLM2's shapes: with ``k = 32`` per side the shared path was
    2.4x cheaper, with ``k_in = 70, k_out = 212`` the factored one 1.9x."""
    shared = GATHER_COST * k_in * k_out + d_in * k_in + k_in * k_out + k_out * d_out
    return GATHER_COST * rank * (d_in + d_out) < shared


def _check_rows(x: torch.Tensor, route: Route, name: str) -> None:
    if x.shape[0] != route.rows:
        given = "task_weights rows" if route.kind == "blend" else "task ids"
        raise VLoRAError(
            f"the batch has {x.shape[0]} rows but {route.rows} {given} were given, one per row "
            f"(seen at {name}; generate() repeats them for num_beams/num_return_sequences)")


class SubspaceLinear(nn.Module):
    """``base_layer`` plus the subspace path; buffers move with the model.

    Buffers (non-persistent, so the model's state dict only gains ``base_layer.``):
        u: ``(d_out, k_out)`` the shared output basis U.
        vt: ``(k_in, d_in)`` the shared input basis, transposed (``F.linear`` takes it as is).
        cores: ``(capacity, k_in, k_out)`` cached task cores; slot 0 is zero (bare base).
        p_in: ``(capacity, d_in, q)`` each slot's private ``Q`` (zero-padded to the widest q).
        p_out: ``(capacity, q, d_out)`` each slot's private ``P^T``: the private path adds
            ``(x Q) P^T``, per row like the cores (q = 0 while no cached task has one).

    ``factored``: the slots' low-rank buffers hold each task's whole update,
    ``[V L_A, Q]`` and ``[U L_B, P]^T`` (width r + q), and the shared path is skipped. A
    row then costs ``(r + q)(d_in + d_out)`` multiply-adds instead of
    ``d_in k_in + k_in k_out + k_out d_out`` (+ the private part): the cheaper form
    where the bases are wide. Its cores are not cached.

    Where nothing records it for autograd, the adapter's output is added in place into
    ``base_layer``'s output (a forward hook on ``base_layer`` that keeps that tensor sees
    the sum).
    """

    def __init__(self, base_layer: nn.Module, u: torch.Tensor, v: torch.Tensor,
                 router: Router, name: str, factored: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.router = router
        self.name = name
        self.factored = factored
        self.register_buffer("u", u.contiguous(), persistent=False)
        self.register_buffer("vt", v.T.contiguous(), persistent=False)
        self.register_buffer("cores", u.new_zeros(1, v.shape[1], u.shape[1]), persistent=False)
        self.register_buffer("p_in", u.new_zeros(1, v.shape[0], 0), persistent=False)
        self.register_buffer("p_out", u.new_zeros(1, 0, u.shape[0]), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def store_cores(self, start: int, cores: torch.Tensor) -> None:
        """Write ``cores`` ``(n, k_in, k_out)`` into slots ``start..start+n``, growing the
        buffer geometrically so that adding tasks one by one stays linear in their number."""
        # Outside inference mode, so that a cache started under torch.inference_mode()
        # stays writable (and usable with autograd) afterwards.
        with torch.inference_mode(False), torch.no_grad():
            end, have = start + cores.shape[0], self.cores.shape[0]
            if end > have or self.cores.is_inference():
                grown = self.cores.new_zeros(max(end, 2 * have), *self.cores.shape[1:])
                grown[:have] = self.cores
                self.cores = grown
            self.cores[start:end] = cores.to(self.cores)

    def store_private(self, start: int, q_in: list[torch.Tensor], p_out: list[torch.Tensor]) -> None:
        """Write private parts ``Q (d_in, q_i)`` and ``P^T (q_i, d_out)`` into slots
        ``start..``, growing both buffers (slots geometrically, q to the widest)."""
        with torch.inference_mode(False), torch.no_grad():
            end = start + len(q_in)
            width = max([self.p_in.shape[2], *(x.shape[1] for x in q_in)])
            have = self.p_in.shape[0]
            if end > have or width > self.p_in.shape[2] or self.p_in.is_inference():
                slots = max(end, 2 * have) if end > have else have
                grown_in = self.p_in.new_zeros(slots, self.p_in.shape[1], width)
                grown_out = self.p_out.new_zeros(slots, width, self.p_out.shape[2])
                grown_in[:have, :, :self.p_in.shape[2]] = self.p_in
                grown_out[:have, :self.p_out.shape[1]] = self.p_out
                self.p_in, self.p_out = grown_in, grown_out
            for i, (a, b) in enumerate(zip(q_in, p_out)):
                self.p_in[start + i].zero_()
                self.p_out[start + i].zero_()
                self.p_in[start + i, :, :a.shape[1]] = a.to(self.p_in)
                self.p_out[start + i, :b.shape[0]] = b.to(self.p_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._shared(x)
        route = self.router.route
        if self.p_in.shape[2] and route is not None and route.kind != "train" and (
                route.kind != "single" or route.slot):
            y = self._add_private(x, y, route)
        return y

    def _add_private(self, x: torch.Tensor, y: torch.Tensor, route: Route) -> torch.Tensor:
        """``y + (x Q) P^T`` with each row's own private part (zero for rows without)."""
        xc = x.to(self.u.dtype)
        if route.kind == "single":
            return self._add_up(y, xc @ self.p_in[route.slot], self.p_out[route.slot].T)
        x3 = xc.reshape(xc.shape[0], -1, xc.shape[-1])
        if route.kind == "blend" or (route.kind == "rows" and self.router.mixed == "bmm"
                                     and (route.slots.numel() - 1) * x3.shape[1] < GATHER_COST):
            # a few tasks over rows of one token (decode): their factors side by side in one
            # matmul each way, each row keeping its own task's block (one-hot weights),
            # cost less than gathering factors for every row
            n, q = route.slots.numel(), self.p_in.shape[2]
            p_in = self.p_in.index_select(0, route.slots).permute(1, 0, 2).reshape(x3.shape[-1], n * q)
            h = (x3 @ p_in).reshape(*x3.shape[:2], n, q)
            w = route.weights.to(x3.dtype)[:, None, :, None]
            # one-hot: other tasks' blocks are dropped, not multiplied by 0 (an inf there,
            # possible in float16, would make the row NaN)
            h = h * w if route.kind == "blend" else torch.where(w > 0, h, 0)
            out = h.reshape(*x3.shape[:2], n * q) @ self.p_out.index_select(0, route.slots).reshape(n * q, -1)
        elif self.router.mixed == "grouped":
            out = x3.new_zeros(*x3.shape[:2], self.p_out.shape[2])
            for slot, rows in route.groups:
                if slot:
                    out.index_copy_(0, rows, (x3.index_select(0, rows) @ self.p_in[slot]) @ self.p_out[slot])
        else:
            h = torch.bmm(x3, self.p_in.index_select(0, route.index))
            if self._in_place(y):
                y.view(h.shape[0], h.shape[1], -1).baddbmm_(h, self.p_out.index_select(0, route.index))
                return y
            out = torch.bmm(h, self.p_out.index_select(0, route.index))
        return y + out.reshape(*x.shape[:-1], -1).to(y.dtype)

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        route = self.router.route
        if route is None:
            return y
        if route.kind == "train":
            return y + route.deltas[self.name](x).to(y.dtype)
        if route.rows:
            _check_rows(x, route, self.name)
        if route.kind == "single" and not route.slot or not self.vt.shape[0] or self.factored:
            return y  # the bare base for every row, no shared direction, or factored
        z = F.linear(x.to(self.u.dtype), self.vt)  # (..., k_in), shared by every task
        z = z @ self.cores[route.slot] if route.kind == "single" else self._per_row(z, route)
        return self._add_up(y, z)

    def _in_place(self, y: torch.Tensor) -> bool:
        """Whether the adapter's output may be added into ``y`` in place (nothing records
        ``y`` for autograd), which saves two passes over the output: the adapter's cost
        is memory traffic, not flops."""
        return y.dtype == self.u.dtype and y.is_contiguous() and not (
            torch.is_grad_enabled() and y.requires_grad)

    def _add_up(self, y: torch.Tensor, z: torch.Tensor, up: torch.Tensor | None = None
                ) -> torch.Tensor:
        """``y + z up^T`` (``up``: U by default)."""
        up = self.u if up is None else up
        if not self._in_place(y):
            return y + F.linear(z, up).to(y.dtype)
        y.view(-1, y.shape[-1]).addmm_(z.reshape(-1, z.shape[-1]), up.T)
        return y

    def _per_row(self, z: torch.Tensor, route: Route) -> torch.Tensor:
        """``z`` ``(rows, ..., k_in)`` times each row's core, ``(rows, ..., k_out)``."""
        out_shape = (*z.shape[:-1], self.cores.shape[2])
        if route.kind == "blend":
            cores = torch.einsum("rn,nio->rio", route.weights.to(self.cores.dtype),
                                 self.cores.index_select(0, route.slots))
        elif self.router.mixed == "grouped":
            out = z.new_zeros(out_shape)
            for slot, rows in route.groups:
                if slot:  # slot 0 rows run the bare base: nothing to add
                    out.index_copy_(0, rows, z.index_select(0, rows) @ self.cores[slot])
            return out
        else:
            cores = self.cores.index_select(0, route.index)
        z3 = z.reshape(z.shape[0], -1, z.shape[-1])
        return torch.bmm(z3, cores).reshape(out_shape)


class RowHead(nn.Module):
    """A ``nn.Linear`` head that, in a batch mixing tasks, applies each row's own head.

    Outside mixed batches it is ``base_layer`` (whose parameters hold the active task's
    head, swapped in by ``set_task``). In a mixed batch whose heads differ in output
    width (an 8-label and a 2-label classifier) the output ``(rows, ..., widest)`` holds
    row ``i``'s own ``(..., width_i)`` first and ``-inf`` after: to argmax, softmax and
    cross-entropy a padded entry is a class of probability 0, so they need no mask.
    """

    def __init__(self, base_layer: nn.Linear, router: Router, name: str):
        super().__init__()
        self.base_layer = base_layer
        self.router = router
        self.name = name

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self.router.route
        plan = None if route is None else route.heads.get(self.name)
        if not plan:
            return self.base_layer(x)
        _check_rows(x, route, self.name)
        parts = [(rows, F.linear(x.index_select(0, rows), w, b)) for rows, w, b in plan]
        widths = {part.shape[-1] for _, part in parts}
        first = parts[0][1]
        shape = (x.shape[0], *first.shape[1:-1], max(widths))
        out = first.new_empty(shape) if len(widths) == 1 else first.new_full(shape, float("-inf"))
        for rows, part in parts:
            out[..., :part.shape[-1]].index_copy_(0, rows, part)
        return out
