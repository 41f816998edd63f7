"""``VLoRAModel``: serve every task of a :class:`~vlora.SharedSubspace` from one base model.

DESIGN.md section 4. Each adapted module of the base model is replaced (in place, no
copy of the model) by a :class:`~vlora.layer.SubspaceLinear` holding the module, the
shared bases and a cache of per-task cores ``M_t = L_A L_B^T`` ``(k_in, k_out)`` (or, in
a module served factored, per-task factors: ``path``)::

    vm = VLoRAModel(model, sub)
    vm.set_task("sst2"); vm(**batch)                      # one task, switched in microseconds
    vm(**batch, task_ids=["sst2", "mnli", None, "sst2"])  # one task per row (None: base)
    vm.head_widths(["sst2", "mnli", None, "sst2"])        # {"classifier": tensor([2, 3, 3, 2])}
    vm.generate(**inputs, task_ids=ids, num_beams=2)      # ids expanded like the inputs
    vm.merge("sst2"); ...; vm.unmerge()                   # bake one task in, restore bitwise

Non-LoRA tensors of a task (``modules_to_save``, e.g. ``classifier.weight``) are
swapped into the model's parameters by ``set_task`` and the originals put back by
``clear_task`` or the next ``set_task``. In a batch mixing tasks each row goes through
its own ``nn.Linear`` head. Where the heads differ in width (a 3-label and a 2-label
task) the output is padded to the widest head with ``-inf``: row ``i``'s own logits
are ``logits[i, ..., :w_i]`` (``w = head_widths(task_ids)[head]``), and argmax, softmax
and cross-entropy need no mask. Where they agree nothing is padded. Other non-LoRA
tensors (not a Linear head's weight or bias) raise in a mixed batch: mixed batches
cover the shared body and Linear heads; ``set_task`` serves everything.

Device and dtype: the bases and cores are buffers of the wrapped layers, on each
layer's device, in ``compute_dtype`` (default: that layer's weight dtype). Move the
``VLoRAModel`` (not the inner model) with ``.to()``: buffers and swapped tensors
follow. Per-row routing expects the wrapped layers on one device: its index vectors
are made there, all in one host-to-device copy per call (per ``generate``, not per
token), and nothing in a forward moves to the CPU. On CUDA, mixed batches take the
default ``mixed="bmm"`` path (one batched matmul per layer, no per-task loop or sync).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from vlora.adapter import DEFAULT_KEY_PREFIX
from vlora.errors import IncompatibleAdaptersError, SubspaceError, VLoRAError
from vlora.io import save_adapter
from vlora.layer import Route, Router, RowHead, SubspaceLinear, factored_is_cheaper
from vlora.subspace import SharedSubspace
from vlora.task import ModuleBasis, TaskProjection, shared_factors

_TRAINING = object()  # stands for a trainer's heads where a task id names a task's tensors


def _normalize(name: str) -> str:
    """A module name as PEFT writes it: without torch.compile's ``_orig_mod`` levels and
    without PeftModel's ``base_model.model.`` prefix."""
    name = ".".join(p for p in name.split(".") if p != "_orig_mod")
    return name.removeprefix(DEFAULT_KEY_PREFIX)


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional; without it no module is a Conv1D
        return False
    return isinstance(module, Conv1D)


def _linear_shape(name: str, module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a Linear or Conv1D (whose weight is stored ``(d_in, d_out)``)."""
    if isinstance(module, (SubspaceLinear, RowHead)):
        raise VLoRAError(f"module {name} is already wrapped (by another VLoRAModel?)")
    if isinstance(module, nn.Linear):
        return tuple(module.weight.shape)
    if _is_conv1d(module):
        return tuple(module.weight.shape[::-1])
    raise IncompatibleAdaptersError(
        f"module {name} is a {type(module).__name__}; vlora adapts nn.Linear and Conv1D only")


def _private(task: TaskProjection, module: str, layer: SubspaceLinear, basis: ModuleBasis
             ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``([Q], [P^T])`` of a task's private part of ``module`` (width 0 if it has none);
    for a factored layer its whole update, ``([V L_A, Q], [U L_B, P]^T)`` in float64."""
    ins = [layer.p_in.new_zeros(layer.p_in.shape[1], 0)]
    outs = [layer.p_out.new_zeros(0, layer.p_out.shape[2])]
    if layer.factored:
        shared_b, shared_a = shared_factors(task, basis, module)
        ins, outs = [shared_a], [shared_b.T]
    if module in task.private:
        p, q = task.private[module]
        ins.append(q.to(ins[0]))
        outs.append(p.T.to(outs[0]))
    return [torch.cat(ins, 1)], [torch.cat(outs, 0)]


def _factored(subspace: SharedSubspace, path: str) -> dict[str, bool]:
    """Which modules serve through per-task factors (:class:`SubspaceLinear`), by ``path``."""
    if path not in ("auto", "shared", "factors"):
        raise ValueError(f"path must be 'auto', 'shared' or 'factors', not {path!r}")
    out = {}
    for m, b in subspace.modules.items():
        ranks = [t.coords_b[m].shape[1] for t in map(subspace.get_task, subspace.tasks)
                 if m in t.coords_b]
        out[m] = path == "factors" or path == "auto" and bool(ranks) and \
            factored_is_cheaper(b.d_in, b.d_out, b.k_in, b.k_out, max(ranks))
    return out


def _core(task: TaskProjection, module: str) -> torch.Tensor:
    """``M = L_A L_B^T`` ``(k_in, k_out)`` of one module, in float64 (cast on store)."""
    return task.coords_a[module].double() @ task.coords_b[module].double().T


class Delegating(nn.Module):
    """A wrapper module that answers what it lacks from ``self.model`` (``config``,
    ``device``, ``generation_config``, ...), so it stands in for the model it wraps."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


class VLoRAModel(Delegating):
    """A base model serving the tasks of a subspace, alone or mixed in one batch.

    Args:
        base_model: any torch model (a transformers model, a PeftModel's base, a
            ``torch.compile`` result); wrapped in place, never copied.
        subspace: the tasks; its module names must name Linear/Conv1D modules of the
            model with the same shapes, else IncompatibleAdaptersError names them.
        compute_dtype: dtype of the adapter path (default: each layer's weight dtype).
        mixed: how per-row cores are applied, ``"bmm"`` (gather a core per row, one
            batched matmul) or ``"grouped"`` (one matmul per distinct task).
        path: per module, ``"shared"`` (``x V``, the task's core, ``U^T``), ``"factors"``
            (each task's update as factors ``V L_A``, ``U L_B`` of width r, the shared
            bases unused) or ``"auto"``: factors where they cost less per row
            (:func:`vlora.layer.factored_is_cheaper`; wide bases, small ranks). The same
            ``dW`` either way; ``factored_modules`` lists the factored ones.

    After ``subspace.absorb*`` or ``quantize`` moved the bases, build a new VLoRAModel (``unwrap()``
    this one): its cached bases and cores describe the old ones, and it says so.
    """

    def __init__(self, base_model: nn.Module, subspace: SharedSubspace,
                 compute_dtype: torch.dtype | None = None, mixed: str = "bmm", path: str = "auto"):
        super().__init__()
        self.model = base_model
        self.subspace = subspace
        self._router = Router(mixed)
        self._bases_seen = subspace.modules
        self._named: dict[str, tuple[nn.Module, str, nn.Module]] = {}
        for name, module in base_model.named_modules():
            parent, _, attr = name.rpartition(".")
            self._named[_normalize(name)] = (base_model.get_submodule(parent), attr, module)
        if not subspace.modules:
            raise SubspaceError("the subspace has no modules: there is nothing to serve")
        missing = [m for m in subspace.modules if m not in self._named]
        if missing:
            sample = [n for n in self._named if n][:3]
            raise IncompatibleAdaptersError(
                f"{len(missing)} of the subspace's {len(subspace.modules)} modules are not in "
                f"the model: {missing[:5]} (the model's modules are named like {sample})")
        for m, basis in subspace.modules.items():
            shape = _linear_shape(m, self._named[m][2])
            if shape != (basis.d_out, basis.d_in):
                raise IncompatibleAdaptersError(
                    f"module {m}: the model's is {shape} (d_out, d_in), the subspace's "
                    f"{(basis.d_out, basis.d_in)}")
        self._targets: dict[str, tuple[nn.Module, str]] = {}
        for t in subspace.tasks:  # fail now, not at the first set_task
            for key in subspace.get_task(t).extra:
                self._target(key, t)
        self._layers: dict[str, SubspaceLinear] = {}
        factored = _factored(subspace, path)
        for m, basis in subspace.modules.items():
            parent, attr, module = self._named[m]
            w = module.weight
            cd = compute_dtype or w.dtype
            layer = SubspaceLinear(module, basis.U.to(w.device, cd), basis.V.to(w.device, cd),
                                   self._router, m, factored[m])
            setattr(parent, attr, layer)
            self._layers[m] = layer
        self._heads: dict[str, RowHead] = {}
        for key, (module, _) in self._targets.items():
            head = self._owner(key)[0]
            if head not in self._heads and head not in self._layers \
                    and isinstance(module, nn.Linear):
                parent, attr, _ = self._named[head]
                self._heads[head] = RowHead(module, self._router, head)
                setattr(parent, attr, self._heads[head])
        self._slots: dict[str, int] = {}  # task -> its slot in every layer's cores
        self._cached: dict[str, TaskProjection | None] = {}  # task -> what its slot holds
        self._extras: dict[str, dict[str, torch.Tensor]] = {}  # task -> tensors on device
        self._originals: dict[str, torch.Tensor] = {}  # key -> the model's own tensor
        self._applied: str | None = None  # task whose extras are in the model
        self._active: str | None = None
        self._merged: dict[str, torch.Tensor] | None = None  # module -> original weight
        self._in_context = 0


    # ------------------------------------------------------------------ tasks
    @property
    def available_tasks(self) -> list[str]:
        return self.subspace.tasks

    @property
    def mixed(self) -> str:
        """How per-row cores are applied, ``"bmm"`` or ``"grouped"``; settable."""
        return self._router.mixed

    @mixed.setter
    def mixed(self, value: str) -> None:
        self._router.mixed = Router(value).mixed  # validated

    @property
    def factored_modules(self) -> list[str]:
        """The modules whose tasks are served as per-task factors (``path``)."""
        return [m for m, layer in self._layers.items() if layer.factored]

    @property
    def active_task(self) -> str | None:
        """The task set by ``set_task`` or ``merge`` (None: the bare base model)."""
        return self._active

    def set_task(self, task_id: str | None) -> None:
        """Make every forward run ``task_id`` (None: the bare base). Costs a dict lookup
        and a tensor swap per non-LoRA tensor once the task's cores are cached."""
        self._check_state()
        if task_id is None:
            return self.clear_task()
        self._cache_cores([task_id])
        self._apply_extras(task_id)
        self._router.route = Route("single", slot=self._slots[task_id])
        self._active = task_id

    def clear_task(self) -> None:
        """Back to the bare base model, the model's own non-LoRA tensors restored."""
        self._check_state()
        self._reset()

    def _reset(self) -> None:
        """The bare base: no route, the model's own non-LoRA tensors (no state check)."""
        self._apply_extras(None)
        self._router.route = None
        self._active = None

    def set_train_route(self, deltas: dict[str, Callable[[torch.Tensor], torch.Tensor]],
                        heads: dict[str, torch.Tensor] | None = None) -> None:
        """Make every forward run ``base(x) + deltas[module](x)`` in each wrapped module: a
        trainer's differentiable adapter path (:class:`vlora.training.SubspaceTrainer`).
        ``heads`` (keyed as a task's non-LoRA tensors, ``classifier.weight``) are swapped
        into the model's parameters, as a task's are, to train there in place of the
        model's own; ``set_task`` or ``clear_task`` ends it and puts the model's own back."""
        self._check_state()
        missing = sorted(set(self._layers) - set(deltas))
        if missing:
            raise VLoRAError(f"set_train_route: no delta for modules {missing[:5]}")
        for key in heads or {}:
            self._target(key, "being trained")
        self._reset()
        self._extras[_TRAINING] = dict(heads or {})
        self._apply_extras(_TRAINING)
        self._router.route = Route("train", deltas=dict(deltas))

    def refresh_task(self, task_id: str) -> None:
        """Re-read ``task_id`` from the subspace after its coordinates or non-LoRA tensors
        were changed there in place. A task replaced there (``add_task(replace=True)``, a
        trainer's ``write_back``) or removed is noticed without it."""
        self._check_state()
        self.subspace.get_task(task_id)  # a removed task raises before anything changes
        if task_id in self._slots:
            self._cached[task_id] = None
            self._cache_cores([task_id])

    @contextmanager
    def tasks(self, task_ids: Sequence[str | None] | None = None,
              task_weights: torch.Tensor | None = None,
              task_order: Sequence[str] | None = None) -> Iterator[None]:
        """Within the block, row ``i`` of every forward runs ``task_ids[i]`` (None: bare
        base), or the blend ``sum_t task_weights[i, t] * M_t`` of the cores of
        ``task_order``. Nothing given: the ``set_task`` state applies.

        ``task_ids`` holds one id per batch row, ``task_weights`` one row per batch row: a
        forward whose inputs have another number of rows raises VLoRAError. Heads of
        different widths among the rows' tasks pad the output (see :meth:`head_widths`)."""
        if task_ids is None and task_weights is None:
            if self._active is not None and self._merged is None:
                self._cache_cores([self._active])  # replaced in the subspace, or removed
            yield
            return
        self._check_state()
        saved = self._router.route, self._applied
        self._in_context += 1
        try:
            route, extras_task = self._plan(task_ids, task_weights, task_order)
            self._apply_extras(extras_task)
            self._router.route = route
            yield
        finally:
            self._in_context -= 1
            self._router.route = saved[0]
            self._apply_extras(saved[1])

    def forward(self, *args: Any, task_ids: Sequence[str | None] | None = None,
                task_weights: torch.Tensor | None = None,
                task_order: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The base model's forward; ``task_ids`` / ``task_weights`` as in :meth:`tasks`.

        With ``task_ids`` whose tasks' heads differ in width (``lang_id``'s 8 labels,
        ``rt_sentiment``'s 2) ``.logits`` is ``(rows, ..., widest)``, each row's own logits
        first and ``-inf`` after; :meth:`head_widths` gives each row's width."""
        with self.tasks(task_ids, task_weights, task_order):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, task_ids: Sequence[str | None] | None = None,
                 task_weights: torch.Tensor | None = None,
                 task_order: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """``generate`` with one task (or blend) per input row, repeated for each of the
        row's ``max(num_beams, num_return_sequences)`` copies as transformers does."""
        config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        beams = kwargs.get("num_beams", getattr(config, "num_beams", None) or 1)
        returns = kwargs.get("num_return_sequences",
                             getattr(config, "num_return_sequences", None) or 1)
        n = max(beams, returns)
        if task_ids is not None and n > 1:
            task_ids = [t for t in task_ids for _ in range(n)]
        if task_weights is not None and n > 1:
            task_weights = task_weights.repeat_interleave(n, dim=0)
        with self.tasks(task_ids, task_weights, task_order):
            return self.model.generate(*args, **kwargs)

    def head_widths(self, task_ids: Sequence[str | None]) -> dict[str, torch.Tensor]:
        """``{head: (rows,) int64}``: the output width of row ``i``'s own head, for every
        Linear head the subspace's tasks replace (``classifier``), ``task_ids[i]`` None
        meaning the model's own. In a batch of ``task_ids`` row ``i`` of that head's
        output is ``[i, ..., :width[i]]`` and ``-inf`` after (nothing after where all agree)."""
        ids = self._ids(task_ids)
        widths = {}
        for head in self._heads:
            key = f"{head}.weight"
            own = self._originals.get(key, self._heads[head].base_layer.weight.data)
            widths[head] = torch.tensor(
                [(self._task_extras(t).get(key, own) if t is not None else own).shape[0]
                 for t in ids])
        return widths

    # -------------------------------------------------------- merge / export
    @torch.no_grad()
    def merge(self, task_id: str) -> None:
        """Add ``U C V^T + P Q^T`` of ``task_id`` to the base weights (transposed for Conv1D) and
        swap its non-LoRA tensors in; :meth:`unmerge` restores the weights bitwise."""
        self._check_state()
        self._cache_cores([task_id])
        t = self.subspace.get_task(task_id)
        self._check_untied()
        self._apply_extras(task_id)
        self._router.route = None
        self._merged = {}
        for name, layer in self._layers.items():
            w, basis = layer.base_layer.weight, self.subspace.modules[name]
            f = torch.float64 if w.dtype == torch.float64 else torch.float32
            core = t.coords_b[name].to(w.device, f) @ t.coords_a[name].to(w.device, f).T
            delta = basis.U.to(w.device, f) @ core @ basis.V.to(w.device, f).T
            if name in t.private:
                p, q = t.private[name]
                delta = delta + p.to(w.device, f) @ q.to(w.device, f).T
            self._merged[name] = w.detach().clone()
            w.add_((delta if isinstance(layer.base_layer, nn.Linear) else delta.T).to(w.dtype))
        self._active = task_id

    def _check_untied(self) -> None:
        """Merging adds a delta to a weight in place: one tied to another parameter (an
        ``lm_head`` tied to the embeddings, two adapted layers sharing a weight) would
        change there too, so it is refused before anything is touched."""
        owners: dict[int, list[str]] = {}
        tensors = [*self.model.named_parameters(remove_duplicate=False),
                   *self.model.named_buffers(remove_duplicate=False)]
        for name, p in tensors:
            if not p.is_meta and p.numel():  # meta and empty tensors all share address 0
                owners.setdefault(p.data_ptr(), []).append(name)
        for name, layer in self._layers.items():
            w = layer.base_layer.weight
            if w.is_meta:
                raise VLoRAError(f"cannot merge into {name}: its weight is offloaded (on the meta "
                                 "device); serve the task unmerged (set_task) instead")
            tied = owners.get(w.data_ptr(), [])
            if len(tied) > 1:
                raise VLoRAError(f"cannot merge into {name}: its weight is tied to "
                                 f"{', '.join(tied)}, which the merge would change too; "
                                 "serve the task unmerged (set_task) instead")

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the weights :meth:`merge` changed, bit for bit; back to the bare base."""
        if self._merged is None:
            raise VLoRAError("no task is merged")
        for name, original in self._merged.items():
            self._layers[name].base_layer.weight.copy_(original)
        self._merged = None
        self._reset()

    def reconstruct_state_dict(self, task_id: str) -> dict[str, torch.Tensor]:
        """The PEFT adapter state dict of ``task_id`` (``B^ = U L_B``, ``A^ = L_A^T V^T``,
        scale 1, plus its non-LoRA tensors), keyed as ``save_pretrained`` writes it."""
        lora = self.subspace.reconstruct(task_id)
        state = {f"{DEFAULT_KEY_PREFIX}{m}.lora_{side}.weight": t
                 for m in lora.layer_names
                 for side, t in (("A", lora.lora_a[m]), ("B", lora.lora_b[m]))}
        state.update({DEFAULT_KEY_PREFIX + k: v for k, v in lora.extra.items()})
        return state

    def export(self, task_id: str, path: str | os.PathLike, for_vllm: bool = False) -> list[str]:
        """Write ``task_id`` as a PEFT adapter folder; returns what ``for_vllm`` left out."""
        return save_adapter(self.subspace.reconstruct(task_id), path, for_vllm=for_vllm)

    def unwrap(self) -> nn.Module:
        """Put the original modules back (task cleared, merge undone); returns the model."""
        if self._merged is not None:
            self.unmerge()
        self._reset()  # no state check: unwrapping is the way out after the bases moved
        for name in [*self._layers, *self._heads]:
            parent, attr, module = self._named[name]
            setattr(parent, attr, module)
        self._layers, self._heads = {}, {}
        return self.model

    # ---------------------------------------------------------------- internals
    def _check_state(self) -> None:
        if self._merged is not None:
            raise VLoRAError(f"task {self._active!r} is merged into the weights; unmerge() first")
        if self._in_context:
            raise VLoRAError("inside a `with model.tasks(...)` block the tasks are fixed")
        if self.subspace.modules is not self._bases_seen:
            raise SubspaceError("the subspace's bases changed (absorb, quantize) after this "
                                "model was wrapped; unwrap() it and wrap the model again")
        if not self._layers:
            raise VLoRAError("this VLoRAModel was unwrapped")

    def _owner(self, key: str) -> tuple[str, str]:
        """``(module name, attribute)`` of a task's non-LoRA tensor ``key``. PEFT names the
        weight of a layer it wrapped ``<layer>.base_layer.weight`` (a tied ``lm_head``)."""
        head, _, attr = key.rpartition(".")
        if head not in self._named and head.endswith(".base_layer"):
            head = head.removesuffix(".base_layer")
        return head, attr

    def _target(self, key: str, task_id: str) -> tuple[nn.Module, str]:
        """The module and attribute a task's non-LoRA tensor ``key`` replaces."""
        if key not in self._targets:
            head, attr = self._owner(key)
            module = self._named.get(head, (None, None, None))[2]
            if not isinstance(getattr(module, attr, None), torch.Tensor):
                raise IncompatibleAdaptersError(
                    f"task {task_id!r}: its tensor {key!r} has no counterpart in the model")
            self._targets[key] = (module, attr)
        return self._targets[key]

    def _current(self, key: str) -> torch.Tensor:
        module, attr = self._targets[key]
        return getattr(module, attr).data

    def _put(self, key: str, value: torch.Tensor) -> None:
        module, attr = self._targets[key]
        if attr in module._parameters:
            module._parameters[attr].data = value  # swap, so heads may change shape
        else:
            module._buffers[attr] = value

    def _task_extras(self, task_id: Any) -> dict[str, torch.Tensor]:
        if task_id not in self._extras:
            extras = {}
            with torch.inference_mode(False):  # they become parameters' data
                for key, value in self.subspace.get_task(task_id).extra.items():
                    self._target(key, task_id)
                    here = self._originals.get(key, self._current(key))
                    value = value.to(here.device, here.dtype, copy=True)
                    # A copy of the model's own tensor (PEFT saves a tied lm_head's weight with
                    # every adapter) changes nothing: not swapped, so no memory and mixed batches
                    if not (value.shape == here.shape and torch.equal(value, here)):
                        extras[key] = value
            self._extras[task_id] = extras
        return self._extras[task_id]

    def _apply_extras(self, task_id: Any) -> None:
        """Swap ``task_id``'s non-LoRA tensors in (None: the model's own; ``_TRAINING``: a
        trainer's heads). Reads them first, so a task whose tensors fail changes nothing."""
        if task_id == self._applied:
            return
        new = self._task_extras(task_id) if task_id is not None else {}
        for key, original in self._originals.items():
            self._put(key, original)
        self._originals, self._applied = {}, None
        for key, value in new.items():
            self._originals[key] = self._current(key)
            self._put(key, value)
        self._applied = task_id

    def _cache_cores(self, task_ids: Sequence[str | None]) -> None:
        """Cache the cores of tasks not seen yet, and re-read those the subspace has replaced
        since (by identity: one dict lookup per task). A removed task raises
        TaskNotFoundError before anything changes."""
        ids = [t for t in dict.fromkeys(task_ids) if t is not None]
        current = {t: self.subspace.get_task(t) for t in ids}
        for t in [t for t in ids if t in self._slots and self._cached[t] is not current[t]]:
            for name, layer in self._layers.items():
                if not layer.factored:  # a factored layer never reads cores
                    layer.store_cores(self._slots[t], _core(current[t], name)[None])
                layer.store_private(self._slots[t], *_private(current[t], name, layer,
                                                              self.subspace.modules[name]))
            self._cached[t] = current[t]
            applied = self._applied == t
            if applied:
                self._apply_extras(None)
            self._extras.pop(t, None)
            if applied:
                self._apply_extras(t)
        new = [t for t in ids if t not in self._slots]
        if new:
            start = 1 + len(self._slots)
            for name, layer in self._layers.items():
                if not layer.factored:
                    layer.store_cores(start, torch.stack([_core(current[t], name) for t in new]))
                parts = [_private(current[t], name, layer, self.subspace.modules[name]) for t in new]
                layer.store_private(start, [p[0][0] for p in parts], [p[1][0] for p in parts])
            self._slots.update({t: start + i for i, t in enumerate(new)})
            self._cached.update({t: current[t] for t in new})

    def _plan(self, task_ids, task_weights, task_order) -> tuple[Route | None, str | None]:
        """The route of a per-call task assignment and the task whose extras it needs."""
        device = next(iter(self._layers.values())).cores.device
        if task_weights is not None:
            if task_ids is not None or task_order is None:
                raise ValueError("pass task_weights with task_order, and without task_ids")
            order = list(task_order)
            if task_weights.ndim != 2 or task_weights.shape[1] != len(order):
                raise ValueError(f"task_weights must be (rows, {len(order)}) for task_order "
                                 f"{order}, not {tuple(task_weights.shape)}")
            self._cache_cores(order)
            headed = [t for t in order if self.subspace.get_task(t).extra]
            if headed:
                raise VLoRAError(f"tasks {headed} have non-LoRA tensors (heads); task_weights "
                                 "blend LoRA cores only")
            slots = torch.tensor([self._slots[t] for t in order], device=device)
            return Route("blend", rows=task_weights.shape[0], slots=slots,
                         weights=task_weights.to(device, torch.float32)), None
        ids = self._ids(task_ids)
        self._cache_cores(ids)
        if len(set(ids)) == 1:  # slot 0: the bare base, still one id per row
            slot = 0 if ids[0] is None else self._slots[ids[0]]
            return Route("single", rows=len(ids), slot=slot), ids[0]
        slot_of = [0 if t is None else self._slots[t] for t in ids]
        rows_of = {t: [i for i, u in enumerate(ids) if u == t] for t in dict.fromkeys(ids)}
        # every index vector in one host-to-device copy (one per task was a sync each on CUDA)
        distinct = sorted(set(slot_of))
        flat = torch.tensor(slot_of + [i for rows in rows_of.values() for i in rows] + distinct).to(device)
        index, grouped = flat[:len(ids)], flat[len(ids):len(flat) - len(distinct)]
        groups = dict(zip(rows_of, grouped.split([len(rows) for rows in rows_of.values()])))
        route = Route("rows", rows=len(ids), index=index,
                      groups=[(0 if t is None else self._slots[t], rows)
                              for t, rows in groups.items()])
        route.slots = flat[len(flat) - len(distinct):]  # what few-task batches blend
        route.weights = (index[:, None] == route.slots[None, :]).float()
        route.heads = self._mixed_heads(groups)
        return route, None

    @staticmethod
    def _ids(task_ids: Sequence[str | None]) -> list[str | None]:
        if isinstance(task_ids, str):
            raise ValueError(f"task_ids is one id per batch row, not a string ({task_ids!r}); "
                             f"use set_task({task_ids!r}) or task_ids=[{task_ids!r}] * rows")
        ids = list(task_ids)
        if not ids:
            raise ValueError("task_ids is empty")
        return ids

    def _mixed_heads(self, groups: dict[str | None, torch.Tensor]):
        """Per-row head plans for a mixed batch; refuses what rows cannot share (heads
        of different input widths, tensors other than Linear heads')."""
        extras = {t: self._task_extras(t) if t else {} for t in groups}
        keys = sorted({k for e in extras.values() for k in e})
        bad = [k for k in keys if k.rpartition(".")[0] not in self._heads
               or k.rpartition(".")[2] not in ("weight", "bias")]
        if bad:
            raise VLoRAError(f"tensors {bad} are not nn.Linear heads: a batch mixing tasks "
                             "covers the shared body and Linear heads only; use set_task")
        self._apply_extras(None)  # rows without a head of their own use the model's
        plans = {}
        for head in dict.fromkeys(k.rpartition(".")[0] for k in keys):
            module, plan, shapes = self._heads[head].base_layer, [], {}
            for t, rows in groups.items():
                w = extras[t].get(f"{head}.weight", module.weight.data)
                b = extras[t].get(f"{head}.bias", None if module.bias is None else module.bias.data)
                shapes[t] = tuple(w.shape)
                plan.append((rows, w, b))
            if len({s[1:] for s in shapes.values()}) > 1:  # output widths may differ, inputs not
                raise VLoRAError(
                    f"head {head!r} takes inputs of different widths in the batch's tasks "
                    f"(weights {shapes}): no input fits them all; run these tasks in separate batches")
            plans[head] = plan
        return plans

    def _apply(self, fn, *args, **kwargs):
        # .to()/.half(): move the model's own tensors home first, so the originals that
        # clear_task restores are the moved ones, then re-swap on the new device.
        applied = self._applied
        self._apply_extras(None)
        training = self._extras.get(_TRAINING)  # a trainer's heads cannot be read again: moved
        self._extras = {} if training is None else {_TRAINING: {k: fn(v) for k, v in training.items()}}
        out = super()._apply(fn, *args, **kwargs)
        self._apply_extras(applied)
        return out
