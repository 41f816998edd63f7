"""Train a task inside a subspace with a transformers ``Trainer``.

:class:`VLoRATrainer` is a ``Trainer`` whose model is a
:class:`~vlora.training.SubspaceTrainer`'s :attr:`~vlora.training.SubspaceTrainer.module`:
it optimises exactly the task's coordinates and heads (every base weight is frozen),
and its checkpoints hold those alone, as safetensors, so ``resume_from_checkpoint``
restores them with the optimiser, scheduler and data order::

    rates = lora_equivalent_lr(sub, lr=5e-3, lora_alpha=16, r=8)
    st = SubspaceTrainer(sub, "new_task", model=base_model, **rates, head_lr=5e-3)
    VLoRATrainer(st, args=TrainingArguments("out", warmup_steps=10), train_dataset=ds).train()
    st.write_back()

A subclass rather than a callback: callbacks cannot choose what the optimiser holds,
what a checkpoint contains or how one is loaded, and the ``Trainer`` would otherwise
write (and try to read back) the whole frozen base model at every save.
"""

from __future__ import annotations

import inspect
import os
import warnings
from typing import Any

from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainingArguments
from transformers.utils import can_return_loss, find_labels

from vlora.training import SubspaceTrainer

COORDINATES_NAME = "vlora_coordinates.safetensors"


class VLoRATrainer(Trainer):
    """A ``Trainer`` for ``subspace_trainer``'s parameters; other arguments as ``Trainer``'s.

    The learning rates are the subspace trainer's, one per parameter group (B-side
    coordinates ``lr``, A side ``a_lr``, extra directions ``direction_lr``, heads
    ``head_lr``): the two sides want different
    rates (see :class:`~vlora.training.SubspaceTrainer`), which one ``learning_rate``
    cannot give, so ``args.learning_rate`` is not used. The optimiser type and its
    settings (``optim``, ``adam_beta1`` ..., ``weight_decay``) and the schedule
    (``lr_scheduler_type``, warm-up, which scale every group alike) come from ``args``;
    the subspace trainer's own optimiser is not used. Labels, loss arguments and dataset
    columns follow the wrapped base model, as if that model were trained directly.
    """

    def __init__(self, subspace_trainer: SubspaceTrainer, *args: Any, **kwargs: Any):
        if "model" in kwargs:
            raise TypeError("VLoRATrainer trains subspace_trainer.module; do not pass model=")
        self.subspace_trainer = subspace_trainer
        super().__init__(subspace_trainer.module, *args, **kwargs)
        default_lr = TrainingArguments.__dataclass_fields__["learning_rate"].default
        if self.args.learning_rate != default_lr:
            rates = {g["name"]: g["lr"] for g in subspace_trainer.param_groups}
            warnings.warn(f"VLoRATrainer ignores args.learning_rate={self.args.learning_rate:g}: the "
                          f"rates are the SubspaceTrainer's ({rates}); set them there", stacklevel=2)
        # The Trainer inspected the wrapper's forward(*args, **kwargs); look at the real one.
        inner = subspace_trainer.model.model
        if self.args.label_names is None:
            self.label_names = find_labels(inner.__class__)
        self.can_return_loss = can_return_loss(inner.__class__)
        self.model_accepts_loss_kwargs = getattr(inner, "accepts_loss_kwargs", any(
            p.kind == inspect.Parameter.VAR_KEYWORD
            for p in inspect.signature(inner.forward).parameters.values()))

    def create_optimizer(self, model: Any = None) -> Any:
        """The optimiser of ``args`` over the subspace trainer's groups, at their rates."""
        if self.optimizer is None:
            cls, kwargs = (self.optimizer_cls_and_kwargs
                           or self.get_optimizer_cls_and_kwargs(self.args, self.model))
            if "params" in kwargs or "model" in kwargs:
                raise ValueError(f"VLoRATrainer: optim={self.args.optim!r} picks its own parameters; "
                                 "use one that takes parameter groups (adamw_torch, sgd, adafactor...)")
            kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
            groups = [{**g, "params": list(g["params"]), "weight_decay": self.args.weight_decay}
                      for g in self.subspace_trainer.param_groups]
            self.optimizer = cls(groups, **kwargs)
        return self.optimizer

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            inner = self.subspace_trainer.model.model
            self._signature_columns = [*inspect.signature(inner.forward).parameters,
                                       "label", "label_ids", *self.label_names]

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the coordinates, extra directions and heads (nothing of the base model)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_file(self.subspace_trainer.state_dict(), os.path.join(output_dir, COORDINATES_NAME),
                  metadata={"format": "pt", "task_id": self.subspace_trainer.task_id})
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        path = os.path.join(resume_from_checkpoint, COORDINATES_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"no {COORDINATES_NAME} in {resume_from_checkpoint}: not a checkpoint "
                             "of a VLoRATrainer")
        try:
            self.subspace_trainer.load_state_dict(load_file(path))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)
