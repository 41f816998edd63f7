"""The in-memory LoRA adapter, and what a PEFT ``adapter_config.json`` means.

A :class:`LoRAWeights` holds, per adapted module, the raw factors exactly as
stored (dtype included, so an unchanged adapter is written back bit for bit)
and the scale PEFT would apply, ``dW = scale * B @ A``. Nothing here reads
files; :mod:`vlora.io` does.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from vlora.errors import AdapterError, UnsupportedAdapterError

# Every LoraConfig field PEFT has written up to 0.21; anything else gets a warning.
KNOWN_CONFIG_KEYS = frozenset([
    "alora_invocation_tokens", "alpha_pattern", "arrow_config", "auto_mapping",
    "base_model_name_or_path", "bias", "corda_config", "ensure_weight_tying", "eva_config",
    "exclude_modules", "fan_in_fan_out", "inference_mode", "init_lora_weights", "kasa_config",
    "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha",
    "lora_bias", "lora_dropout", "lora_ga_config", "megatron_config", "megatron_core",
    "modules_to_save", "monteclora_config", "peft_type", "peft_version", "qalora_group_size", "r",
    "rank_pattern", "revision", "target_modules", "target_parameters", "task_type",
    "trainable_token_indices", "use_bdlora", "use_dora", "use_qalora", "use_rslora",
    "velora_config", "modules_to_tie",
])

# Config keys that, when set, change what the stored tensors mean: a plain
# s * B @ A reading of such an adapter would be silently wrong.
REFUSED_WHEN_SET = {
    "use_dora": "DoRA adds a magnitude vector: dW is not s * B @ A",
    "lora_bias": "LoRA biases are not part of s * B @ A",
    "alora_invocation_tokens": "activated LoRA applies only after invocation tokens",
    "target_parameters": "LoRA on raw parameters (e.g. MoE experts) is not a module LoRA",
    "trainable_token_indices": "trainable tokens change the embedding, not a LoRA",
    "layer_replication": "replicated layers share one LoRA across copies",
    "use_qalora": "QA-LoRA pools the input before A",
    "use_bdlora": "BD-LoRA uses block-diagonal factors",
    "arrow_config": "Arrow routes between adapters at run time",
    "kasa_config": "KaSA changes the LoRA forward",
    "velora_config": "VeLoRA changes the LoRA forward",
    "monteclora_config": "MonteCLoRA samples the factors",
}

DEFAULT_KEY_PREFIX = "base_model.model."


def check_config(config: dict[str, Any], path: Any = None) -> None:
    """Refuse PEFT configs whose weights vlora would misread; warn on unknown keys.

    Raises:
        UnsupportedAdapterError: naming every refused key that is set.
        AdapterError: when the config is not a LoRA config or has wrong types.
    """
    if not isinstance(config, dict):
        raise AdapterError(path, "adapter_config.json is not a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise UnsupportedAdapterError(path, f"peft_type is {peft_type!r}; vlora reads LoRA only")
    refused = [f"{k} ({why})" for k, why in REFUSED_WHEN_SET.items() if config.get(k)]
    if config.get("bias", "none") not in ("none", None):
        refused.append(f"bias={config['bias']!r} (trained biases are not part of s * B @ A)")
    if refused:
        raise UnsupportedAdapterError(path, "unsupported LoRA features: " + "; ".join(refused))
    unknown = sorted(set(config) - KNOWN_CONFIG_KEYS)
    if unknown:
        warnings.warn(f"{path}: unknown adapter_config keys ignored: {', '.join(unknown)}",
                      stacklevel=3)
    for key in ("r", "lora_alpha"):
        value = config.get(key, 8)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise AdapterError(path, f"config {key}={value!r} must be a positive number")
        if not math.isfinite(value) or value > 1e9:
            raise AdapterError(path, f"config {key}={value!r} is absurd")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
            for v in pattern.values()
        ):
            raise AdapterError(path, f"config {key} must map module patterns to positive numbers")


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    # PEFT's get_pattern_key: the first key that matches a suffix of the module name.
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module):
            return pattern[key]
    return default


def module_rank_and_alpha(config: dict[str, Any], module: str) -> tuple[int, float]:
    """The (r, lora_alpha) PEFT uses for ``module``, after rank and alpha patterns."""
    r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    return int(r), float(alpha)


def peft_scale(config: dict[str, Any], module: str) -> float:
    """The scale PEFT multiplies ``B @ A`` by for ``module``: alpha/r, or alpha/sqrt(r)."""
    r, alpha = module_rank_and_alpha(config, module)
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


@dataclass(eq=False)
class LoRAWeights:
    """A LoRA adapter in memory: per module ``dW = scales[m] * lora_b[m] @ lora_a[m]``.

    Attributes:
        layer_names: adapted module names as in the base model
            (``bert.encoder.layer.0.attention.self.query``), in file order.
        lora_a: module -> A, shape ``(r, d_in)``, dtype as stored.
        lora_b: module -> B, shape ``(d_out, r)``, dtype as stored.
        scales: module -> the scale PEFT applies.
        extra: the file's other tensors (``modules_to_save`` such as classifier
            heads), keyed as PEFT writes them without the ``base_model.model.`` prefix.
        config: the adapter_config.json it came from (or one describing it).
        source: where it was read from, if anywhere.
        sha256: digest of the weights file it was read from, if any.
    """

    layer_names: list[str]
    lora_a: dict[str, torch.Tensor]
    lora_b: dict[str, torch.Tensor]
    scales: dict[str, float]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    sha256: str | None = None

    def __post_init__(self) -> None:
        for name in self.layer_names:
            if name not in self.lora_a or name not in self.lora_b:
                raise AdapterError(self.source, f"module {name}: lora_A or lora_B is missing")
            a, b = self.lora_a[name], self.lora_b[name]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise AdapterError(
                    self.source,
                    f"module {name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                    "are not (r, d_in) and (d_out, r)",
                )

    @property
    def rank(self) -> int:
        """The largest rank over modules (vlora-dev called this ``rank``)."""
        return max((self.lora_a[m].shape[0] for m in self.layer_names), default=0)

    def ranks(self) -> dict[str, int]:
        return {m: self.lora_a[m].shape[0] for m in self.layer_names}

    def shapes(self) -> dict[str, tuple[int, int]]:
        """module -> (d_out, d_in) of the base weight it adapts (Linear orientation)."""
        return {m: (self.lora_b[m].shape[0], self.lora_a[m].shape[1]) for m in self.layer_names}

    def delta_weight(self, module: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense ``dW = s * B @ A`` of one module, ``(d_out, d_in)``. Small sizes only."""
        b = self.lora_b[module].to(dtype)
        return self.scales[module] * b @ self.lora_a[module].to(dtype)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def num_lora_params(self) -> int:
        return sum(self.lora_a[m].numel() + self.lora_b[m].numel() for m in self.layer_names)
