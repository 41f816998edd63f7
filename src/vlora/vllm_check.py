"""Would vLLM load this adapter folder? A checker of vLLM's LoRA rules, without vLLM.

vLLM (``vllm/lora/peft_helper.py``, ``vllm/lora/utils.py``, ``LoRAConfig``) refuses an
adapter whose ``r`` exceeds the server's ``--max-lora-rank`` (which itself must be one
of a fixed set of values), that sets ``modules_to_save`` (recent versions refuse even
``lm_head``/``embed_tokens``), DoRA, or a bias other than ``"none"``, and any tensor
that is not a ``lora_A``/``lora_B`` (or embedding LoRA) weight. It reads one ``r`` and
``lora_alpha`` for all modules, so a ``rank_pattern``/``alpha_pattern`` would be served
at the wrong rank or scale without an error: that is reported too.
``save_adapter(..., for_vllm=True)`` writes folders that pass.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable

from torch import nn

from vlora.adapter import DEFAULT_KEY_PREFIX
from vlora.errors import AdapterError
from vlora.io import CONFIG_NAME, _read_tensors, resolve_adapter_dir

#: the values vLLM's LoRAConfig accepts for max_lora_rank
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# init_lora_weights values that leave the base weights alone (PiSSA, OLoRA, LoftQ... do not)
_INITS_KEEPING_BASE = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
_VLLM_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|"
                       r"lora_embedding_B)(?:\.weight)?$")


def _module_names(base: Iterable[str] | nn.Module) -> set[str]:
    if isinstance(base, nn.Module):
        return {n.removeprefix(DEFAULT_KEY_PREFIX) for n, _ in base.named_modules() if n}
    return set(base)


def check_vllm_adapter(path: str | os.PathLike, max_lora_rank: int = 16,
                       base_model_modules: Iterable[str] | nn.Module | None = None) -> list[str]:
    """The reasons vLLM would refuse (or misread) the adapter at ``path``; empty if none.

    Args:
        path: a PEFT adapter folder.
        max_lora_rank: the server's ``--max-lora-rank`` (vLLM's default is 16).
        base_model_modules: the base model (or its module names, full or last
            component such as ``q_proj``); each adapted module must be among them.
    """
    problems = []
    if max_lora_rank not in VLLM_MAX_LORA_RANKS:
        problems.append(f"max_lora_rank={max_lora_rank} is not one vLLM accepts "
                        f"{VLLM_MAX_LORA_RANKS}")
    try:
        folder = resolve_adapter_dir(path)
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        _, state = _read_tensors(folder)
    except (AdapterError, OSError, ValueError) as e:
        return [*problems, f"cannot read the adapter: {e}"]
    r = config.get("r")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, not LORA")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        problems.append(f"config r={r!r} is not a positive integer")
    elif r > max_lora_rank:
        problems.append(f"LoRA rank {r} is greater than max_lora_rank {max_lora_rank}")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save={config['modules_to_save']} (vLLM only supports "
                        "modules_to_save being None)")
    if config.get("use_dora"):
        problems.append("use_dora: vLLM does not support DoRA")
    if config.get("bias", "none") not in ("none", None):
        problems.append(f"bias={config['bias']!r}: vLLM needs bias='none'")
    if config.get("lora_bias"):
        problems.append("lora_bias: vLLM does not support LoRA bias")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _INITS_KEEPING_BASE:
        problems.append(f"init_lora_weights={init!r} changes the base weights when PEFT loads "
                        "it; vLLM refuses it")
    for key, what in (("alora_invocation_tokens", "aLoRA"), ("layer_replication", "layer_replication"),
                      ("use_bdlora", "BD-LoRA"), ("use_qalora", "QALoRA")):
        if config.get(key):
            problems.append(f"{key}: vLLM does not support {what}")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            problems.append(f"{key} is set: vLLM applies one r and lora_alpha to every module")
    modules = set()
    for key, tensor in state.items():
        m = _VLLM_KEY.match(key.removeprefix(DEFAULT_KEY_PREFIX))
        if m is None:
            problems.append(f"tensor {key} is not a LoRA weight vLLM loads")
            continue
        modules.add(m["module"])
        rank = tensor.shape[0] if m["kind"] == "lora_A" else tensor.shape[-1]
        if m["kind"] in ("lora_A", "lora_B") and isinstance(r, int) and rank != r:
            problems.append(f"tensor {key} has rank {rank}, the config r={r}: vLLM would "
                            "scale it by lora_alpha / r with the wrong r")
    if base_model_modules is not None:
        names = _module_names(base_model_modules)
        absent = sorted(m for m in modules if m not in names and m.rsplit(".", 1)[-1] not in names)
        if absent:
            problems.append(f"{len(absent)} adapted module(s) are not in the base model: "
                            f"{absent[:5]}")
        if isinstance(base_model_modules, nn.Module):
            unwrappable = sorted(m for m in modules if not _vllm_wraps(base_model_modules, m))
            if unwrappable:
                problems.append(f"{len(unwrappable)} adapted module(s) are not Linear or Embedding "
                                f"layers, which vLLM cannot wrap: {unwrappable[:5]}")
    return problems


def _vllm_wraps(model: nn.Module, name: str) -> bool:
    """Whether vLLM can put a LoRA on module ``name`` of ``model`` (a Linear-like or an
    embedding layer; it refuses others, e.g. ``input_layernorm``). Unknown names pass: the
    absent-module check reports them."""
    for prefix in ("", "model.", DEFAULT_KEY_PREFIX):
        try:
            module = model.get_submodule(prefix + name)
        except AttributeError:
            continue
        while hasattr(module, "base_layer"):  # wrapped by vlora or PEFT: the layer inside counts
            module = module.base_layer
        return isinstance(module, (nn.Linear, nn.Embedding)) or type(module).__name__ == "Conv1D"
    return True
