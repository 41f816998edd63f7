"""Choosing tasks per input row: a small trainable router, and a training-free one.

Both give weights **per row** (never averaged over the batch), in the form
:class:`~vlora.model.VLoRAModel` takes: ``vm(**batch, task_weights=w, task_order=order)``
blends the task cores row by row, and ``router.pick(...)`` gives ``task_ids`` for
tasks that carry their own heads (heads cannot be blended).

Features are the caller's: typically the base model's mean-pooled hidden states of
the row (one forward of the bare base, see :func:`pooled_features`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from vlora import linalg
from vlora.subspace import SharedSubspace

F64 = torch.float64


class TaskRouter(nn.Module):
    """``features (rows, d) -> weights (rows, n_tasks)``: a linear layer (or a one-hidden-layer
    MLP with ``hidden``), softmax at ``temperature``, optionally kept to each row's ``top_k``.

    Args:
        input_size: d, the feature width.
        task_order: the task ids, in the order of the output columns.
    """

    def __init__(self, input_size: int, task_order: Sequence[str], hidden: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None):
        super().__init__()
        if not task_order:
            raise ValueError("TaskRouter needs at least one task")
        if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a positive number, not {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, not {top_k!r}")
        self.task_order = list(task_order)
        n = len(self.task_order)
        self.net = nn.Linear(input_size, n) if hidden is None else nn.Sequential(
            nn.Linear(input_size, hidden), nn.GELU(), nn.Linear(hidden, n))
        self.temperature = temperature
        self.top_k = top_k
        self.register_buffer("mean", torch.zeros(input_size))
        self.register_buffer("std", torch.ones(input_size))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[1] != self.mean.numel():
            raise ValueError(f"features must be (rows, {self.mean.numel()}), not {tuple(features.shape)}")
        return self.net((features.float() - self.mean) / self.std)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Per-row task weights ``(rows, n_tasks)``, each row summing to 1."""
        logits = self.logits(features) / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[1]:
            kth = logits.topk(self.top_k, dim=1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return logits.softmax(dim=1)

    def pick(self, features: torch.Tensor) -> list[str]:
        """The most likely task of each row, as ``task_ids``."""
        return [self.task_order[i] for i in self.logits(features).argmax(1).tolist()]

    def fit(self, features: torch.Tensor, task_ids: Sequence[str], epochs: int = 200,
            lr: float = 1e-2, weight_decay: float = 1e-4, seed: int = 0) -> list[float]:
        """Train on labelled rows (full-batch AdamW, cross-entropy); returns the losses."""
        index = {t: i for i, t in enumerate(self.task_order)}
        unknown = sorted(set(task_ids) - set(index))
        if unknown:
            raise ValueError(f"labels not in task_order: {unknown[:5]}")
        if features.shape[0] != len(task_ids):
            raise ValueError(f"{features.shape[0]} feature rows for {len(task_ids)} labels")
        x = features.float()
        if x.ndim != 2 or x.shape[1] != self.mean.numel():
            raise ValueError(f"features must be (rows, {self.mean.numel()}), not {tuple(x.shape)}")
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0, unbiased=False).clamp_min(1e-6))  # one row: 0, not NaN
        y = torch.tensor([index[t] for t in task_ids])
        gen = torch.Generator().manual_seed(seed)  # the global RNG stays the caller's
        with torch.no_grad():
            for p in self.net.parameters():  # reinitialise: fit is deterministic given seed
                if p.ndim > 1:
                    bound = (6 / (p.shape[0] + p.shape[1])) ** 0.5  # Xavier uniform
                    p.copy_(torch.rand(p.shape, generator=gen) * 2 * bound - bound)
                else:
                    p.zero_()
        opt = torch.optim.AdamW(self.net.parameters(), lr=lr, weight_decay=weight_decay)
        losses = []
        for _ in range(epochs):
            loss = nn.functional.cross_entropy(self.logits(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses


class AdapterMatchRouter:
    """Training-free: route each row to the task whose adapter responds most to it.

    For a module with input ``h`` (a row's mean input to that module), task t's response
    is ``||dW_t h|| / ||dW_t||``, summed over the modules given. It is computed in the
    subspace: with ``z = V^T h``, ``||dW_t h|| = ||G_u^(1/2) C_t z||`` and
    ``||dW_t||^2 = <C_t, G_u C_t G_v>`` (``G = U^T U``, ``V^T V``: identities unless the
    bases are quantized), so only ``(k_out, k_in)`` maps are kept per task. This is a
    heuristic in the spirit of PEFT's Arrow routing: it needs no labels, and is only as
    good as the tasks' adapters are distinct in what inputs they act on.
    """

    def __init__(self, subspace: SharedSubspace, modules: Sequence[str] | None = None,
                 task_order: Sequence[str] | None = None):
        self.subspace = subspace
        self.modules = list(modules or subspace.modules)
        self.task_order = list(task_order or subspace.tasks)
        self._maps, self._v = {}, {}
        for m in self.modules:
            gu, gv = subspace.grams(m)
            evals, evecs = torch.linalg.eigh(gu)
            root = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
            cores = [subspace.core(t, m) for t in self.task_order]
            norms = [max(linalg.inner_in_bases(c, c, gu, gv), 0.0) ** 0.5 or 1.0 for c in cores]
            # (n_tasks, k_out, k_in): maps z = V^T h to task t's normalised response
            self._maps[m] = torch.stack([root @ c / n for c, n in zip(cores, norms)])
            self._v[m] = subspace.modules[m].V.to(F64)

    def scores(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``inputs``: module -> ``(rows, d_in)`` mean inputs; returns ``(rows, n_tasks)``."""
        total = None
        for m in self.modules:
            h = inputs[m]
            if h.ndim != 2 or h.shape[1] != self._v[m].shape[0]:
                raise ValueError(f"inputs[{m!r}] must be (rows, {self._v[m].shape[0]}), "
                                 f"not {tuple(h.shape)}")
            z = h.to(F64) @ self._v[m]
            response = torch.einsum("tkj,rj->rtk", self._maps[m], z).norm(dim=2)
            total = response if total is None else total + response
        return total

    def pick(self, inputs: dict[str, torch.Tensor]) -> list[str]:
        return [self.task_order[i] for i in self.scores(inputs).argmax(1).tolist()]


def pooled_features(model: nn.Module, batch: dict[str, torch.Tensor],
                    modules: Sequence[str] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward of ``model`` (run it bare: no task) returning the mean-pooled last hidden
    state ``(rows, hidden)`` and, for each name in ``modules``, that module's mean input
    ``(rows, d_in)`` (masked by ``attention_mask`` when the batch has one)."""
    mask = batch.get("attention_mask")
    captured: dict[str, torch.Tensor] = {}

    def pool(x: torch.Tensor) -> torch.Tensor:
        if mask is None or x.ndim != 3:
            return x.mean(1) if x.ndim == 3 else x
        w = mask.to(x.dtype).unsqueeze(-1)
        return (x * w).sum(1) / w.sum(1).clamp_min(1)

    named = dict(model.named_modules())
    hooks = []
    for name in modules:
        target = named.get(name) or named.get(f"base_model.model.{name}")
        if target is None:
            raise KeyError(f"module {name} not found in the model")
        hooks.append(target.register_forward_hook(
            lambda mod, args, out, name=name: captured.__setitem__(name, pool(args[0].detach()))))
    try:
        with torch.no_grad():
            out = model(**batch, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    return pool(out.hidden_states[-1]), captured
