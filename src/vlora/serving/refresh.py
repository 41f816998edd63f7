"""Keeps a vLLM server's subspace adapters current and their folders bounded.

vLLM keeps every adapter name it resolved, at the path it resolved, until the name is
unloaded (``POST /v1/unload_lora_adapter``). :class:`Refresher` polls the server's
``/v1/models`` and the subspace, and unloads a name

* whose task was replaced or removed in a new generation (the next request resolves it
  again, to the new export: :mod:`vlora.serving.vllm_plugin`), or
* beyond ``max_folders`` names, the least recently resolved first (a later request
  resolves it again: the export is rewritten if its folder was removed meanwhile);

then removes the folders no registered name points at (:func:`~vlora.serving.materialize.collect`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from vlora.errors import VLoRAError
from vlora.serving.materialize import collect
from vlora.serving.vllm_plugin import SubspaceCache

logger = logging.getLogger(__name__)


class Refresher:
    """Checks the subspace's manifest every ``interval_s`` seconds, and runs :meth:`step`
    when it changed or ``full_every_s`` passed since the last step (:meth:`start`).

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000``.
        subspace: the served subspace directory.
        cache: where its adapter folders are written (the plugin's ``VLORA_SERVE_CACHE``).
        max_folders: registered adapter names kept (and so folders, besides those within
            ``grace_s`` of their last use).
        grace_s: a folder unregistered for less than this is kept (queued requests).
        api_key: the server's ``--api-key``, if any.
    """

    def __init__(self, url: str, subspace: str | os.PathLike, cache: str | os.PathLike,
                 max_folders: int = 64, interval_s: float = 1.0, full_every_s: float = 10.0,
                 grace_s: float = 120.0, api_key: str | None = None):
        self.url, self.cache = url.rstrip("/"), Path(cache)
        self.subspace = SubspaceCache(subspace, cache)
        self.max_folders, self.grace_s = max_folders, grace_s
        self.interval_s, self.full_every_s = interval_s, full_every_s
        self.api_key = api_key
        self._keys, self._folders = None, {}  # {name: its task's folder} in that subspace
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _call(self, path: str, body: dict | None = None) -> dict | str:
        req = urllib.request.Request(self.url + path, method="POST" if body else "GET",
                                     data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read().decode()
        try:
            return json.loads(text)
        except ValueError:
            return text

    def registered(self) -> dict[str, Path]:
        """``{name: folder}`` of the adapters the server holds from this cache."""
        cards = self._call("/v1/models").get("data", [])
        cache = os.path.realpath(self.cache)
        return {c["id"]: Path(c["root"]) for c in cards if c.get("root") and c.get("parent")
                and os.path.realpath(c["root"]).startswith(cache + os.sep)}

    def step(self) -> list[str]:
        """One poll: unload stale and surplus names, remove unused folders. Returns the
        names unloaded."""
        held = self.registered()
        keys = self.subspace.keys()
        if keys is not self._keys:  # a new generation: every task's folder is computed anew
            self._keys, self._folders = keys, {}
        for n in held.keys() - self._folders.keys():
            self._folders[n] = keys.folder(self.cache, n).resolve() if n in keys.sub else None
        stale = [n for n, p in held.items() if self._folders[n] != p.resolve()]
        fresh = sorted((n for n in held if n not in stale),
                       key=lambda n: _mtime(held[n]), reverse=True)
        unload = stale + fresh[self.max_folders:]
        for name in unload:
            try:
                self._call("/v1/unload_lora_adapter", {"lora_name": name})
            except urllib.error.HTTPError as e:  # unloaded meanwhile (404): nothing to do
                if e.code != 404:
                    raise
            _touch(held[name])  # its grace (requests queued for it) starts at the unload
        kept = {str(p) for n, p in held.items() if n not in unload}
        removed = collect(self.cache, kept, self.grace_s)
        if unload or removed:
            logger.info("vlora: unloaded %s; removed %d adapter folder(s)", unload, len(removed))
        return unload

    def _run(self) -> None:
        answered = False  # quiet while the server starts
        last, seen = -float("inf"), None
        while not self._stop.wait(self.interval_s):
            try:
                stamp = self.subspace.stamp()
                if stamp == seen and time.monotonic() - last < self.full_every_s:
                    continue
                self.step()
                answered, seen, last = True, stamp, time.monotonic()
            except (OSError, ValueError, VLoRAError) as e:  # server restarting, subspace unreadable
                if answered:
                    logger.warning("vlora: refresh skipped: %s", e)

    def start(self) -> Refresher:
        self._thread = threading.Thread(target=self._run, name="vlora-refresh", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):  # removed meanwhile: nothing left to keep
        os.utime(path)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
