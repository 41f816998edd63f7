"""Reading and writing PEFT LoRA adapter folders.

``load_adapter`` reads everything PEFT writes (safetensors or legacy ``.bin``,
keys with or without ``base_model.model.`` and adapter names, named
subfolders, rank/alpha patterns, rslora); ``save_adapter`` writes a folder that
``peft.PeftModel.from_pretrained`` loads, and reproduces an unchanged adapter's
tensors bit for bit. Untrusted files are never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from vlora.adapter import (
    DEFAULT_KEY_PREFIX,
    MAX_MODULE_NAME,
    LoRAWeights,
    check_config,
    may_backtrack,
    module_rank_and_alpha,
    peft_scale,
)
from vlora.atomic import atomic_dir, fsync_write, read_regular, safetensors_blob
from vlora.errors import AdapterError, UnsupportedAdapterError

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")
CONFIG_MAX_BYTES = 16 << 20  # PEFT writes a few KB; a rank_pattern over 10k modules is < 1 MB
# Factor dtypes vlora computes with (and can store a task as); float8 and others are refused.
FACTOR_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_FACTOR = 1e9
_REFUSED_KEYS = {
    "lora_embedding_A": "embedding LoRA", "lora_embedding_B": "embedding LoRA",
    "lora_magnitude_vector": "DoRA", "lora_bias": "LoRA bias",
}


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_adapter_dir(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file()


def resolve_adapter_dir(path: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """The folder holding ``adapter_config.json``: ``path``, ``path/adapter_name``, or the
    single named subfolder PEFT wrote for a non-default adapter."""
    p = Path(path)
    if not p.exists():
        raise AdapterError(p, "no such file or directory")
    if p.is_file():
        p = p.parent
    if not p.is_dir():
        raise AdapterError(p, "neither a folder nor a regular file")
    if adapter_name is not None:
        if any(c in adapter_name for c in "/\\") or adapter_name in ("", ".", ".."):
            raise AdapterError(p, f"invalid adapter name {adapter_name!r}")
        if _is_adapter_dir(p / adapter_name):
            return p / adapter_name
    if _is_adapter_dir(p):
        return p
    subs = sorted(d.name for d in p.iterdir() if d.is_dir() and _is_adapter_dir(d))
    if adapter_name is not None:
        raise AdapterError(p, f"no adapter named {adapter_name!r} (found: {subs or 'none'})")
    if len(subs) == 1:
        return p / subs[0]
    if subs:
        raise AdapterError(p, f"holds several adapters {subs}; pass adapter_name=")
    raise AdapterError(p, f"not a LoRA adapter folder (no {CONFIG_NAME})")


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    try:
        config = json.loads(read_regular(path, CONFIG_MAX_BYTES).decode("utf-8"))
    except OSError as e:
        raise AdapterError(path, f"cannot read adapter config: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, 5000-digit ints, deep nesting
        raise AdapterError(path, f"cannot read adapter config: {str(e)[:200]}") from None
    check_config(config, path)
    return config


def _read_tensors(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    st, binf = folder / SAFETENSORS_NAME, folder / BIN_NAME
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return st, load_file(str(st))
        except (SafetensorError, OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
            # KeyError: a dtype safetensors parses but torch lacks (F4, F6_*, F8_E8M0)
            raise AdapterError(st, f"corrupt or truncated safetensors file "
                               f"({type(e).__name__}: {e})") from None
    if binf.is_file():
        _check_torch_zip(binf)
        try:
            # weights_only: a .bin from anywhere must never run pickled code.
            state = torch.load(str(binf), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a bad pickle
            raise AdapterError(binf, f"cannot read as a weights-only torch file ({e})") from None
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise AdapterError(binf, "not a dict of tensors")
        for k, t in state.items():  # a stride-0 view can claim far more than its storage
            if t.numel() * t.element_size() > t.untyped_storage().nbytes():
                raise AdapterError(binf, f"tensor {k} of shape {tuple(t.shape)} is an expanded "
                                   f"view of {t.untyped_storage().nbytes()} stored bytes")
        return binf, state
    raise AdapterError(folder, f"no {SAFETENSORS_NAME} or {BIN_NAME}")


def _check_torch_zip(path: Path) -> None:
    """Refuse what torch would read with an allocation out of proportion to the file: the
    legacy (pre-1.6, non-zip) format, which allocates each storage at its declared size
    before reading it, and compressed records, which can expand a thousandfold.
    torch.save writes a zip of uncompressed records."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except Exception as e:  # zipfile raises BadZipFile, EOFError, NotImplementedError, ...
        raise AdapterError(path, f"not a zip-format torch file ({type(e).__name__}: {e}); only "
                           "files written by torch.save since torch 1.6 are read") from None
    if any(i.compress_type != zipfile.ZIP_STORED for i in infos):
        raise AdapterError(path, "compressed records in a torch file (torch.save never "
                           "compresses; refusing a possible zip bomb)")
    if sum(i.file_size for i in infos) > path.stat().st_size:
        raise AdapterError(path, "records claim more bytes than the file holds")


def parse_state_dict(state: dict[str, torch.Tensor], config: dict[str, Any],
                     path: Any = None, adapter_name: str | None = None) -> LoRAWeights:
    """Split a PEFT state dict into LoRA factors and other tensors, validating both."""
    factors: dict[str, dict[str, torch.Tensor]] = {"A": {}, "B": {}}
    names_seen: set[str] = set()
    extra: dict[str, torch.Tensor] = {}
    order: list[str] = []
    for key, tensor in state.items():
        short = key[len(DEFAULT_KEY_PREFIX):] if key.startswith(DEFAULT_KEY_PREFIX) else key
        for marker, what in _REFUSED_KEYS.items():
            if f".{marker}" in short:
                raise UnsupportedAdapterError(path, f"tensor {key} is a {what}, not a plain LoRA")
        m = _LORA_KEY.match(short)
        if m is None:
            # modules_to_save are saved by PEFT without their wrapper prefix; strip it if present.
            extra[re.sub(r"\.modules_to_save\.[^.]+\.", ".", short)] = tensor
            continue
        if m["adapter"] is not None:
            names_seen.add(m["adapter"])
            if adapter_name is not None and m["adapter"] != adapter_name:
                continue
        module = m["module"]
        if len(module) > MAX_MODULE_NAME:
            raise AdapterError(path, f"module name of {len(module)} characters "
                               f"(at most {MAX_MODULE_NAME}): {module[:60]!r}...")
        if module in factors[m["side"]]:
            raise AdapterError(path, f"module {module}: lora_{m['side']} appears twice "
                               f"(several adapters in one file? pass adapter_name=)")
        factors[m["side"]][module] = tensor
        if module not in order:
            order.append(module)
    if len(names_seen) > 1 and adapter_name is None:
        raise AdapterError(path, f"file holds adapters {sorted(names_seen)}; pass adapter_name=")
    if not order:
        raise AdapterError(path, "no lora_A/lora_B tensors found")
    for module in order:
        a, b = factors["A"].get(module), factors["B"].get(module)
        if a is None or b is None:
            raise AdapterError(path, f"module {module}: lora_{'A' if a is None else 'B'} missing")
        for side, t in (("A", a), ("B", b)):
            if t.ndim != 2:
                raise UnsupportedAdapterError(
                    path, f"module {module}: lora_{side} has shape {tuple(t.shape)}; "
                    "only Linear/Conv1D LoRAs (2-D factors) are supported")
            if t.dtype not in FACTOR_DTYPES:
                raise AdapterError(path, f"module {module}: lora_{side} has dtype {t.dtype} "
                                   "(float32, float16, bfloat16 or float64 expected)")
            _check_values(t, path, f"module {module}: lora_{side}")
        r_config, _ = module_rank_and_alpha(config, module)
        if a.shape[0] != b.shape[1] or a.shape[0] != r_config:
            raise AdapterError(
                path, f"module {module}: config says r={r_config} but lora_A is "
                f"{tuple(a.shape)} and lora_B is {tuple(b.shape)}")
    scales = {m: peft_scale(config, m) for m in order}
    return LoRAWeights(order, factors["A"], factors["B"], scales, extra, config,
                       None if path is None else str(path))


def load_adapter(path: str | os.PathLike, adapter_name: str | None = None) -> LoRAWeights:
    """Read a PEFT LoRA adapter folder (or a named adapter inside one).

    Args:
        path: the folder ``save_pretrained`` wrote, a folder holding one named
            adapter subfolder, or the weights file itself.
        adapter_name: the subfolder / in-key name of the adapter to read.

    Returns:
        LoRAWeights with factors in their stored dtype and PEFT's scales.

    Raises:
        AdapterError: naming the file and the problem (missing, corrupt, NaN,
            shapes that contradict the config, A without B, ...).
        UnsupportedAdapterError: DoRA, LoRA bias, embedding LoRA and other
            variants whose weights are not ``s * B @ A``.
    """
    folder = resolve_adapter_dir(path, adapter_name)
    config = _read_config(folder)
    weights_file, state = _read_tensors(folder)
    adapter = parse_state_dict(state, config, weights_file, adapter_name)
    adapter.source = str(folder)
    adapter.sha256 = file_sha256(weights_file)
    return adapter


def adapter_disk_bytes(path: str | os.PathLike) -> int | None:
    """Bytes on disk of the adapter at ``path``: its config and weights file (what a
    subspace stores in its place); None when it is not there any more."""
    try:
        folder = resolve_adapter_dir(path)
        weights = folder / SAFETENSORS_NAME if (folder / SAFETENSORS_NAME).is_file() else folder / BIN_NAME
        return (folder / CONFIG_NAME).stat().st_size + weights.stat().st_size
    except (AdapterError, OSError):
        return None


def load_adapter_from_hub(repo_id: str, revision: str | None = None,
                          adapter_name: str | None = None, **kwargs: Any) -> LoRAWeights:
    """Download (or find in the local cache) a LoRA adapter from the Hugging Face Hub.

    With ``HF_HUB_OFFLINE=1`` only the local cache is used. Extra keyword arguments
    go to ``huggingface_hub.snapshot_download`` (``cache_dir``, ``token``, ...).
    """
    return load_adapter(hub_adapter_dir(repo_id, revision, **kwargs), adapter_name)


def hub_adapter_dir(repo_id: str, revision: str | None = None, **kwargs: Any) -> Path:
    """The folder (a snapshot in the Hugging Face cache) holding the adapter files of
    ``repo_id`` at ``revision`` (a branch, tag or commit hash; default ``main``), downloaded
    if need be; with ``HF_HUB_OFFLINE=1`` only the cache is read. Extra keyword arguments
    go to ``huggingface_hub.snapshot_download``. Every failure is an AdapterError naming
    ``repo_id[@revision]``: offline and not cached, no such repository or revision, ..."""
    where = repo_id if revision is None else f"{repo_id}@{revision}"
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise AdapterError(where, "loading from the Hub needs: pip install 'vlora[hub]'") from None
    patterns = [CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME, "*/" + CONFIG_NAME,
                "*/" + SAFETENSORS_NAME, "*/" + BIN_NAME]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, **kwargs))
    except Exception as e:  # hub errors come in many types: offline, not found, auth
        raise AdapterError(where, _hub_problem(e, repo_id, revision, kwargs)) from None


def _hub_problem(e: Exception, repo_id: str, revision: str | None, kwargs: dict[str, Any]) -> str:
    """``e`` (from snapshot_download) in words; by class name, as huggingface_hub has moved
    its exception classes between versions."""
    from huggingface_hub import constants
    kinds = {c.__name__ for c in type(e).__mro__}
    detail = (str(e).strip().splitlines() or [""])[0][:300]
    offline = bool(constants.HF_HUB_OFFLINE or kwargs.get("local_files_only"))
    at = f" at revision {revision}" if revision else ""
    if "IncompleteSnapshotError" in kinds:
        return f"its cached snapshot{at} is incomplete ({detail})"
    if "LocalEntryNotFoundError" in kinds:
        cache = kwargs.get("cache_dir") or constants.HF_HUB_CACHE
        if offline:
            get = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
            return (f"offline (HF_HUB_OFFLINE=1) and not in the local Hugging Face cache "
                    f"{cache}{at}: download it once with network access ({get}), or unset "
                    "HF_HUB_OFFLINE")
        return f"not in the local Hugging Face cache {cache}{at}, and the Hub cannot be reached ({detail})"
    if "RevisionNotFoundError" in kinds:
        return f"the Hub repository has no revision {revision!r}"
    if kinds & {"RepositoryNotFoundError", "GatedRepoError"}:
        return "no such model repository on the Hub, or it is private or gated (log in: hf auth login)"
    if "HFValidationError" in kinds:
        return f"not a valid Hub repository id ({detail})"
    return f"cannot fetch from the Hub ({type(e).__name__}: {detail})"


def _check_values(t: torch.Tensor, where: Any, what: str) -> None:
    # NaN fails the comparison too. LoRA factors are O(1); beyond 1e9 the float32
    # coordinates of the subspace would overflow.
    if t.numel() and not bool((t.abs() <= MAX_FACTOR).all()):
        raise AdapterError(where, f"{what} contains NaN or Inf, or values beyond +-{MAX_FACTOR:g}")


def check_weights(weights: LoRAWeights) -> LoRAWeights:
    """What :func:`load_adapter` checks of a file's values, for an adapter built in memory
    (LoRAWeights checks shapes itself): some modules, finite factors of sane size."""
    if not weights.layer_names:
        raise AdapterError(weights.source, "the adapter has no LoRA modules")
    for m in weights.layer_names:
        _check_values(weights.lora_a[m], weights.source, f"module {m}: lora_A")
        _check_values(weights.lora_b[m], weights.source, f"module {m}: lora_B")
    return weights


def _targeted(targets: Any, module: str) -> bool:
    """Whether PEFT's ``target_modules`` (a regex, matched whole, or names matched as
    suffixes) selects ``module``. A regex that could backtrack for hours (a hostile config)
    selects nothing, so that the config written names the modules instead."""
    if isinstance(targets, str):
        try:
            return not may_backtrack(targets, len(module)) and re.fullmatch(targets, module) is not None
        except (re.error, RecursionError, OverflowError):
            return False
    return isinstance(targets, list) and any(module == t or module.endswith(f".{t}") for t in targets)


def _short_name(module: str) -> str:
    """The name PEFT matches ``module`` by: its last part, with the one before when the
    last is an index (``to_out.0``: "0" alone would select every first child)."""
    parts = module.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def config_for(weights: LoRAWeights, for_vllm: bool = False) -> dict[str, Any]:
    """An adapter_config.json that makes PEFT compute exactly ``weights.scales``.

    The stored config is kept as is when it already gives every module's rank and
    scale; otherwise ``r``/``lora_alpha`` take the most common values and
    ``rank_pattern``/``alpha_pattern`` name the exceptions.
    """
    config = dict(weights.config)
    config.setdefault("peft_type", "LORA")
    config.setdefault("bias", "none")
    if not all(_targeted(config.get("target_modules"), m) for m in weights.layer_names):
        config["target_modules"] = sorted({_short_name(m) for m in weights.layer_names})
    ranks = weights.ranks()
    if not for_vllm and all(
        module_rank_and_alpha(config, m)[0] == ranks[m]
        and math.isclose(peft_scale(config, m), weights.scales[m], rel_tol=1e-12)
        for m in weights.layer_names
    ):
        # written out, not left to PEFT's defaults (8 and 8), which a later PEFT may change
        return {"r": 8, "lora_alpha": 8, **config}
    rslora = bool(config.get("use_rslora")) and not for_vllm
    norm = (lambda r: math.sqrt(r)) if rslora else (lambda r: r)
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    alphas = {m: weights.scales[m] * norm(ranks[m]) for m in weights.layer_names}
    a0 = Counter(alphas.values()).most_common(1)[0][0]
    config.update(r=r0, lora_alpha=a0, use_rslora=rslora,
                  rank_pattern={m: r for m, r in ranks.items() if r != r0},
                  alpha_pattern={m: a for m, a in alphas.items() if a != a0})
    return config


def _for_vllm(weights: LoRAWeights) -> tuple[LoRAWeights, list[str]]:
    # vLLM applies one rank and alpha to every module and refuses modules_to_save:
    # fold each scale into B and zero-pad to the common rank, both exact.
    r = weights.rank
    a, b = {}, {}
    for m in weights.layer_names:
        am, bm = weights.lora_a[m], weights.lora_b[m]
        pad = r - am.shape[0]
        a[m] = torch.cat([am, am.new_zeros(pad, am.shape[1])]) if pad else am
        bs = (bm.double() * weights.scales[m]).to(bm.dtype)
        b[m] = torch.cat([bs, bs.new_zeros(bs.shape[0], pad)], 1) if pad else bs
    config = {k: v for k, v in weights.config.items() if k != "modules_to_save"}
    config.update(r=r, lora_alpha=r, use_rslora=False, rank_pattern={}, alpha_pattern={})
    left_out = [f"{k} (modules_to_save; vLLM refuses them)" for k in weights.extra]
    return LoRAWeights(list(weights.layer_names), a, b, {m: 1.0 for m in a}, {}, config,
                       weights.source), left_out


def outermost(names: set[str] | list[str]) -> list[str]:
    """Module names without those inside another (``classifier.dense`` is in ``classifier``):
    PEFT wraps each name of ``modules_to_save`` whole and fails on nested ones."""
    names = set(names)
    return sorted(n for n in names if not any(n.startswith(o + ".") for o in names))


def save_adapter(weights: LoRAWeights, path: str | os.PathLike, *, for_vllm: bool = False,
                 dtype: torch.dtype | None = None, overwrite: bool = True) -> list[str]:
    """Write ``weights`` as a PEFT adapter folder, atomically.

    Args:
        weights: the adapter.
        path: the folder to write; if it exists (and ``overwrite``), its adapter files are
            replaced and anything else in it is kept, as PEFT's ``save_pretrained`` does.
        for_vllm: write what vLLM accepts: one rank and alpha for all modules
            (scales folded into B, exact zero padding), no ``modules_to_save``.
        dtype: cast the factors to this dtype (default: keep each tensor's dtype).
        overwrite: refuse to replace an existing folder when False.

    Returns:
        What was left out of the file (non-empty only with ``for_vllm``).
    """
    left_out: list[str] = []
    if for_vllm:
        weights, left_out = _for_vllm(weights)
    config = config_for(weights, for_vllm=for_vllm)
    if not for_vllm and weights.extra:
        # A "<layer>.base_layer" tensor is the weight of a layer LoRA adapts (PEFT saves a
        # tied lm_head's so): PEFT restores it without modules_to_save, which would untie it.
        owners = {k.rsplit(".", 1)[0] for k in weights.extra}
        heads = set(config.get("modules_to_save") or []) | {
            o for o in owners if not o.endswith(".base_layer")}
        if heads:
            config["modules_to_save"] = outermost(heads)
    state: dict[str, torch.Tensor] = {}
    for m in weights.layer_names:
        for side, t in (("A", weights.lora_a[m]), ("B", weights.lora_b[m])):
            t = t if dtype is None else t.to(dtype)
            state[f"{DEFAULT_KEY_PREFIX}{m}.lora_{side}.weight"] = t.detach().cpu().contiguous()
    for k, t in weights.extra.items():
        state[DEFAULT_KEY_PREFIX + k] = t.detach().cpu().contiguous()
    blob = safetensors_blob(state, metadata={"format": "pt"})
    with atomic_dir(path, overwrite=overwrite, keep_others=True) as tmp:
        fsync_write(tmp / SAFETENSORS_NAME, blob)
        fsync_write(tmp / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True).encode())
    return left_out
