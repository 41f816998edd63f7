"""The in-memory LoRA adapter, and what a PEFT ``adapter_config.json`` means.

A :class:`LoRAWeights` holds, per adapted module, the raw factors exactly as
stored (dtype included, so an unchanged adapter is written back bit for bit)
and the scale PEFT would apply, ``dW = scale * B @ A``. Nothing here reads
files; :mod:`vlora.io` does.
"""

from __future__ import annotations

import functools
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

# init_lora_weights that also change the base weights (PEFT warns when loading them)
WEIGHT_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")

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
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(WEIGHT_CHANGING_INITS) or config.get("loftq_config"):
        refused.append(f"init_lora_weights={init!r} (PiSSA, OLoRA, CorDA and LoftQ adapters are "
                       "meant for a base whose weights they changed: s * B @ A on the original "
                       "base is not what they learnt; PEFT can convert them to plain LoRAs)")
    if config.get("bias", "none") not in ("none", None):
        refused.append(f"bias={config['bias']!r} (trained biases are not part of s * B @ A)")
    if refused:
        raise UnsupportedAdapterError(path, "unsupported LoRA features: " + "; ".join(refused))
    unknown = sorted(set(config) - KNOWN_CONFIG_KEYS)
    if unknown:
        warnings.warn(f"{path}: unknown adapter_config keys ignored: {', '.join(unknown)}",
                      stacklevel=3)
    for key in ("r", "lora_alpha"):
        _check_number(config.get(key, 8), f"config {key}", key == "r", path)
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise AdapterError(path, f"config {key} must map module patterns to positive numbers, "
                               f"not {type(pattern).__name__}")
        for k, v in pattern.items():
            _check_pattern_key(k, key, path)
            _check_number(v, f"config {key}[{k!r}]", key == "rank_pattern", path)
    types = {"target_modules": (str, list), "modules_to_save": (list,), "use_rslora": (bool,),
             "base_model_name_or_path": (str,), "fan_in_fan_out": (bool,)}
    for key, allowed in types.items():
        value = config.get(key)
        if value is not None and (not isinstance(value, allowed) or isinstance(value, list)
                                  and not all(isinstance(x, str) for x in value)):
            raise AdapterError(path, f"config {key}={str(value)[:80]!r} has the wrong type "
                               f"(expected {' or '.join(t.__name__ for t in allowed)}"
                               f"{' of strings' if list in allowed else ''} or null)")


def _check_number(value: Any, what: str, integral: bool, path: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise AdapterError(path, f"{what}={str(value)[:40]} must be a positive number")
    if value > 1e9 or not math.isfinite(value):  # compare first: math.isfinite(10**400) overflows
        raise AdapterError(path, f"{what}={str(value)[:40]} is absurd")
    if integral and value != int(value):
        raise AdapterError(path, f"{what}={value!r} is not a whole number")


_MAX_PATTERN_KEY = 512
MAX_MODULE_NAME = 512  # real module names are under 150 characters
try:  # the parser re itself uses
    from re import _constants as _sre
    from re import _parser as _sre_parse
except ImportError:  # Python 3.10
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]
_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT, getattr(_sre, "POSSESSIVE_REPEAT", None)}


class _Risky(Exception):
    pass


def _check_pattern_key(key: Any, where: str, path: Any) -> None:
    """A rank/alpha pattern key is a regular expression (PEFT matches it against module
    names). A hostile config must not hang the reader, so keys that can backtrack
    exponentially are refused: a variable repeat or an alternation inside a repeat, a
    backreference, or more than two variable repeats in all. Plain names pass."""
    if not isinstance(key, str) or not key or len(key) > _MAX_PATTERN_KEY:
        raise AdapterError(path, f"config {where} key {str(key)[:60]!r} must be a module name "
                           f"or pattern of 1-{_MAX_PATTERN_KEY} characters")
    try:
        risky = may_backtrack(key)
    except (re.error, RecursionError, OverflowError) as e:
        raise AdapterError(path, f"config {where} key {key[:60]!r} is not a valid pattern ({e})") \
            from None
    if risky:
        raise AdapterError(path, f"config {where} key {key[:60]!r}: patterns with nested or many "
                           "repeats, or backreferences, are refused (they can take hours to match)")


def may_backtrack(pattern: str, max_length: int | None = None) -> bool:
    """Whether matching ``pattern`` can take exponential or high polynomial time: a
    variable repeat or an alternation inside a repeat, a backreference, or more than two
    variable repeats in all, unless ``c`` repeats against strings of ``max_length``
    cost at most ``max_length ** c`` = 10^7 steps (real patterns on real module names).
    Raises re.error (and the like) for a pattern that is not one."""
    try:
        repeats = _variable_repeats(_sre_parse.parse(pattern))
    except _Risky:
        return True
    return repeats > 2 and (max_length is None or max(max_length, 2) ** repeats > 1e7)


def _variable_repeats(items: Any, under_repeat: bool = False) -> int:
    n = 0
    for op, av in items:
        if op in _REPEATS:
            lo, hi, body = av
            if under_repeat and lo != hi:
                raise _Risky
            n += (lo != hi) + _variable_repeats(body, under_repeat or hi > 1)
        elif op in (_sre.GROUPREF, _sre.GROUPREF_EXISTS) or op == _sre.BRANCH and under_repeat:
            raise _Risky
        elif op == _sre.BRANCH:
            n += sum(_variable_repeats(b, under_repeat) for b in av[1])
        elif op in (_sre.SUBPATTERN, _sre.ASSERT, _sre.ASSERT_NOT):
            n += _variable_repeats(av[-1], under_repeat)
        elif op == getattr(_sre, "ATOMIC_GROUP", None):
            n += _variable_repeats(av, under_repeat)
    return n


@functools.lru_cache(maxsize=4096)
def _pattern_regex(key: str) -> re.Pattern:
    return re.compile(rf"(.*\.)?({key})$")


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    # PEFT's get_pattern_key: the first key that matches a suffix of the module name.
    for key in pattern:
        if _pattern_regex(key).match(module):
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
