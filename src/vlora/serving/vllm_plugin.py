"""vLLM LoRA resolver: serves every task of a vlora subspace by name.

Registered through the ``vllm.general_plugins`` entry point (vLLM loads it in each of
its processes); inert unless ``VLORA_SUBSPACE`` names a subspace directory. With
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`` vLLM's OpenAI server asks the resolvers about any
``model`` name it does not know: this one answers for the subspace's task ids with the
task's vLLM export, written on demand under ``$VLORA_SERVE_CACHE``
(:mod:`vlora.serving.materialize`). The subspace is read again whenever its manifest
changes, so a task added while the server runs is servable at once; a task *replaced*
keeps its old adapter until its name is unloaded (vLLM never resolves a name it holds),
which ``vlora serve``'s watcher does (:mod:`vlora.serving.refresh`).

Modelled on vLLM's ``vllm/plugins/lora_resolvers/filesystem_resolver.py``; unlike that
one it does not compare the adapter's ``base_model_name_or_path`` with the served model
(a subspace records the hub id, the server is often given a local folder).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path

logger = logging.getLogger(__name__)


class SubspaceCache:
    """The subspace at ``path`` as last saved, loaded again when its manifest changes."""

    def __init__(self, path: str | os.PathLike, cache: str | os.PathLike):
        self.path, self.cache = Path(path), Path(cache)
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._keys = None

    def stamp(self) -> tuple:
        """Changes whenever a save replaces the manifest."""
        from vlora.storage import MANIFEST

        st = (self.path / MANIFEST).stat()
        return st.st_ino, st.st_mtime_ns, st.st_size  # a save renames a new manifest in

    def keys(self):
        """The :class:`~vlora.serving.materialize.TaskKeys` of the current subspace."""
        from vlora.serving.materialize import TaskKeys
        from vlora.subspace import SharedSubspace

        with self._lock:
            stamp = self.stamp()
            if stamp != self._stamp:
                self._keys, self._stamp = TaskKeys(SharedSubspace.load(self.path)), stamp
            return self._keys

    def materialize(self, task_id: str) -> Path | None:
        """The task's adapter folder, or None if the subspace has no such task."""
        from vlora.serving.materialize import materialize

        keys = self.keys()
        if task_id not in keys.sub:
            return None
        return materialize(keys, task_id, self.cache)


def _resolver_class():
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    class VLoRAResolver(LoRAResolver):
        """Answers for the task ids of one subspace."""

        def __init__(self, subspace: SubspaceCache):
            self.subspace = subspace

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            # loading a subspace and writing an export take a while: off the event loop
            try:
                folder = await asyncio.to_thread(self.subspace.materialize, lora_name)
            except Exception as e:  # an unreadable subspace must not take the server down
                logger.error("vlora: cannot materialize task %r of %s: %s", lora_name,
                             self.subspace.path, e)
                return None
            if folder is None:
                return None
            # vLLM sets lora_int_id itself when it loads a resolved adapter
            return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(folder))

    return VLoRAResolver


def register() -> None:
    """The ``vllm.general_plugins`` entry point: registers the resolver if
    ``VLORA_SUBSPACE`` is set (raising, so that vLLM does not start, if it names no
    subspace)."""
    from vlora.serving.materialize import SUBSPACE_ENV, cache_dir
    from vlora.storage import MANIFEST

    path = os.environ.get(SUBSPACE_ENV)
    if not path:
        return
    if not (Path(path) / MANIFEST).is_file():
        raise ValueError(f"{SUBSPACE_ENV}={path}: not a vlora subspace directory (no {MANIFEST})")
    from vllm.lora.resolver import LoRAResolverRegistry

    subspace = SubspaceCache(path, cache_dir(path))
    LoRAResolverRegistry.register_resolver("vlora subspace", _resolver_class()(subspace))
