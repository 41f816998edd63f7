"""Exceptions raised by vlora.

Every error that bad input can cause is one of these, and its message names the
file (or task, or module) and the problem, so a user never has to read a torch
traceback to learn what is wrong with an adapter.
"""

from __future__ import annotations

import os


class VLoRAError(Exception):
    """Base class of every error vlora raises on purpose."""


class AdapterError(VLoRAError):
    """An adapter file or folder cannot be read as a LoRA adapter.

    Attributes:
        path: the file or folder at fault (``None`` for an in-memory adapter).
        problem: what is wrong with it, in words.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class UnsupportedAdapterError(AdapterError):
    """The adapter is valid PEFT but uses a feature whose weights vlora would misread."""


class IncompatibleAdaptersError(VLoRAError):
    """Adapters (or an adapter and a subspace) do not share a base model or modules."""


class DeviceError(VLoRAError, ValueError):
    """A fit was asked to run on a device this machine cannot use (CUDA without a GPU)."""


class SubspaceError(VLoRAError):
    """A subspace directory is missing, corrupt, locked, or asked for something it lacks."""


class BudgetError(SubspaceError):
    """No fit of the adapters lands under a byte budget.

    Attributes:
        closest: the smallest fit found (over the budget), for callers that go on from it.
    """

    def __init__(self, message: str, closest=None):
        super().__init__(message)
        self.closest = closest


class TaskNotFoundError(SubspaceError, KeyError):
    """A task id is not in the subspace."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])
