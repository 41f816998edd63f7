"""Training a task inside a shared subspace (Share; DESIGN.md section 3, "Training a task").

The trainable parameters of a task are its coordinates ``L_B`` ``(k_out, r)`` and
``L_A`` ``(k_in, r)`` per module, optionally with ``phi`` extra directions per side,
``E_u`` ``(d_out, phi)`` and ``E_v`` ``(d_in, phi)``, that train too, with their own
coordinates ``X_B``, ``X_A`` ``(phi, r)``::

    dW = [U E_u] [L_B; X_B] [L_A; X_A]^T [V E_v]^T

The extra directions start orthonormal and orthogonal to the bases; training moves them
toward what the task needs and the bases lack, and ``write_back`` absorbs them.

Every adapted module of the model adds ``x dW^T`` to its output through
:class:`~vlora.model.VLoRAModel`'s ``"train"`` route, so ``loss.backward()`` reaches
the coordinates and any optimiser trains them. Example::

    rates = lora_equivalent_lr(sub, lr=5e-3, lora_alpha=16, r=8)  # a LoRA recipe's pace
    st = SubspaceTrainer(sub, "new_task", model=base_model, **rates, head_lr=5e-3)
    base_model.train()
    for batch in batches:
        st.step(st.model(**batch).loss)
    st.write_back()            # the trained task is now a task of ``sub``

Nothing reads raw LoRA factors: the trained function, the stored task and the
absorb all depend on the coordinates through ``dW`` only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlora import linalg
from vlora.adapter import LoRAWeights
from vlora.io import outermost
from vlora.layer import RowHead
from vlora.model import Delegating, VLoRAModel
from vlora.subspace import AbsorbReport, SharedSubspace
from vlora.task import TaskProjection, adapter_weight

F64 = torch.float64
HEAD_NAMES = ("classifier", "score")  # transformers' heads PEFT puts in modules_to_save


def _task_config(subspace: SharedSubspace, rank: int, heads: list[str]) -> dict[str, Any]:
    """The config of a task born in the subspace: the base model and task type of the
    tasks already there, scale 1 (``lora_alpha = r``)."""
    template = subspace.get_task(subspace.tasks[0]).config if subspace.tasks else {}
    config = {k: template[k] for k in ("base_model_name_or_path", "task_type") if k in template}
    config.setdefault("base_model_name_or_path", subspace.base_model)
    config.update(peft_type="LORA", r=rank, lora_alpha=rank, modules_to_save=heads or None,
                  target_modules=sorted({m.rsplit(".", 1)[-1] for m in subspace.modules}))
    return config


def orthogonal_init(subspace: SharedSubspace, task_id: str, rank: int | None = None,
                    init_scale: float | None = None, seed: int = 0) -> TaskProjection:
    """Register ``task_id`` with ``dW = 0`` that still receives gradients, and return it.

    Per module, ``L_A`` ``(k_in, rank)`` has i.i.d. normal entries of standard deviation
    ``init_scale`` (default ``1/sqrt(d_in)``, about the size of PEFT's initial ``A``) and
    ``L_B`` ``(k_out, rank)`` is zero: ``dW = U L_B L_A^T V^T = 0`` exactly, and the
    gradient of ``L_B`` is not zero. ``rank`` defaults to the subspace's task rank.
    """
    rank = rank or max((r for t in subspace.tasks for r in subspace.get_task(t).ranks().values()),
                       default=0) or 8
    gen = torch.Generator().manual_seed(seed)
    cb, ca = {}, {}
    for m, basis in subspace.modules.items():
        std = init_scale if init_scale is not None else 1.0 / math.sqrt(basis.d_in)
        ca[m] = (torch.randn(basis.k_in, rank, generator=gen, dtype=F64) * std).to(basis.V.dtype)
        cb[m] = basis.U.new_zeros(basis.k_out, rank)
    zero = {m: 0.0 for m in subspace.modules}
    proj = TaskProjection(task_id, cb, ca, dict(zero), dict(zero),
                          {m: torch.zeros(0, dtype=F64) for m in subspace.modules},
                          weight=0.0, config=_task_config(subspace, rank, []))
    subspace.add_task(proj)
    return proj


def _complement(q: torch.Tensor, phi: int, gen: torch.Generator) -> torch.Tensor:
    """``(d, phi)`` orthonormal columns orthogonal to orthonormal ``q``, random but seeded
    (fewer where ``q`` leaves less room)."""
    d = q.shape[0]
    g = torch.randn(d, min(phi, d - q.shape[1]), generator=gen, dtype=F64)
    for _ in range(2):  # twice is enough for orthogonality to working precision
        g = g - q @ (q.T @ g)
    return linalg.fix_signs(torch.linalg.qr(g).Q)


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:  # a head another model type has (score vs classifier)
        return None


class _ModuleDelta(nn.Module):
    """``x -> x dW^T`` for one module, ``(..., d_in) -> (..., d_out)``.

    Buffers ``u`` ``(d_out, k_out)`` = ``U`` and ``vt`` ``(k_in, d_in)`` = ``V^T``;
    parameters ``lb``, ``la`` (the task's coordinates) and, when ``phi > 0``, the extra
    directions ``eu`` ``(d_out, phi_out)``, ``ev`` ``(d_in, phi_in)`` with their
    coordinates ``xb`` ``(phi_out, r)``, ``xa`` ``(phi_in, r)``. The directions act through
    their parts outside the bases (buffers ``qu``, ``qv``: orthonormal bases of ``U``, ``V``),
    so they only ever add what the bases lack, as DESIGN.md section 3 has them.
    """

    def __init__(self, u: torch.Tensor, v: torch.Tensor, lb: torch.Tensor, la: torch.Tensor,
                 eu: torch.Tensor, ev: torch.Tensor, qu: torch.Tensor | None, qv: torch.Tensor | None,
                 init_scale: float, gen: torch.Generator):
        super().__init__()
        self.k_out, self.k_in = u.shape[1], v.shape[1]
        self.register_buffer("u", u.contiguous())
        self.register_buffer("vt", v.T.contiguous())
        self.lb, self.la = nn.Parameter(lb.to(u)), nn.Parameter(la.to(u))
        self.phi = eu.shape[1] + ev.shape[1]
        if self.phi:  # the extra part starts like the task: dW = 0 (X_B = 0), X_B gets gradients
            r = lb.shape[1]
            self.register_buffer("qu", qu.to(u))
            self.register_buffer("qv", qv.to(u))
            self.eu, self.ev = nn.Parameter(eu.to(u).contiguous()), nn.Parameter(ev.to(u).contiguous())
            self.xb = nn.Parameter(u.new_zeros(eu.shape[1], r))
            self.xa = nn.Parameter((torch.randn(ev.shape[1], r, generator=gen, dtype=F64)
                                    * init_scale).to(u))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Coordinates in ``[U E_u]`` ``(k_out + phi_out, r)`` and ``[V E_v]`` ``(k_in + phi_in, r)``."""
        if not self.phi:
            return self.lb, self.la
        return torch.cat([self.lb, self.xb]), torch.cat([self.la, self.xa])

    def bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[U E_u]`` ``(d_out, k_out + phi_out)`` and ``[V E_v]^T`` ``(k_in + phi_in, d_in)``,
        each extra direction taken outside the bases."""
        if not self.phi:
            return self.u, self.vt
        eu = self.eu - self.qu @ (self.qu.T @ self.eu)
        ev = self.ev - self.qv @ (self.qv.T @ self.ev)
        return torch.cat([self.u, eu], 1), torch.cat([self.vt, ev.T])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lb, la = self.factors()
        u, vt = self.bases()
        z = F.linear(x.to(vt.dtype), vt)  # (..., k_in + phi_in)
        return F.linear((z @ la) @ lb.T, u)


class TrainingModule(Delegating):
    """The wrapped model with a task's coordinates as submodules: one module to move with
    ``.to()`` or to hand to a transformers ``Trainer``. Forward is the model's."""

    def __init__(self, model: VLoRAModel, deltas: nn.ModuleList):
        super().__init__()
        self.model = model
        self.deltas = deltas

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def lora_equivalent_lr(subspace: SharedSubspace, lr: float, lora_alpha: float, r: int,
                       pseudo_rank: int | None = None) -> dict[str, float]:
    """``{"lr": ..., "a_lr": ...}`` for :class:`SubspaceTrainer` from a LoRA recipe
    (``lr``, ``lora_alpha``, rank ``r``) that trains as fast, fixed from shapes alone.

    Adam moves every trainable number by about its lr per step. One step moves a LoRA's
    ``dW = s B A`` (``s = lora_alpha / r``) along B by about ``s lr sqrt(r (d_out + d_in))``
    and the coordinates' dW by ``lr' sqrt(p (k_out + k_in))``, so the B side gets
    ``lr' = s lr sqrt(r (d_out + d_in) / (p (k_out + k_in)))`` (per module, averaged in
    the square); the A side keeps ``lr`` (see ``a_lr`` in :class:`SubspaceTrainer`).
    """
    if not subspace.modules:
        raise ValueError("the subspace has no modules")
    p = pseudo_rank or r
    ratios = [r * (b.d_out + b.d_in) / (p * (b.k_out + b.k_in)) for b in subspace.modules.values()]
    return {"lr": lr * lora_alpha / r * (sum(ratios) / len(ratios)) ** 0.5, "a_lr": lr}


class SubspaceTrainer:
    """Train task ``task_id`` of ``subspace`` as coordinates inside it (Share).

    Args:
        subspace: the shared subspace; a task not in it is created by :func:`orthogonal_init`.
            A task already there continues from its stored coordinates and heads.
        task_id: the task to train.
        model: the base model (wrapped here in place by a :class:`VLoRAModel`) or a
            VLoRAModel of ``subspace``. Its base weights are frozen; its heads train.
        lr: learning rate of the B-side coordinates (``L_B``, ``X_B``) with the default
            optimiser (AdamW, no weight decay). They carry dW in far fewer numbers than a
            LoRA, each moved about ``lr`` per Adam step, so they want a larger lr than a
            LoRA recipe's: :func:`lora_equivalent_lr` gives the one that moves dW as fast.
        a_lr: learning rate of the A-side coordinates (``L_A``, ``X_A``; default ``lr``).
            ``L_A`` starts at the size of a LoRA's ``A``, so the LoRA recipe's own lr moves
            it as fast, relative to its size, as that recipe moves ``A``; the B-side lr
            there makes ``L_A`` outgrow its start within a few steps and dW's effective
            step grow with it (measured: unstable across seeds).
        head_lr: learning rate of the heads (default ``lr``).
        optimizer: ``f(param_groups) -> torch.optim.Optimizer`` to use any other.
        num_expand: ``phi`` extra directions per side and module, trained with their
            coordinates and folded into the bases by ``write_back``. Each adds
            ``d_out + d_in`` trainable numbers per module: what lets a task reach past the
            subspace, at a LoRA-like price.
        direction_lr: learning rate of the extra directions (default ``a_lr``, itself ``lr``
            by default). They are d-long unit vectors, the size of a LoRA's factors, so the
            LoRA recipe's lr suits them; they get gradients once ``X_B`` leaves 0.
        pseudo_rank: rank ``p`` of the trained coordinates (default: the task's, or the
            subspace's task rank); an existing task of higher rank is truncated to ``p``.
        train_modules_to_save: train the heads (``modules_to_save`` of the subspace's
            tasks, else ``classifier``/``score``) alongside; or a list of module names.
        init_scale, seed: of :func:`orthogonal_init` and of the extra directions.

    Coordinates are created on each wrapped layer's device, in float32 (float64 for a
    float64 model); move :attr:`module` (not the model alone) to change device later.
    """

    def __init__(self, subspace: SharedSubspace, task_id: str, model: Any, *, lr: float = 1e-3,
                 a_lr: float | None = None, head_lr: float | None = None,
                 optimizer: Callable[[list[dict]], torch.optim.Optimizer] | None = None,
                 num_expand: int = 0, direction_lr: float | None = None,
                 pseudo_rank: int | None = None,
                 train_modules_to_save: bool | Iterable[str] = True,
                 init_scale: float | None = None, seed: int = 0):
        if direction_lr is not None and not num_expand:
            raise ValueError("direction_lr is the lr of the extra directions: pass num_expand > 0")
        if isinstance(model, VLoRAModel) and model.subspace is not subspace:
            raise ValueError("model is a VLoRAModel of another subspace")
        # Every check that can fail runs before the model is wrapped, frozen or the task created.
        if task_id in subspace and pseudo_rank is not None:
            lowest = min(subspace.get_task(task_id).coords_b[m].shape[1] for m in subspace.modules)
            if pseudo_rank > lowest:
                raise ValueError(f"pseudo_rank {pseudo_rank} > task {task_id!r}'s rank {lowest}")
        head_modules = self._head_modules(subspace, model, train_modules_to_save)
        self.subspace, self.task_id, self.num_expand = subspace, task_id, num_expand
        wrapped_here, created = not isinstance(model, VLoRAModel), task_id not in subspace
        vm = model if not wrapped_here else VLoRAModel(model, subspace)
        grads = {p: p.requires_grad for p in vm.model.parameters()}
        try:
            if created:
                orthogonal_init(subspace, task_id, pseudo_rank, init_scale, seed)
            self._set_up(vm, subspace.get_task(task_id), head_modules, lr=lr, a_lr=a_lr,
                         head_lr=head_lr, optimizer=optimizer, direction_lr=direction_lr,
                         pseudo_rank=pseudo_rank, init_scale=init_scale, seed=seed)
        except BaseException:  # leave the model and the subspace as they were
            for p, g in grads.items():
                p.requires_grad_(g)
            if wrapped_here:
                vm.unwrap()
            else:
                vm.clear_task()
            if created and task_id in subspace:
                subspace.remove_task(task_id)
            raise

    def _set_up(self, vm: VLoRAModel, task: TaskProjection, head_modules: dict[str, nn.Module], *,
                lr, a_lr, head_lr, optimizer, direction_lr, pseudo_rank, init_scale, seed) -> None:
        subspace, num_expand = self.subspace, self.num_expand
        gen = torch.Generator().manual_seed(seed + 1)
        deltas = []
        for m, basis in subspace.modules.items():
            lb, la = task.coords_b[m].to(F64), task.coords_a[m].to(F64)
            if pseudo_rank is not None and pseudo_rank < lb.shape[1]:
                lb, la = linalg.truncate_core(lb, la, pseudo_rank)
            layer = vm._layers[m]
            dtype = F64 if layer.u.dtype == F64 else torch.float32
            u, v = basis.U.to(layer.u.device, dtype), basis.V.to(layer.u.device, dtype)
            std = init_scale if init_scale is not None else 1.0 / math.sqrt(basis.d_in)
            qu = qv = None
            eu, ev = u.new_zeros(basis.d_out, 0), v.new_zeros(basis.d_in, 0)
            if num_expand:  # bases may be quantized, so not exactly orthonormal
                qu, qv = (torch.linalg.qr(b.to(F64)).Q for b in (basis.U, basis.V))
                eu, ev = _complement(qu, num_expand, gen), _complement(qv, num_expand, gen)
            deltas.append(_ModuleDelta(u, v, lb, la, eu, ev, qu, qv, std, gen))
        self.module = TrainingModule(vm, nn.ModuleList(deltas))
        self.model = vm
        self._modules = list(subspace.modules)
        self.heads = {f"{name}.{pname}": p for name, module in head_modules.items()
                      for pname, p in module.named_parameters()}
        # The heads train as copies swapped into the model's parameters (the task's stored
        # ones, else the model's own): set_task / clear_task put the model's own back.
        vm.clear_task()  # the model's own heads in place, not another task's
        starts = {k: task.extra.get(k, p.data).to(p.device, p.dtype, copy=True)
                  for k, p in self.heads.items()}
        vm.set_train_route({m: d for m, d in zip(self._modules, deltas)}, heads=starts)
        for p in vm.model.parameters():
            p.requires_grad_(False)
        for p in self.heads.values():
            p.requires_grad_(True)
        side_b = [p for d in deltas for p in ([d.lb, d.xb] if d.phi else [d.lb])]
        side_a = [p for d in deltas for p in ([d.la, d.xa] if d.phi else [d.la])]
        a_lr = lr if a_lr is None else a_lr
        groups = [{"params": side_b, "lr": lr, "name": "coordinates_b"},
                  {"params": side_a, "lr": a_lr, "name": "coordinates_a"}]
        directions = [p for d in deltas if d.phi for p in (d.eu, d.ev)]  # none where k = d
        if directions:
            groups.append({"params": directions, "lr": a_lr if direction_lr is None else direction_lr,
                           "name": "directions"})
        if self.heads:
            groups.append({"params": list(self.heads.values()), "lr": head_lr or lr, "name": "heads"})
        self.param_groups = groups  # what any optimiser of this task should hold, and at which lr
        self.optimizer = optimizer(groups) if optimizer else torch.optim.AdamW(groups, lr=lr,
                                                                               weight_decay=0.0)

    @staticmethod
    def _head_modules(subspace: SharedSubspace, model: Any,
                      which: bool | Iterable[str]) -> dict[str, nn.Module]:
        """The modules whose parameters train as heads, by name (their Linear inside a
        mixed-batch wrapper); an unknown name in ``which`` is a ValueError."""
        base = model.model if isinstance(model, VLoRAModel) else model
        if which is True:
            names = sorted({n for t in subspace.tasks
                            for n in subspace.get_task(t).config.get("modules_to_save") or ()})
            modules = {n: _submodule(base, n) for n in names or HEAD_NAMES}
        else:
            modules = {n: _submodule(base, n) for n in which or ()}
            unknown = [n for n, mod in modules.items() if mod is None]
            if unknown:
                raise ValueError(f"train_modules_to_save: no module {unknown} in the model")
        return {n: mod.base_layer if isinstance(mod, RowHead) else mod
                for n, mod in modules.items() if mod is not None}

    # ------------------------------------------------------------------ training
    def coordinates(self) -> list[nn.Parameter]:
        """The adapter's trainable parameters (``L_B``, ``L_A``; with ``phi > 0`` also the extra
        directions and their coordinates)."""
        return list(self.module.deltas.parameters())

    def parameters(self) -> list[nn.Parameter]:
        """Everything that trains: coordinates, then heads."""
        return self.coordinates() + list(self.heads.values())

    @property
    def num_trainable_params(self) -> dict[str, int]:
        """``{"adapter": ..., "heads": ...}``: trainable numbers, heads counted apart."""
        return {"adapter": sum(p.numel() for p in self.coordinates()),
                "heads": sum(p.numel() for p in self.heads.values())}

    def step(self, loss: torch.Tensor) -> float:
        """Backward, one optimiser step, zero the gradients; returns the loss."""
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for m, d in zip(self._modules, self.module.deltas):
            parts = {"L_B": d.lb, "L_A": d.la}
            if d.phi:
                parts.update(E_U=d.eu, E_V=d.ev, X_B=d.xb, X_A=d.xa)
            out.update({f"{m}::{k}": t for k, t in parts.items()})
        out.update({f"head::{k}": p for k, p in self.heads.items()})
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Coordinates (with extra directions, if any) and heads on the CPU, keyed
        ``module::L_B``, and per module a fingerprint of the bases they live in."""
        out = {k: t.detach().cpu().contiguous() for k, t in self._tensors().items()}
        return {**out, **self._fingerprints()}

    def _fingerprints(self) -> dict[str, torch.Tensor]:
        # Column sums of U and V: coordinates mean something only in the bases they were
        # trained in, and bases that moved (an absorb at the same k) keep their shapes.
        return {f"{m}::bases_fingerprint": torch.cat([d.u.sum(0), d.vt.sum(1)]).to("cpu", F64)
                for m, d in zip(self._modules, self.module.deltas)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a :meth:`state_dict` back in (same task layout: same keys and shapes).

        Raises:
            ValueError: ``state`` lacks a tensor this trainer holds, holds one it does not
                (a checkpoint of another phi), or one of another shape (of another
                subspace or pseudo-rank), or it was trained in other bases.
        """
        mine = self._tensors()
        # Checkpoints of vlora before the extra directions trained also held the bases.
        theirs = {k for k in state if not k.endswith(("::U", "::Vt", "::bases_fingerprint"))}
        problems = {"missing": sorted(set(mine) - theirs), "not in this trainer": sorted(theirs - set(mine)),
                    "of another shape": [f"{k} {tuple(state[k].shape)} (here {tuple(mine[k].shape)})"
                                         for k in sorted(set(mine) & theirs)
                                         if state[k].shape != mine[k].shape]}
        if any(problems.values()):
            raise ValueError("the checkpoint does not fit this trainer: " + "; ".join(
                f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                for what, keys in problems.items() if keys))
        moved = [k.split("::")[0] for k, f in self._fingerprints().items()
                 if k in state and (state[k].shape != f.shape
                                    or not torch.allclose(state[k].to(F64), f, rtol=1e-5, atol=1e-6))]
        if moved:
            raise ValueError(f"the checkpoint was trained in other bases ({', '.join(moved[:3])}"
                             f"{' ...' if len(moved) > 3 else ''}): resume on the subspace it was made on")
        for k, t in mine.items():
            t.copy_(state[k])

    # ---------------------------------------------------------------- write back
    def _heads_and_config(self, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The heads as the task's ``extra`` (CPU copies) and the task's config."""
        heads = {k: p.detach().cpu().clone() for k, p in self.heads.items()}
        return heads, _task_config(self.subspace, rank, outermost({k.rpartition(".")[0] for k in heads}))

    def to_lora(self) -> LoRAWeights:
        """The trained task as a LoRA at scale 1: ``B = [U E_u] [L_B; X_B]``
        ``(d_out, r)``, ``A = [L_A; X_A]^T [V E_v]^T`` ``(r, d_in)``, with its heads."""
        a, b = {}, {}
        with torch.no_grad():
            for m, d in zip(self._modules, self.module.deltas):
                (lb, la), (u, vt) = d.factors(), d.bases()
                b[m] = (u.to(F64) @ lb.to(F64)).float().cpu()
                a[m] = (la.to(F64).T @ vt.to(F64)).float().cpu()
        heads, config = self._heads_and_config(lb.shape[1])
        return LoRAWeights(list(a), a, b, {m: 1.0 for m in a}, heads, config)

    def write_back(self, refine_iters: int = 10, exact_errors: bool = True
                   ) -> dict[str, AbsorbReport]:
        """Store the trained task in the subspace; returns each old task's absorb report.

        With ``num_expand == 0`` the coordinates are stored exactly (no projection error,
        no other task moves: the report is empty) and the model serves the task at once.
        Otherwise the task, extra directions included, is absorbed
        (:meth:`SharedSubspace.absorb`): the bases learn its new directions, every task is
        re-expressed, and the model must be wrapped again (``unwrap()``) to serve them.
        """
        if self.num_expand == 0:
            self.subspace.add_task(self._projection(), replace=True)
            self.model.refresh_task(self.task_id)
            return {}
        lora, old = self.to_lora(), self.subspace.remove_task(self.task_id)
        try:
            return self.subspace.absorb(lora, self.task_id, refine_iters, exact_errors)
        except Exception:
            self.subspace.add_task(old)  # an absorb validates before any basis moves
            raise

    @torch.no_grad()
    def _projection(self) -> TaskProjection:
        """The task as stored coordinates: exact, so its error is 0 and its norm and
        spectrum are those of ``dW = (U L_B)(V L_A)^T`` (float64, never dense)."""
        cb, ca, norm, spec = {}, {}, {}, {}
        for m, d in zip(self._modules, self.module.deltas):
            basis = self.subspace.modules[m]
            cb[m], ca[m] = d.lb.detach().to("cpu", basis.U.dtype), d.la.detach().to("cpu", basis.V.dtype)
            _, s, _ = linalg.canonical(basis.U.to(F64) @ cb[m].to(F64),
                                       (basis.V.to(F64) @ ca[m].to(F64)).T)
            norm[m], spec[m] = float(s.square().sum()), s
        heads, config = self._heads_and_config(cb[m].shape[1])
        return TaskProjection(self.task_id, cb, ca, norm, {m: 0.0 for m in norm}, spec,
                              adapter_weight(sum(norm.values()), self.subspace.weighting),
                              extra=heads, config=config)
