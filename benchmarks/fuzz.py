"""Fuzzing vlora's readers with mutated adapter folders and subspace directories.

Every case starts from a good file (a small PEFT adapter folder, its legacy ``.bin``
twin, a real MiniLM PEFT adapter when one is at hand, a subspace directory and a
quantized one), mutates it (truncation, bit flips, safetensors header lies about
shapes, dtypes and offsets, NaN/Inf, empty tensors, config and manifest JSON edits:
wrong types, missing keys, extra or duplicate tasks, bad ranks and dtypes, path-like
names) and reads it back. The oracle accepts two outcomes only:

- a correct load: every invariant holds, the result is finite and usable (fit,
  save, read again: nothing that loads is lost on the next save);
- a :class:`vlora.VLoRAError` whose message names the file or directory at fault.

Anything else fails the case: another exception type, a case that runs past its
time limit, or an allocation beyond a fixed headroom over the process's size
(``RLIMIT_AS``, so a crafted header cannot make vlora reserve gigabytes).

The CI-bounded run is ``tests/test_fuzz.py`` (hypothesis drives the same mutators
through a ``random.Random`` it controls and shrinks). The long run is this script::

    python -m benchmarks.fuzz --cases 5000              # every target, 5000 cases each
    python -m benchmarks.fuzz --targets manifest --cases 20000 --seed 7

It prints how many cases ran per target and the outcome distribution, and exits 1
if any case failed (each failure is printed with its reproducing seed).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlora import LoRAWeights, SharedSubspace, VLoRAError, load_adapter, save_adapter
from vlora.io import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME

MANIFEST = "manifest.json"
PREFIX = "base_model.model."
MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
           "model.layers.1.self_attn.q_proj"]
ST_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64",
             "BOOL", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64"]
TORCH_DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.float32, torch.int32,
                torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2,
                torch.complex64]
# Values that break code written for the happy path.
INTERESTING = [None, True, False, 0, 1, -1, 2, 3, 4, 8, 0.5, -0.0, 1e-30, 1e12, 2 ** 31, 2 ** 63,
               10 ** 30, float("nan"), float("inf"), float("-inf"), "", "x", "4", "LORA", "../evil",
               "a/b", "/etc/passwd", "\x00", "é" * 3, [], [1], ["q_proj"], {}, {"x": 1},
               {"q_proj": 2}, [[[[]]]], "float32", "bfloat16", "int8", "float8_e4m3fn"]


class FuzzFailure(AssertionError):
    """The oracle's verdict: a case ended in something other than a load or a VLoRAError."""


class CaseTimeout(BaseException):  # BaseException: a broad ``except Exception`` cannot swallow it
    pass


# --------------------------------------------------------------------------- limits
@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise CaseTimeout in the main thread after ``seconds`` (no-op off the main thread)."""
    if seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return

    def fire(signum, frame):
        raise CaseTimeout(f"case ran past its {seconds:g} s limit")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _vm_size() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def memory_headroom(extra_bytes: int = 1 << 30) -> Iterator[None]:
    """Cap the address space at its current size plus ``extra_bytes`` (Linux), so that a
    reader that believes a header and reserves gigabytes fails instead of succeeding."""
    vm = _vm_size()
    if vm is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm + extra_bytes
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# --------------------------------------------------------------------------- seeds
def synthetic_adapter(seed: int = 0, d_out: int = 24, d_in: int = 16, r: int = 4,
                      head: bool = True, dtype: torch.dtype = torch.float32) -> LoRAWeights:
    """A small adapter in PEFT's layout: three modules, a rank pattern, an alpha pattern
    and a classifier head, so that every branch of the reader has something to read."""
    g = torch.Generator().manual_seed(seed)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
              "rank_pattern": {"layers.1.self_attn.q_proj": 2}, "alpha_pattern": {"v_proj": 3},
              "base_model_name_or_path": "fuzz/base", "task_type": "CAUSAL_LM", "bias": "none"}
    a, b, scales = {}, {}, {}
    for m in MODULES:
        rm = 2 if m == MODULES[2] else r
        a[m] = torch.randn(rm, d_in, generator=g).to(dtype)
        b[m] = torch.randn(d_out, rm, generator=g).to(dtype)
        scales[m] = (3 if "v_proj" in m else 8) / rm
    extra = {"score.weight": torch.randn(3, d_in, generator=g)} if head else {}
    return LoRAWeights(list(MODULES), a, b, scales, extra, config)


@dataclass
class Seeds:
    """The good files every case starts from (made once)."""

    root: Path
    adapter: Path
    adapter_bin: Path
    subspace: Path
    subspace_quant: Path
    minilm: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def make_seeds(root: str | os.PathLike, minilm: str | os.PathLike | None = None) -> Seeds:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    adapter = synthetic_adapter(0)
    save_adapter(adapter, root / "adapter")
    bin_dir = root / "adapter_bin"
    bin_dir.mkdir(exist_ok=True)
    shutil.copy(root / "adapter" / CONFIG_NAME, bin_dir / CONFIG_NAME)
    state = {f"{PREFIX}{m}.lora_{s}.weight": t for m in MODULES
             for s, t in (("A", adapter.lora_a[m]), ("B", adapter.lora_b[m]))}
    state.update({PREFIX + k: v for k, v in adapter.extra.items()})
    torch.save(state, bin_dir / BIN_NAME)
    ads = [synthetic_adapter(i, head=i == 1) for i in range(4)]
    sub = SharedSubspace.from_adapters(ads, task_ids=[f"task{i}" for i in range(4)],
                                       num_components=3)
    sub.save(root / "subspace")
    sub.quantize(bits=4, method="nf4", coordinates=True)
    sub.save(root / "subspace_quant")
    return Seeds(root, root / "adapter", bin_dir, root / "subspace", root / "subspace_quant",
                 None if minilm is None else Path(minilm))


# --------------------------------------------------------------------------- mutators
def random_json(rnd: random.Random, depth: int = 0) -> Any:
    """A JSON value: mostly interesting scalars, sometimes small containers."""
    roll = rnd.random()
    if depth > 2 or roll < 0.6:
        return copy.deepcopy(rnd.choice(INTERESTING))
    if roll < 0.7:
        return rnd.randint(-(2 ** 64), 2 ** 64)
    if roll < 0.8:
        return [random_json(rnd, depth + 1) for _ in range(rnd.randint(0, 3))]
    return {rnd.choice(["r", "x", "q_proj", "", "../a", "0"]): random_json(rnd, depth + 1)
            for _ in range(rnd.randint(0, 3))}


def mutate_bytes(rnd: random.Random, blob: bytes) -> bytes:
    """Truncation, bit flips, overwritten / inserted / deleted spans, a lying length word."""
    b = bytearray(blob)
    op = rnd.choice(["truncate", "flip", "flip", "span", "insert", "delete", "length"])
    if op == "truncate" or not b:
        return bytes(b[: rnd.randint(0, max(len(b) - 1, 0))])
    if op == "flip":
        for _ in range(rnd.randint(1, 8)):
            i = rnd.randrange(len(b))
            b[i] ^= 1 << rnd.randrange(8)
    elif op == "span":
        i = rnd.randrange(len(b))
        n = rnd.randint(1, 64)
        fill = rnd.choice([b"\x00", b"\xff", bytes([rnd.randrange(256)]), None])
        b[i:i + n] = fill * n if fill else bytes(rnd.randrange(256) for _ in range(n))
    elif op == "insert":
        i = rnd.randrange(len(b) + 1)
        b[i:i] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 32)))
    elif op == "delete":
        i = rnd.randrange(len(b))
        del b[i:i + rnd.randint(1, 64)]
    else:  # the little-endian u64 header length of a safetensors file
        n = struct.unpack("<Q", bytes(b[:8]).ljust(8, b"\0"))[0] if len(b) >= 8 else 0
        value = rnd.choice([0, 1, 7, n - 1, n + 1, len(b), len(b) - 8, 100_000_000, 2 ** 31,
                            2 ** 63, 2 ** 64 - 1])
        b[:8] = struct.pack("<Q", value % 2 ** 64)
    return bytes(b)


def _split_st(blob: bytes) -> tuple[dict[str, Any], bytes]:
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _join_st(header: Any, data: bytes, rnd: random.Random) -> bytes:
    text = json.dumps(header).encode()
    if rnd.random() < 0.1:
        text += b" " * rnd.randint(1, 7)  # padding the format allows
    n = len(text) if rnd.random() < 0.9 else rnd.choice([len(text) + 1, len(text) - 1, 0])
    return struct.pack("<Q", max(n, 0)) + text + data


def mutate_st_header(rnd: random.Random, blob: bytes) -> bytes:
    """Lie in the safetensors header JSON about shapes, dtypes, offsets, names, metadata."""
    header, data = _split_st(blob)
    names = [k for k in header if k != "__metadata__"]
    key = rnd.choice(names)
    entry = header[key]
    op = rnd.choice(["shape", "shape", "dtype", "dtype", "offsets", "drop", "rename", "meta",
                     "add", "whole"])
    if op == "shape":
        d0, d1 = (entry["shape"] + [1, 1])[:2]
        entry["shape"] = rnd.choice([[], [0], [0, d1], [d0, 0], [d1, d0], [d0 + 1, d1], [d0, d1, 1],
                                     [d0 * d1], [2 ** 31, 2 ** 31], [2 ** 62, 4], [-1, d1],
                                     [10 ** 12], "x", None, [d0, "1"]])
    elif op == "dtype":
        entry["dtype"] = rnd.choice(ST_DTYPES + ["F33", "", 5, None, "f32"])
    elif op == "offsets":
        s, e = entry["data_offsets"]
        entry["data_offsets"] = rnd.choice([[e, s], [s, e + 4], [s + 4, e], [0, len(data)],
                                            [s, 2 ** 40], [-4, e], [s], [s, e, 0], "0"])
    elif op == "drop":
        del header[key]
    elif op == "rename":
        new = rnd.choice([f"{PREFIX}../../evil.lora_A.weight", f"{PREFIX}a/b.lora_B.weight",
                          key.replace("lora_A", "lora_B"), key.replace("lora_B", "lora_A"),
                          key.replace(".weight", ".default.weight"),
                          key.replace(".weight", ".other.weight"),
                          key.replace("lora_A", "lora_embedding_A"),
                          key.replace("lora_A", "lora_magnitude_vector"),
                          key.replace(PREFIX, ""), "x" * 10_000 + ".lora_A.weight", "", "é.lora_A.weight",
                          "/abs/path.lora_A.weight"])
        header[new] = header.pop(key)
    elif op == "meta":
        header["__metadata__"] = random_json(rnd)
    elif op == "add":
        header[rnd.choice([f"{PREFIX}extra.weight", f"{PREFIX}{MODULES[0]}.lora_A.weight2"])] = \
            {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    else:
        header = random_json(rnd)
    return _join_st(header, data, rnd)


def mutate_tensors(rnd: random.Random, blob: bytes) -> bytes:
    """A well-formed safetensors file whose content lies: NaN/Inf, empty, wrong dtype,
    rank or shape, swapped or missing factors, tiny or huge values."""
    from safetensors.torch import load, save
    tensors = load(blob)
    names = sorted(tensors)
    key = rnd.choice(names)
    t = tensors[key]
    op = rnd.choice(["nan", "inf", "empty", "dtype", "dtype", "reshape", "transpose", "drop",
                     "swap", "scale", "dup_adapter", "extra"])
    if op in ("nan", "inf"):
        t = t.clone().float()
        t.view(-1)[rnd.randrange(max(t.numel(), 1))] = float("nan") if op == "nan" else float("inf")
        tensors[key] = t
    elif op == "empty":
        shape = list(t.shape) or [0]
        shape[rnd.randrange(len(shape))] = 0
        tensors[key] = torch.zeros(shape)
    elif op == "dtype":
        dt = rnd.choice(TORCH_DTYPES)
        tensors[key] = t.to(dt) if dt != torch.bool else t > 0
    elif op == "reshape":
        tensors[key] = t.reshape(rnd.choice([(-1,), (1, *t.shape), (*t.shape, 1)])).contiguous()
    elif op == "transpose" and t.ndim == 2:
        tensors[key] = t.T.contiguous()
    elif op == "drop" and len(names) > 1:
        del tensors[key]
    elif op == "swap" and "lora_A" in key and key.replace("lora_A", "lora_B") in tensors:
        other = key.replace("lora_A", "lora_B")
        tensors[key], tensors[other] = tensors[other], tensors[key]
    elif op == "scale":
        tensors[key] = t.double() * rnd.choice([0.0, 1e-30, 1e-300, 1e30, 1e300, -1.0])
    elif op == "dup_adapter":
        tensors[key.replace(".weight", ".other.weight")] = t.clone()
    else:
        tensors[rnd.choice(["x", f"{PREFIX}x.lora_A.weight", f"{PREFIX}head.weight"])] = torch.ones(2, 2)
    return save(tensors)


def _interesting_for(key: str, rnd: random.Random) -> Any:
    table = {
        "r": [-1, 0, 1e12, 10 ** 400, 4.5, "4", True, None, float("nan"), float("inf"), 2 ** 63, 3],
        "lora_alpha": ["x", -8, 0, float("inf"), float("nan"), 1e300, 1e-300, [8], None],
        "rank_pattern": [[], "q_proj", {"q_proj": 0}, {"q_proj": "2"}, {"q_proj": float("inf")},
                         {"(": 2}, {"(a+)+$": 2}, {"[a.]*[a.]*[a.]*x": 2}, {"q_proj": 10 ** 400},
                         {"q_proj": 2.5}, {"": 2}, {"v_proj": 4}, {5: 2}, None],
        "alpha_pattern": [{"v_proj": float("inf")}, {"v_proj": 0}, {"v_proj": "x"}, {")": 1}, []],
        "target_modules": [5, None, "q_proj", [5], {}, "all-linear", [["q"]]],
        "modules_to_save": [5, "score", ["score"], [1], {}, None],
        "use_rslora": ["false", 1, None, True, [], {}],
        "peft_type": ["LOHA", 5, None, "lora", "", ["LORA"]],
        "bias": ["all", "none", None, 5, []],
        "use_dora": [True, 1, "yes", False],
        "base_model_name_or_path": [5, None, ["x"], "../../x", {}],
        "fan_in_fan_out": ["yes", 1, None, True],
    }
    return copy.deepcopy(rnd.choice(table[key])) if key in table and rnd.random() < 0.7 \
        else random_json(rnd)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _get_in(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def mutate_json_tree(rnd: random.Random, obj: Any) -> Any:
    """Replace, delete or add one node anywhere in a JSON tree."""
    obj = copy.deepcopy(obj)
    paths = _paths(obj)
    path = rnd.choice(paths)
    if not path:
        return random_json(rnd) if rnd.random() < 0.2 else obj
    parent, last = _get_in(obj, path[:-1]), path[-1]
    op = rnd.choice(["replace", "replace", "replace", "delete", "add"])
    if op == "replace":
        parent[last] = _interesting_for(str(last), rnd)
    elif op == "delete":
        del parent[last]
    elif isinstance(parent, dict):
        parent[rnd.choice(["zz", "r", "rank_pattern", "id", "tasks", "files"])] = random_json(rnd)
    else:
        parent.append(copy.deepcopy(parent[last]))
    return obj


def mutate_json_text(rnd: random.Random, text: bytes) -> bytes:
    """Byte-level JSON damage and the pathological documents json.loads chokes on."""
    op = rnd.choice(["bytes", "deep", "bigint", "nan", "utf", "empty"])
    if op == "bytes":
        return mutate_bytes(rnd, text)
    if op == "deep":
        return b"[" * 100_000 + b"]" * 100_000
    if op == "bigint":
        return text.replace(b'"r": 4', b'"r": ' + b"9" * 5000, 1) if b'"r": 4' in text \
            else b'{"x": ' + b"1" * 5000 + b"}"
    if op == "nan":
        return text.replace(b": 8", b": NaN", 1).replace(b": 3,", b": Infinity,", 1)
    if op == "utf":
        return b"\xff\xfe" + text
    return b""


def config_mutation(rnd: random.Random, config: dict[str, Any]) -> dict[str, Any]:
    config = copy.deepcopy(config)
    for _ in range(rnd.randint(1, 3)):
        key = rnd.choice(["r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules",
                          "modules_to_save", "use_rslora", "peft_type", "bias", "use_dora",
                          "base_model_name_or_path", "fan_in_fan_out", "zz_unknown"])
        if rnd.random() < 0.15:
            config.pop(key, None)
        else:
            config[key] = _interesting_for(key, rnd)
    return config


def manifest_mutation(rnd: random.Random, manifest: dict[str, Any]) -> dict[str, Any]:
    """Structured edits of a subspace manifest, besides the generic tree edits."""
    m = copy.deepcopy(manifest)
    tasks, rows = m["tasks"], m["modules"]  # version 5: rows [name, d_out, d_in, k_out, k_in, ...]
    op = rnd.choice(["tree", "tree", "tree", "extra_task", "dup_task", "task_id", "config", "dtype",
                     "file_name", "generation", "quant", "module_meta", "module_name", "numbers",
                     "drop_task", "reorder"])
    if op == "tree":
        return mutate_json_tree(rnd, m)
    t = rnd.choice(tasks)
    if op == "extra_task":
        new = copy.deepcopy(t)
        new["id"] = "extra"
        tasks.append(new)
    elif op == "dup_task":
        tasks.append(copy.deepcopy(t))
    elif op == "task_id":
        t["id"] = rnd.choice(["../evil", "a/b", "", ".", "..", "x" * 300, "\x00", 5, None, "ok-id",
                              "/abs", "..\\evil"])
    elif op == "config":
        t["config"] = rnd.choice([-1, 99, "0", None, 1.5, True, [0]])
    elif op == "dtype":
        t["dtype"] = rnd.choice(["int8", "float8_e4m3fn", "", "torch.float32", None, 5, "complex64",
                                 "bfloat16", "float64", "__class__"])
    elif op == "file_name":
        kind = rnd.choice(["bases", "coords", "extras"])
        m["files"][kind]["name"] = rnd.choice(["../bases-000001.safetensors", "/etc/passwd",
                                               "bases-000009.safetensors", "manifest.json", "",
                                               f"{kind}-1.safetensors", "coords-000001.safetensors",
                                               5, None])
    elif op == "generation":
        m["generation"] = rnd.choice([-5, 0, 10 ** 7, 999_999, "x", 1.5, None, True, 2 ** 70, [1]])
    elif op == "quant":
        q = m["quantization"] or {"bits": 8, "method": "symmetric", "block": 64, "coordinates": True}
        key = rnd.choice(["bits", "method", "block", "coordinates"])
        q[key] = rnd.choice({"bits": [3, 0, 16, "4", None, -8, 4, 8], "method": ["x", "nf4", None, 5],
                             "block": [0, -64, 1, 10 ** 9, "64", None, 2 ** 40, 32],
                             "coordinates": [None, "yes", 1, False]}[key])
        m["quantization"] = q
        t["transform"] = rnd.choice(["dct", None, "hadamard", 5])
    elif op == "module_meta":
        row = rnd.choice(rows)
        row[rnd.randrange(1, len(row))] = rnd.choice([0, -1, 10 ** 9, "3", None, 2])
    elif op == "module_name":
        row = rnd.choice(rows)
        row[0] = rnd.choice(["../../evil", "a/b", "", "x::U", str(row[0]) + "/", 5])
    elif op == "numbers":
        value = rnd.choice([float("nan"), float("inf"), -1.0, 10 ** 400, "x", None, 1e308])
        if rnd.random() < 0.5:
            t["weight"] = value
        else:
            t["dropped_sq"] = {"not.a.module": value}
    elif op == "drop_task":
        tasks.remove(t)
    else:
        rnd.shuffle(tasks)
    return m


# --------------------------------------------------------------------------- oracles
def _problem_key(e: BaseException, where: str) -> str:
    """A short label of the problem for the outcome table: class and first words, with
    the path, module and task names, numbers and quoted values taken out."""
    msg = str(e).replace(where, "").lstrip(" :/")
    msg = re.sub(r"(module|task|tensor|key|keys) \S+", r"\1 *", msg)
    msg = re.sub(r"'[^']*'|\"[^\"]*\"|\(.*|\{.*|\[.*|\d+", "", msg)
    words = [w for w in msg.replace(":", " ").split() if w.isascii() and w.isprintable()]
    return f"{type(e).__name__}: {' '.join(words[:7])}"


def _expect_vlora_error(e: BaseException, names: list[str]) -> None:
    if not isinstance(e, VLoRAError):
        raise FuzzFailure(f"{type(e).__name__} escaped (not a VLoRAError): {e}") from e
    text = str(e)
    if not any(n in text for n in names):
        raise FuzzFailure(f"message does not name the file: {text!r} (expected one of {names})")
    if any(w in text for w in ("can't allocate memory", "MemoryError", "out of memory")):
        raise FuzzFailure(f"allocation failure surfaced as an error: {text!r}")


def _check_finite(t: torch.Tensor, what: str) -> None:
    if t.numel() and not bool(torch.isfinite(t.to(torch.float64)).all()):
        raise FuzzFailure(f"{what} is not finite after a successful load")


def check_adapter(folder: Path, out: Path) -> str:
    """Oracle for an adapter folder: load it, and if it loads, fit it, save and re-read it."""
    try:
        ad = load_adapter(folder)
    except Exception as e:  # noqa: BLE001 - judged by the oracle
        _expect_vlora_error(e, [str(folder)])
        return _problem_key(e, str(folder))
    for m in ad.layer_names:
        a, b = ad.lora_a[m], ad.lora_b[m]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or not a.is_floating_point():
            raise FuzzFailure(f"module {m}: loaded factors {tuple(a.shape)} {tuple(b.shape)} {a.dtype}")
        _check_finite(a, f"{m} lora_A")
        _check_finite(b, f"{m} lora_B")
        if not (math.isfinite(ad.scales[m]) and ad.scales[m] > 0):
            raise FuzzFailure(f"module {m}: scale {ad.scales[m]}")
    # A loaded adapter must survive everything a user does next: fit, save, read, export.
    try:
        sub = SharedSubspace.from_adapters([ad], task_ids=["t"])
    except VLoRAError as e:
        return "loaded; refused by fit: " + _problem_key(e, str(folder))
    err = sub.task_error("t")
    if not (math.isfinite(err) and 0 <= err <= 1 + 1e-6):
        raise FuzzFailure(f"fit of a loaded adapter gives error {err}")
    sub.save(out / "sub")
    back = SharedSubspace.load(out / "sub")
    if back.tasks != ["t"] or back.task_error("t") != err:
        raise FuzzFailure("saved task did not come back")
    lora = back.reconstruct("t")
    for m in lora.layer_names:
        _check_finite(lora.lora_a[m], f"reconstructed {m}")
    save_adapter(ad, out / "copy")
    again = load_adapter(out / "copy")
    for m in ad.layer_names:
        if not torch.equal(again.lora_a[m], ad.lora_a[m]) or not torch.equal(again.lora_b[m], ad.lora_b[m]):
            raise FuzzFailure(f"module {m} changed in a save/load round trip")
    return "loaded"


def check_subspace(path: Path) -> str:
    """Oracle for a subspace directory: load it, and if it loads, every task must
    reconstruct finitely, and a save in place must keep every task."""
    try:
        sub = SharedSubspace.load(path)
    except Exception as e:  # noqa: BLE001 - judged by the oracle
        _expect_vlora_error(e, [str(path)])
        return _problem_key(e, str(path))
    for m, b in sub.modules.items():
        if b.U.shape[0] != b.d_out or b.G_u.shape != (b.k_out, b.k_out) or b.G_v.shape != (b.k_in, b.k_in):
            raise FuzzFailure(f"module {m}: inconsistent basis shapes after load")
        for name, t in (("U", b.U), ("V", b.V), ("G_u", b.G_u), ("G_v", b.G_v)):
            _check_finite(t, f"module {m} {name}")
    stored = [b.U for b in sub.modules.values()] + [b.V for b in sub.modules.values()]
    for tid in sub.tasks:
        t = sub.get_task(tid)
        if not (math.isfinite(t.error) and t.error >= 0 and math.isfinite(t.weight) and t.weight >= 0):
            raise FuzzFailure(f"task {tid!r}: error {t.error}, weight {t.weight} after load")
        stored += list(t.coords_b.values()) + list(t.coords_a.values())
    # Finite but astronomical numbers (a consistent, re-checksummed lie) may overflow on
    # the way out: SECURITY.md does not promise sane outputs for them. Below 1e15,
    # float32 reconstructions cannot overflow and must be finite.
    sane = max((float(x.abs().max()) for x in stored if x.numel()), default=0.0) < 1e15
    for tid in sub.tasks:
        lora = sub.reconstruct(tid, dtype=torch.float32)
        for m in lora.layer_names:
            if sane:
                _check_finite(lora.lora_b[m], f"task {tid!r} reconstructed {m}")
    before = {tid: sub.get_task(tid) for tid in sub.tasks}
    try:
        sub.save(path)
    except Exception as e:  # noqa: BLE001
        raise FuzzFailure(f"a subspace that loads cannot be saved in place: {type(e).__name__}: {e}") from e
    back = SharedSubspace.load(path)
    if back.tasks != list(before):
        raise FuzzFailure(f"tasks changed in a save in place: {list(before)} -> {back.tasks}")
    for tid, t in before.items():
        for m in t.coords_b:
            if not torch.equal(back.get_task(tid).coords_b[m], t.coords_b[m]):
                raise FuzzFailure(f"task {tid!r} module {m} changed in a save in place")
    return "loaded"


# --------------------------------------------------------------------------- targets
def _fresh(src: Path, case: Path) -> Path:
    if case.exists():
        shutil.rmtree(case)
    shutil.copytree(src, case / "in")
    (case / "out").mkdir()
    return case / "in"


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def target_adapter_bytes(rnd: random.Random, seeds: Seeds, case: Path) -> str:
    folder = _fresh(seeds.adapter, case)
    f = folder / SAFETENSORS_NAME
    _write(f, mutate_bytes(rnd, f.read_bytes()))
    return check_adapter(folder, case / "out")


def target_adapter_header(rnd: random.Random, seeds: Seeds, case: Path) -> str:
    folder = _fresh(seeds.adapter, case)
    f = folder / SAFETENSORS_NAME
    _write(f, mutate_st_header(rnd, f.read_bytes()))
    return check_adapter(folder, case / "out")


def target_adapter_tensors(rnd: random.Random, seeds: Seeds, case: Path) -> str:
    folder = _fresh(seeds.adapter, case)
    f = folder / SAFETENSORS_NAME
    _write(f, mutate_tensors(rnd, f.read_bytes()))
    return check_adapter(folder, case / "out")


def target_adapter_config(rnd: random.Random, seeds: Seeds, case: Path) -> str:
    folder = _fresh(seeds.adapter, case)
    f = folder / CONFIG_NAME
    if rnd.random() < 0.25:
        _write(f, mutate_json_text(rnd, f.read_bytes()))
    else:
        _write(f, json.dumps(config_mutation(rnd, json.loads(f.read_bytes()))).encode())
    return check_adapter(folder, case / "out")


def target_adapter_bin(rnd: random.Random, seeds: Seeds, case: Path) -> str:
    folder = _fresh(seeds.adapter_bin, case)
    f = folder / BIN_NAME
    blob = f.read_bytes()
    if rnd.random() < 0.5:
        blob = mutate_bytes(rnd, blob)
    else:  # mutate the pickle or a record inside the zip, keeping the zip valid
        zin = zipfile.ZipFile(io.BytesIO(blob))
        names = zin.namelist()
        victim = rnd.choice([n for n in names if n.endswith("data.pkl")] * 3 + names)
        out = io.BytesIO()
        mode = zipfile.ZIP_DEFLATED if rnd.random() < 0.1 else zipfile.ZIP_STORED
        with zipfile.ZipFile(out, "w", mode) as zo:
            for n in names:
                data = zin.read(n)
                zo.writestr(n, mutate_bytes(rnd, data) if n == victim else data)
        blob = out.getvalue()
    _write(f, blob)
    return check_adapter(folder, case / "out")


def target_minilm(rnd: random.Random, seeds: Seeds, case: Path) -> str:
    if seeds.minilm is None:
        return "skipped (no MiniLM adapter)"
    folder = _fresh(seeds.minilm, case)
    f = folder / SAFETENSORS_NAME
    mut = rnd.choice([mutate_bytes, mutate_st_header, mutate_tensors])
    _write(f, mut(rnd, f.read_bytes()))
    return check_adapter(folder, case / "out")


def _fix_checksum(path: Path, kind: str) -> None:
    import hashlib
    manifest = json.loads((path / MANIFEST).read_text())
    blob = (path / manifest["files"][kind]["name"]).read_bytes()
    manifest["files"][kind].update(sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob))
    (path / MANIFEST).write_text(json.dumps(manifest))


def target_subspace_data(rnd: random.Random, seeds: Seeds, case: Path) -> str:
    path = _fresh(rnd.choice([seeds.subspace, seeds.subspace_quant]), case)
    kind = rnd.choice(["bases", "coords", "extras"])
    manifest = json.loads((path / MANIFEST).read_text())
    f = path / manifest["files"][kind]["name"]
    mut = rnd.choice([mutate_bytes, mutate_st_header, mutate_tensors, mutate_tensors])
    _write(f, mut(rnd, f.read_bytes()))
    if rnd.random() < 0.85:  # a consistent lie: the parser, not the checksum, must catch it
        _fix_checksum(path, kind)
    return check_subspace(path)


def target_manifest(rnd: random.Random, seeds: Seeds, case: Path) -> str:
    path = _fresh(rnd.choice([seeds.subspace, seeds.subspace, seeds.subspace_quant]), case)
    f = path / MANIFEST
    if rnd.random() < 0.15:
        _write(f, mutate_json_text(rnd, f.read_bytes()))
    else:
        _write(f, json.dumps(manifest_mutation(rnd, json.loads(f.read_bytes()))).encode())
    return check_subspace(path)


TARGETS: dict[str, Callable[[random.Random, Seeds, Path], str]] = {
    "adapter_bytes": target_adapter_bytes, "adapter_header": target_adapter_header,
    "adapter_tensors": target_adapter_tensors, "adapter_config": target_adapter_config,
    "adapter_bin": target_adapter_bin, "minilm": target_minilm,
    "subspace_data": target_subspace_data, "manifest": target_manifest,
}


def run_case(target: str, rnd: random.Random, seeds: Seeds, case: Path,
             seconds: float = 10.0, headroom: int = 1 << 30) -> str:
    """One case under a time limit and an address-space cap; FuzzFailure on a bad outcome."""
    try:
        with memory_headroom(headroom), time_limit(seconds), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown config keys: a warning, not an outcome
            return TARGETS[target](rnd, seeds, case)
    except CaseTimeout as e:
        raise FuzzFailure(f"hang: {e}") from None


# --------------------------------------------------------------------------- CLI
def _minilm_adapter(root: Path) -> Path | None:
    """A real PEFT LoRA of MiniLM, when transformers, peft and the model are installed."""
    try:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging

        from vlora.testbed.models import minilm_path
        logging.set_verbosity_error()
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(str(minilm_path()), num_labels=3)
        peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                      target_modules=["query", "value"],
                                                      init_lora_weights=False))
        peft_model.save_pretrained(str(root / "minilm"))
        return root / "minilm"
    except Exception as e:  # noqa: BLE001 - optional seed
        print(f"(no MiniLM adapter: {type(e).__name__}: {e})", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=1000, help="cases per target")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--targets", nargs="*", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--time-limit", type=float, default=10.0, help="seconds per case")
    p.add_argument("--headroom-mb", type=int, default=1024, help="address space allowed per case")
    p.add_argument("--json", type=Path, help="write the counts here")
    p.add_argument("--no-minilm", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="vlora-fuzz-") as tmp:
        root = Path(tmp)
        minilm = None if args.no_minilm or "minilm" not in args.targets else _minilm_adapter(root)
        seeds = make_seeds(root / "seeds", minilm)
        outcomes: dict[str, Counter] = {t: Counter() for t in args.targets}
        failures: list[dict[str, Any]] = []
        t0 = time.time()
        for target in args.targets:
            t1 = time.time()
            for i in range(args.cases):
                rnd = random.Random(f"{args.seed}:{target}:{i}")
                try:
                    outcome = run_case(target, rnd, seeds, root / "case", args.time_limit,
                                       args.headroom_mb << 20)
                except Exception as e:  # noqa: BLE001 - FuzzFailure or a bug in the mutator
                    outcome = "FAILED"
                    failures.append({"target": target, "case": i, "seed": args.seed,
                                     "error": f"{type(e).__name__}: {e}",
                                     "trace": traceback.format_exc(limit=-4)})
                outcomes[target][outcome] += 1
            print(f"{target}: {args.cases} cases in {time.time() - t1:.1f} s", flush=True)
        total = sum(sum(c.values()) for c in outcomes.values())
        print(f"\n{total} cases, {len(failures)} failed, {time.time() - t0:.1f} s\n")
        for target, counts in outcomes.items():
            print(f"{target} ({sum(counts.values())} cases)")
            for outcome, n in counts.most_common():
                print(f"  {n:6d}  {outcome}")
        for f in failures[:50]:
            print(f"\nFAILED {f['target']} case {f['case']} (--seed {f['seed']}): {f['error']}\n{f['trace']}")
        if args.json:
            args.json.write_text(json.dumps({"cases": total, "failures": failures,
                                             "outcomes": {t: dict(c) for t, c in outcomes.items()}},
                                            indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
