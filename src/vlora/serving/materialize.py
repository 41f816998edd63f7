"""A subspace task's vLLM-ready adapter folder, made on demand, and the bound on those folders.

A folder is named by the task id and a digest of everything its export is computed from
(the bases, the task's coordinates, config and dtype), so a folder's content never
changes: a task replaced in a new generation of the subspace gets a new path, and a task
untouched by a new generation keeps its folder. vLLM re-reads a registered adapter's
path whenever it evicts it from its CPU cache, so a folder is removed only when no name
registered in the server points at it (:func:`collect`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
from filelock import FileLock

from vlora.errors import SubspaceError
from vlora.io import save_adapter
from vlora.subspace import SharedSubspace

#: names the subspace directory the vLLM resolver serves (the plugin is inert without it)
SUBSPACE_ENV = "VLORA_SUBSPACE"
#: where the resolver writes adapter folders (default: :func:`default_cache`)
CACHE_ENV = "VLORA_SERVE_CACHE"
# Part of every folder's digest: a change in how exports are written must give new paths.
_EXPORT_VERSION = "vllm-export-1"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_TMP_PREFIX = ".tmp-"
# what materialize() names its folders (TaskKeys.folder; tempfile.mkdtemp's 8 characters):
# collect() removes nothing else, whatever else the cache folder holds
_OURS = re.compile(r"[A-Za-z0-9._-]{0,40}-[0-9a-f]{24}|" + re.escape(_TMP_PREFIX) + r"[a-z0-9_]{8}")


def default_cache(subspace_dir: str | os.PathLike) -> Path:
    """``~/.cache/vlora/serve/<digest of the subspace's absolute path>``."""
    key = hashlib.sha256(str(Path(subspace_dir).resolve()).encode()).hexdigest()[:16]
    return Path.home() / ".cache" / "vlora" / "serve" / key


def cache_dir(subspace_dir: str | os.PathLike) -> Path:
    """The folder adapter exports of ``subspace_dir`` go to: ``$VLORA_SERVE_CACHE`` or
    :func:`default_cache`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else default_cache(subspace_dir)


def _tensor_digest(h: hashlib._Hash, x: torch.Tensor) -> None:
    x = x.detach().to("cpu").contiguous()
    h.update(f"{x.dtype}{tuple(x.shape)}".encode())
    h.update(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"")


class TaskKeys:
    """Digests of the tasks of one loaded subspace; the bases are hashed once."""

    def __init__(self, sub: SharedSubspace):
        self.sub = sub
        self._bases: dict[str, str] = {}

    def _basis(self, module: str) -> str:
        if module not in self._bases:
            h = hashlib.sha256()
            for x in (self.sub.modules[module].U, self.sub.modules[module].V):
                _tensor_digest(h, x)
            self._bases[module] = h.hexdigest()
        return self._bases[module]

    def key(self, task_id: str) -> str:
        """The digest of what ``reconstruct(task_id)`` and its vLLM export read."""
        t = self.sub.get_task(task_id)
        h = hashlib.sha256(json.dumps([_EXPORT_VERSION, task_id, t.dtype, t.config,
                                       t.dropped_sq], sort_keys=True, default=str).encode())
        for m in sorted(self.sub.modules):
            h.update(m.encode() + self._basis(m).encode())
            _tensor_digest(h, t.coords_b[m])
            _tensor_digest(h, t.coords_a[m])
        return h.hexdigest()

    def folder(self, cache: Path, task_id: str) -> Path:
        """``cache/<task id, made safe, 40 chars>-<digest, 24 hex>``."""
        return Path(cache) / f"{_UNSAFE.sub('_', task_id)[:40]}-{self.key(task_id)[:24]}"


def materialize(keys: TaskKeys, task_id: str, cache: str | os.PathLike) -> Path:
    """The task's vLLM export under ``cache``, written (atomically) if not there yet.

    Touches the folder, so that :func:`collect` leaves a just-resolved one alone while
    vLLM registers it. Raises SubspaceError for an unknown task or one with heads.
    """
    heads = sorted(keys.sub.get_task(task_id).extra)
    if heads:  # vLLM refuses modules_to_save: served without them it would be another model
        raise SubspaceError(f"task {task_id!r} has non-LoRA tensors vLLM cannot load "
                            f"(modules_to_save: {heads[:3]}); it is not served")
    folder = keys.folder(Path(cache), task_id)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _lock(folder.parent):  # not between collect()'s look at the folder and its removal
        try:
            os.utime(folder)  # from now on collect() leaves it alone
            return folder
        except FileNotFoundError:
            pass
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=_TMP_PREFIX))
    try:
        save_adapter(keys.sub.reconstruct(task_id), tmp / "a", for_vllm=True)
        os.utime(tmp / "a")  # its grace in collect() starts now, not when writing began
        try:
            os.rename(tmp / "a", folder)
        except OSError:
            if not folder.is_dir():  # not another resolver's identical folder
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _lock(cache: Path) -> FileLock:
    """What materialize() (in vLLM's server) and collect() (in ``vlora serve``) take in turn."""
    return FileLock(str(cache / ".lock"))


def collect(cache: str | os.PathLike, registered: set[str], grace_s: float = 120.0
            ) -> list[Path]:
    """Remove the folders :func:`materialize` wrote under ``cache`` that no registered
    adapter path names and that were neither made nor resolved in the last ``grace_s``
    seconds (requests already queued for an unloaded name may still read theirs); anything
    else in ``cache`` is left alone. Returns the folders removed."""
    cache = Path(cache)
    keep = {os.path.realpath(p) for p in registered}
    removed = []
    now = time.time()
    for entry in cache.iterdir() if cache.is_dir() else ():
        if not _OURS.fullmatch(entry.name):
            continue
        with _lock(cache):  # a folder resolved meanwhile is touched before or after, not during
            try:
                # a temp folder may be one a resolver is writing now: only a crash's, an hour old
                wait = max(grace_s, 3600.0) if entry.name.startswith(_TMP_PREFIX) else grace_s
                if entry.is_symlink() or not entry.is_dir() or os.path.realpath(entry) in keep \
                        or now - entry.stat().st_mtime < wait:
                    continue
            except FileNotFoundError:
                continue
            shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed
