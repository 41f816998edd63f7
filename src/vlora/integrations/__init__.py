"""Integrations with training frameworks (imported on demand, never by ``import vlora``).

* :mod:`vlora.integrations.huggingface`: a transformers ``Trainer`` that trains a task
  inside a subspace (:class:`~vlora.training.SubspaceTrainer`) and checkpoints it.
"""
