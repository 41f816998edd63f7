"""The subspace directory format (docs/FORMAT.md).

::

    SUB/
      manifest.json                   format version, modules, k, tasks, file names, checksums
      bases-<gen>.safetensors         every module's U, V and Grams, packed
      coords-<gen>.safetensors        every task's L_B, L_A, P, Q and errors, packed
      extras-<gen>.safetensors        every task's non-LoRA tensors (heads), packed
      .vlora.lock                     serialises writers

A save writes new generation-named data files (fsynced), then the manifest by an
atomic rename, then removes files no manifest names: a crash at any point leaves
the old subspace whole. Tensor keys use task *indices*, never task ids, and task
ids are validated: they are data, never paths. What the files hold is vlora.layout's
(version 5); this module still reads versions 1 to 4.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from filelock import FileLock, Timeout

from vlora.atomic import atomic_write, fsync_dir, fsync_write, read_regular, safetensors_blob
from vlora.errors import SubspaceError
from vlora.layout import decode, encode, fingerprint
from vlora.task import ModuleBasis, TaskProjection
from vlora.validate import dropped, flag, get_tensor, gram, number, tensor, validate_task_id

if TYPE_CHECKING:
    from vlora.subspace import SharedSubspace

FORMAT = "vlora-subspace"
# 2: a diagonal Gram is stored as its diagonal; 3: quantized tensors may name a transform;
# 4: tasks may name dropped modules (dropped_sq); 5 (vlora.layout, the only one written):
# per-task numbers packed in a few tensors, private parts, no spectra
FORMAT_VERSION = 5
READS = (1, 2, 3, 4, 5)
MANIFEST = "manifest.json"
LOCK = ".vlora.lock"
# Each task's original singular values feed only the reports' baselines (per-adapter SVD
# at equal bytes): float32 holds them to 1e-7, and they are counted in the stored bytes.
SPECTRUM_DTYPE = torch.float32
_DTYPES = ("float32", "float16", "bfloat16", "float64")
_DATA_FILE = re.compile(r"^(bases|coords|extras)-(\d{6,15})\.safetensors$")
_STALE_TMP = re.compile(r"^\.manifest\.json\..+\.tmp$")  # left by a killed atomic_write
_MAX_GEN = 10 ** 14


_LOCKS: dict[str, FileLock] = {}


def lock(path: str | os.PathLike, timeout: float = 60.0) -> FileLock:
    """The writers' lock of a subspace directory (a context manager).

    One FileLock object per directory and process, so that a command holding the lock
    around read-modify-write can call ``save`` (which takes it again) without deadlock.
    Refuses (SubspaceError, writing nothing) a directory that holds other files but no
    subspace: an adapter folder, say.
    """
    path = Path(path)
    if path.is_dir() and not (path / MANIFEST).exists():
        other = sorted(f.name for f in path.iterdir() if not (
            f.name == LOCK or _DATA_FILE.match(f.name) or _STALE_TMP.match(f.name)))
        if other:
            raise SubspaceError(f"{path}: not a vlora subspace (no {MANIFEST}; holds "
                                f"{', '.join(other[:3])}{', ...' if len(other) > 3 else ''}); "
                                "refusing to lock or write a subspace there")
    path.mkdir(parents=True, exist_ok=True)
    if (Path(path) / LOCK).is_symlink():  # older filelock versions truncate the target
        raise SubspaceError(f"{Path(path) / LOCK}: is a symbolic link; refusing to lock through "
                            "it (remove it if you trust this directory)")
    key = str((Path(path) / LOCK).resolve())
    if key not in _LOCKS:
        _LOCKS[key] = FileLock(key, timeout=timeout)
    return _LOCKS[key]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_subspace(sub: SharedSubspace, path: str | os.PathLike, force: bool = False) -> None:
    """Write ``sub`` to the directory ``path`` atomically, under its lock; unless ``force``,
    refuse to replace what another writer saved there since ``sub`` loaded or saved it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SubspaceError(f"{path}: exists and is not a directory")
    if not sub.modules:
        raise SubspaceError(f"{path}: a subspace with no modules holds no LoRA weights; "
                            "not written")
    try:
        with lock(path):
            old = _read_manifest(path) if (path / MANIFEST).exists() else None
            where = str(path.resolve())
            seen = sub._manifest_digests.get(where)
            if seen is not None and not force and (old is None or _digest(old) != seen):
                raise SubspaceError(
                    f"{path}: saved, replaced or removed by another writer since this subspace "
                    "loaded or saved it; saving would lose their changes: load it again and "
                    "redo yours, save elsewhere, or pass force=True")
            # Above every generation present, so that no file a manifest names is rewritten.
            gens = [int(m[2]) for f in path.iterdir() if (m := _DATA_FILE.match(f.name))]
            gens.append((old or {}).get("generation"))
            gen = max(g for g in (*gens, 0) if type(g) is int and 0 <= g < _MAX_GEN) + 1
            data, manifest = encode(sub)
            files = {}
            for kind, tensors in data.items():
                blob = safetensors_blob(tensors, metadata={"format": "pt"})
                name = f"{kind}-{gen:06d}.safetensors"
                (path / name).unlink(missing_ok=True)  # never write through a planted symlink
                fsync_write(path / name, blob)
                files[kind] = {"name": name, "sha256": _sha(blob), "bytes": len(blob)}
            fsync_dir(path)
            manifest = {"format": FORMAT, **manifest, "generation": gen, "files": files}
            atomic_write(path / MANIFEST, manifest_text(manifest))
            sub._manifest_digests[where] = _digest(manifest)
            for f in path.iterdir():  # old generations: no manifest names them any more
                if _DATA_FILE.match(f.name) and f.name not in {v["name"] for v in files.values()} \
                        or _STALE_TMP.match(f.name):
                    f.unlink(missing_ok=True)
    except Timeout:
        raise SubspaceError(f"{path}: locked by another writer ({path / LOCK})") from None


def manifest_text(manifest: dict[str, Any]) -> bytes:
    """The manifest as written: compact JSON, one line (its bytes count in the stored ones)."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def _digest(manifest: dict[str, Any]) -> str:
    """What a manifest says, as one digest: its generation and every file's sha256 with it."""
    return _sha(json.dumps(manifest, sort_keys=True).encode())


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(read_regular(path / MANIFEST).decode("utf-8"))
    except FileNotFoundError:
        raise SubspaceError(f"{path}: not a vlora subspace (no {MANIFEST})") from None
    except OSError as e:
        raise SubspaceError(f"{path / MANIFEST}: unreadable manifest ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, 5000-digit ints, deep nesting
        raise SubspaceError(f"{path / MANIFEST}: unreadable manifest ({str(e)[:200]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SubspaceError(f"{path / MANIFEST}: not a vlora subspace manifest")
    if manifest.get("format_version") not in READS:
        raise SubspaceError(f"{path / MANIFEST}: format version {manifest.get('format_version')}"
                            f" is not supported (this vlora reads {', '.join(map(str, READS))})")
    gen = manifest.get("generation")
    if type(gen) is not int or gen < 0:
        raise SubspaceError(f"{path / MANIFEST}: generation is {str(gen)[:40]} (an integer >= 0 expected)")
    return manifest


def _read_data(path: Path, entry: Any, verify: bool = True) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load
    if not isinstance(entry, dict) or not _DATA_FILE.match(str(entry.get("name", ""))):
        raise SubspaceError(f"{path / MANIFEST}: bad file entry {entry!r}")
    file = path / entry["name"]
    size = entry.get("bytes")
    try:
        blob = read_regular(file, size if type(size) is int else None)
    except FileNotFoundError:
        raise _Gone(f"{file}: cannot read (no such file)") from None
    except OSError as e:
        raise SubspaceError(f"{file}: cannot read ({e.strerror or e})") from None
    if verify and _sha(blob) != entry.get("sha256"):
        raise SubspaceError(f"{file}: checksum mismatch (file corrupt or edited)")
    try:
        return load(blob)
    except (SafetensorError, ValueError, RuntimeError, KeyError, TypeError, OverflowError) as e:
        raise SubspaceError(f"{file}: corrupt safetensors data ({type(e).__name__}: {e})") from None


class _Gone(SubspaceError):
    """A data file the manifest named is missing (perhaps a writer just replaced it)."""


def _quantization(x: Any, sub: SharedSubspace, path: Path) -> dict[str, Any] | None:
    """The storage format of ``sub`` as its manifest says, checked against its tensors;
    for files written before it was recorded, as its tensors say (coordinates quantized
    when any task's are, or when there is no task: vlora's compress quantizes both)."""
    first = next((b.quant["U"] for b in sub.modules.values() if b.quant), None)
    tasks = [sub.get_task(t) for t in sub.tasks]
    if x is None and first is not None:
        x = {"bits": first.bits, "method": first.method, "block": first.block,
             "coordinates": not tasks or any(t.quant for t in tasks)}
    if x is None:
        return None
    if not isinstance(x, dict) or set(x) != {"bits", "method", "block", "coordinates"} \
            or first is None or not isinstance(x["coordinates"], bool) \
            or (x["bits"], x["method"], x["block"]) != (first.bits, first.method, first.block):
        raise SubspaceError(f"{path / MANIFEST}: quantization {str(x)[:100]} disagrees with its tensors")
    return dict(x)


def load_subspace(path: str | os.PathLike, verify: bool = True) -> SharedSubspace:
    """Read a subspace directory, checking checksums and that tensors match the manifest.

    Raises SubspaceError naming the directory (or file) and the problem for anything
    missing, corrupt, inconsistent or non-finite."""
    path = Path(path)
    if not path.is_dir():
        raise SubspaceError(f"{path}: no such subspace directory")
    for attempt in range(10):
        manifest = _read_manifest(path)
        try:
            if manifest["format_version"] == FORMAT_VERSION:
                files = manifest["files"]
                data = {k: _read_data(path, files[k], verify) for k in ("bases", "coords", "extras")}
                sub = decode(manifest, data, str(path))
                sub._manifest_digests[str(path.resolve())] = _digest(manifest)
                return sub
            return _build(path, manifest, verify)
        except _Gone as e:
            # A writer may have replaced the manifest and removed the files this one named:
            # read the new manifest, unless nothing changed (then the file is really gone).
            if attempt == 9 or _read_manifest(path).get("generation") == manifest.get("generation"):
                raise SubspaceError(str(e)) from None
        except SubspaceError as e:
            if str(path) in str(e):
                raise
            raise SubspaceError(f"{path}: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, ArithmeticError,
                RuntimeError) as e:
            raise SubspaceError(f"{path}: manifest and data files disagree ({type(e).__name__}: "
                                f"{e})") from None
    raise AssertionError("unreachable")


def _build(path: Path, manifest: dict[str, Any], verify: bool) -> SharedSubspace:
    from vlora.subspace import SharedSubspace
    files = manifest["files"]
    bases = _read_data(path, files["bases"], verify)
    coords = _read_data(path, files["coords"], verify)
    extras = _read_data(path, files["extras"], verify)
    if not manifest["modules"]:
        raise SubspaceError(f"{path / MANIFEST}: no modules (a subspace of no LoRA weights)")
    modules = {}
    for m, meta in manifest["modules"].items():
        quant = meta.get("quant") or {}
        (u, qu), (v, qv) = (get_tensor(bases, f"{m}::{side}", quant.get(side)) for side in "UV")
        u, v = tensor(u, f"module {m} U"), tensor(v, f"module {m} V")
        b = ModuleBasis(u, v, gram(bases.get(f"{m}::G_u"), f"module {m} G_u", u.shape[1]),
                        gram(bases.get(f"{m}::G_v"), f"module {m} G_v", v.shape[1]),
                        {"U": qu, "V": qv} if qu is not None else None)
        if (b.d_out, b.d_in, b.k_out, b.k_in) != (meta["d_out"], meta["d_in"], meta["k_out"],
                                                  meta["k_in"]):
            raise SubspaceError(f"{path}: module {m} tensors disagree with the manifest")
        modules[m] = b
    sub = SharedSubspace(modules, weighting=manifest.get("weighting", "task"),
                         base_model=manifest.get("base_model"),
                         missing_modules=str(manifest.get("missing_modules", "error")))
    for i, meta in enumerate(manifest["tasks"]):
        tid = validate_task_id(meta["id"])
        what = f"task {tid!r}"
        if meta.get("dtype", "float32") not in _DTYPES:
            raise SubspaceError(f"{path}: {what} has dtype {meta.get('dtype')!r}")
        config = meta.get("config") or {}
        if not isinstance(config, dict) or not all(
                x is None or isinstance(x, str) for x in (meta.get("source"), meta.get("sha256"))):
            raise SubspaceError(f"{path}: {what} has a malformed config, source or sha256")
        tq, cb, ca, quant = meta.get("quant") or {}, {}, {}, {}
        for m, basis in modules.items():
            (cb[m], qb), (ca[m], qa) = (get_tensor(coords, f"{i}::{m}::{s}", tq.get(f"{m}::{s}"))
                                        for s in ("B", "A"))
            quant.update({f"{m}::B": qb, f"{m}::A": qa} if qb is not None else {})
            r = meta["ranks"][m]
            tensor(cb[m], f"{what} module {m} L_B", (basis.k_out, r))
            tensor(ca[m], f"{what} module {m} L_A", (basis.k_in, r))
        sub.add_task(TaskProjection(
            tid, cb, ca, {m: number(meta["norm_sq"][m], f"{what} norm_sq") for m in modules},
            {m: number(meta["residual_sq"][m], f"{what} residual_sq") for m in modules},
            {m: tensor(coords[f"{i}::{m}::S"], f"{what} module {m} spectrum", ndim=1).to(torch.float64)
             for m in modules}, number(meta["weight"], f"{what} weight"),
            flag(meta["error_is_bound"], f"{what} error_is_bound"),
            {k: extras[f"{i}::{k}"] for k in meta["extra_keys"]},
            dict(config), str(meta.get("dtype", "float32")),
            meta.get("source"), meta.get("sha256"), quant or None,
            # older files: unknown, so never taken out of the Grams
            meta.get("gram_share") if meta.get("gram_share") in ("original", "stored") else None,
            dropped(meta.get("dropped_sq") or {}, modules, what)))
    sub.quantization = _quantization(manifest.get("quantization"), sub, path)
    expected = fingerprint(sub)
    if manifest.get("fingerprint", expected) != expected:
        raise SubspaceError(f"{path / MANIFEST}: its fingerprint does not match its modules' "
                            "names and shapes")
    sub._manifest_digests[str(path.resolve())] = _digest(manifest)
    return sub
