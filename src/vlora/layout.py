"""Format version 5 of the subspace directory: what each file holds (docs/FORMAT.md).

``encode`` turns a subspace into the three data files' tensors and the manifest;
``decode`` reads them back, checking every value. Per-task numbers live in a few large
tensors (:mod:`vlora.packing`), per-module figures in ``(tasks, modules)`` tensors, and
the manifest keeps one copy of each distinct adapter config, so a directory's bytes are
its numbers plus a small constant per task. storage.py does the writing and locking.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import torch

from vlora.errors import SubspaceError
from vlora.packing import Packer, Quant, Unpacker
from vlora.task import ModuleBasis, TaskProjection
from vlora.validate import dropped, gram, number, stored_gram, tensor, validate_task_id

if TYPE_CHECKING:
    from vlora.subspace import SharedSubspace

VERSION = 5
_DTYPES = ("float32", "float16", "bfloat16", "float64")
_GRAM_SHARES = (None, "original", "stored")  # TaskProjection.gram_share, by its code in flags
# the fits vlora.sharing compares, in the order of the coords file's ``fit`` rows
FIT_CANDIDATES = ("shared", "private-equal", "private-pooled", "hybrid-0.5")


def fingerprint(sub: SharedSubspace) -> str:
    """Digest of module names and shapes: the base model as far as the adapters see it."""
    desc = ";".join(f"{m}:{b.d_out}x{b.d_in}" for m, b in sorted(sub.modules.items()))
    return hashlib.sha256(desc.encode()).hexdigest()[:16]


def _formats(quantization: dict[str, Any] | None) -> tuple[Quant | None, Quant | None, Quant | None]:
    """Number formats of bases, coordinates (``L_B``, ``L_A``) and private parts."""
    if not quantization:
        return None, None, None
    q = (quantization["bits"], quantization["method"], quantization["block"])
    coords = quantization["coordinates"]
    return (*q, None), (*q, "dct") if coords else None, (*q, None) if coords else None


def _coord_format(t: TaskProjection, coords: Quant | None) -> Quant | None:
    """A task's ``L_B``/``L_A`` format: the file's, or without the DCT for tasks stored
    by vlora versions that did not transform them (kept as they were rounded)."""
    codes = t.quant or {}
    first = next((codes[k] for k in codes if k.endswith("::B")), None)
    if coords is not None and first is not None and first.transform is None:
        return (*coords[:3], None)
    return coords


def encode(sub: SharedSubspace) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """``({"bases": tensors, "coords": tensors, "extras": tensors}, manifest)`` of ``sub``;
    the manifest lacks ``files`` and ``generation``, which the writer adds."""
    bfmt, cfmt, pfmt = _formats(sub.quantization)
    names = list(sub.modules)
    bases, grams, rows = Packer(), [], []
    for m, b in sub.modules.items():
        q = b.quant or {}
        bases.put(b.U, q.get("U"), bfmt, f"module {m} U")
        bases.put(b.V, q.get("V"), bfmt, f"module {m} V")
        gu, gv = stored_gram(b.G_u), stored_gram(b.G_v)
        grams += [gu.reshape(-1).double(), gv.reshape(-1).double()]
        rows.append([m, b.d_out, b.d_in, b.k_out, b.k_in, int(gu.ndim == 2), int(gv.ndim == 2)])
    tasks = [sub.get_task(t) for t in sub.tasks]
    coords, extras, configs, metas = Packer(), {}, [], []
    ranks = torch.zeros(len(tasks), len(names), 3, dtype=torch.int32)
    norm = torch.zeros(len(tasks), len(names), dtype=torch.float64)
    res = torch.zeros(len(tasks), len(names), dtype=torch.float64)
    # a fixed size, whatever the figures: a fit's bytes do not change once they are recorded
    baseline = torch.full((len(tasks), 3), -1.0, dtype=torch.float64)
    flags = torch.tensor([[int(t.error_is_bound), _GRAM_SHARES.index(t.gram_share)] for t in tasks],
                         dtype=torch.uint8).reshape(len(tasks), 2)
    for i, t in enumerate(tasks):
        if t.baseline is not None:
            baseline[i] = torch.tensor([t.baseline[k] for k in ("bytes", "error", "bits")],
                                       dtype=torch.float64)
        codes, tfmt = t.quant or {}, _coord_format(t, cfmt)
        for j, m in enumerate(names):
            what = f"task {t.task_id!r} module {m}"
            coords.put(t.coords_b[m], codes.get(f"{m}::B"), tfmt, what + " L_B")
            coords.put(t.coords_a[m], codes.get(f"{m}::A"), tfmt, what + " L_A")
            if m in t.private:
                coords.put(t.private[m][0], codes.get(f"{m}::P"), pfmt, what + " P")
                coords.put(t.private[m][1], codes.get(f"{m}::Q"), pfmt, what + " Q")
            ranks[i, j] = torch.tensor([t.coords_b[m].shape[1], t.private_ranks()[m],
                                        t.original_ranks.get(m, 0)])
            norm[i, j], res[i, j] = t.norm_sq[m], t.residual_sq[m]
        for k, x in t.extra.items():
            extras[f"{i}::{k}"] = x.detach().cpu().contiguous()
        try:
            text = json.dumps(t.config, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise SubspaceError(f"task {t.task_id!r}: its config is not JSON ({e})") from None
        if text not in configs:
            configs.append(text)
        meta = {"id": t.task_id, "config": configs.index(text), "weight": t.weight,
                "source": t.source, "sha256": t.sha256}
        optional = {"dtype": (t.dtype, "float32"), "extra_keys": (sorted(t.extra), []),
                    "dropped_sq": (t.dropped_sq, {}),
                    "transform": (None if tfmt != cfmt else "dct", "dct")}
        meta.update({k: v for k, (v, default) in optional.items() if v != default})
        metas.append(meta)
    manifest = {
        "format_version": VERSION, "base_model": sub.base_model, "weighting": sub.weighting,
        "missing_modules": sub.missing_modules, "quantization": sub.quantization,
        "fingerprint": fingerprint(sub),
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in sub.modules}),
        "modules": rows, "configs": [json.loads(c) for c in configs], "tasks": metas}
    return {"bases": {**bases.tensors(""), "grams": torch.cat(grams) if grams else
                      torch.zeros(0, dtype=torch.float64)},
            "coords": {**coords.tensors(""), "ranks": ranks, "norm_sq": norm, "residual_sq": res,
                       "baseline": baseline, "flags": flags, "fit": _fit_report(sub.fit_report)},
            "extras": extras}, manifest


def _fit_report(report: dict[str, tuple[float, float]]) -> torch.Tensor:
    """The candidates compress() compared, ``(len(FIT_CANDIDATES), 2)`` bytes and mean
    error (-1 for one not tried): a fixed size, so that recording it changes no byte count."""
    out = torch.full((len(FIT_CANDIDATES), 2), -1.0, dtype=torch.float64)
    for i, name in enumerate(FIT_CANDIDATES):
        if name in report:
            out[i] = torch.tensor(report[name], dtype=torch.float64)
    return out


def _quantization(x: Any, what: str) -> dict[str, Any] | None:
    if x is None:
        return None
    if not isinstance(x, dict) or set(x) != {"bits", "method", "block", "coordinates"} \
            or not isinstance(x["coordinates"], bool):
        raise SubspaceError(f"{what}: bad quantization {str(x)[:100]}")
    from vlora.validate import check_quant
    check_quant({"bits": x["bits"], "method": x["method"], "block": x["block"], "shape": [0, 0]},
                what)
    return dict(x)


def decode(manifest: dict[str, Any], data: dict[str, dict[str, torch.Tensor]], what: str
           ) -> SharedSubspace:
    """The subspace a version-5 manifest and its data files hold; SubspaceError (naming
    ``what``, the directory) for anything inconsistent."""
    from vlora.subspace import SharedSubspace
    quantization = _quantization(manifest.get("quantization"), what)
    bfmt, cfmt, pfmt = _formats(quantization)
    rows = manifest["modules"]
    if not isinstance(rows, list) or not rows:
        raise SubspaceError(f"{what}: no modules (a subspace of no LoRA weights)")
    bases = Unpacker(data["bases"], "", f"{what} bases")
    grams = tensor(data["bases"].get("grams"), f"{what} grams", ndim=1)
    modules, at = {}, 0
    for row in rows:
        m, d_out, d_in, k_out, k_in, full_u, full_v = row
        if not isinstance(m, str) or not all(type(x) is int and 0 <= x < 1 << 31
                                             for x in row[1:]) or not k_out <= d_out or not k_in <= d_in:
            raise SubspaceError(f"{what}: bad module entry {str(row)[:120]}")
        (u, qu), (v, qv) = bases.get((d_out, k_out), bfmt), bases.get((d_in, k_in), bfmt)
        g = []
        for k, full in ((k_out, full_u), (k_in, full_v)):
            n = k * k if full else k
            g.append(gram(grams[at:at + n].reshape(k, k) if full else grams[at:at + n],
                          f"{what} module {m} Gram", k))
            at += n
        modules[m] = ModuleBasis(u, v, g[0], g[1], {"U": qu, "V": qv} if qu is not None else None)
    bases.done()
    if len(modules) != len(rows):
        raise SubspaceError(f"{what}: a module is named twice")
    if at != grams.numel():
        raise SubspaceError(f"{what}: grams are longer than the manifest says")
    sub = SharedSubspace(modules, weighting=manifest.get("weighting", "task"),
                         base_model=manifest.get("base_model"),
                         missing_modules=str(manifest.get("missing_modules", "error")))
    sub.quantization = quantization
    names, metas, configs = list(modules), manifest["tasks"], manifest["configs"]
    coords = Unpacker(data["coords"], "", f"{what} coords")
    ranks, norm, res = (data["coords"].get(k) for k in ("ranks", "norm_sq", "residual_sq"))
    shape = (len(metas), len(names))
    if not isinstance(ranks, torch.Tensor) or ranks.dtype != torch.int32 \
            or tuple(ranks.shape) != (*shape, 3) or bool((ranks < 0).any()):
        raise SubspaceError(f"{what}: ranks disagree with the manifest")
    norm, res = (tensor(x, f"{what} {k}", shape) for x, k in ((norm, "norm_sq"), (res, "residual_sq")))
    baseline = tensor(data["coords"].get("baseline"), f"{what} baseline", (len(metas), 3))
    flags = data["coords"].get("flags")
    if not isinstance(flags, torch.Tensor) or flags.dtype != torch.uint8 \
            or tuple(flags.shape) != (len(metas), 2) or bool((flags[:, 0] > 1).any()) \
            or bool((flags[:, 1] >= len(_GRAM_SHARES)).any()):
        raise SubspaceError(f"{what}: task flags disagree with the manifest")
    if bool((norm < 0).any()) or bool((res < 0).any()):
        raise SubspaceError(f"{what}: negative norms or residuals")
    for i, meta in enumerate(metas):
        tid = validate_task_id(meta["id"])
        tw = f"{what}: task {tid!r}"
        index = meta["config"]
        config = configs[index] if type(index) is int and 0 <= index < len(configs) else None
        if not isinstance(config, dict) or meta.get("dtype", "float32") not in _DTYPES or not all(
                x is None or isinstance(x, str) for x in (meta.get("source"), meta.get("sha256"))):
            raise SubspaceError(f"{tw} has a malformed config, dtype, source or sha256")
        if meta.get("transform", "dct") not in ("dct", None):
            raise SubspaceError(f"{tw}: bad quantization metadata (transform "
                                f"{str(meta.get('transform'))[:40]!r})")
        tfmt = cfmt if meta.get("transform", "dct") == "dct" or cfmt is None else (*cfmt[:3], None)
        cb, ca, own, quant, orig = {}, {}, {}, {}, {}
        for j, m in enumerate(names):
            b = modules[m]
            r, q, orig[m] = (int(x) for x in ranks[i, j])
            (cb[m], qb), (ca[m], qa) = coords.get((b.k_out, r), tfmt), coords.get((b.k_in, r), tfmt)
            if qb is not None:
                quant[f"{m}::B"], quant[f"{m}::A"] = qb, qa
            if q:
                (p, qp), (pq, qq) = coords.get((b.d_out, q), pfmt), coords.get((b.d_in, q), pfmt)
                own[m] = (p, pq)
                if qp is not None:
                    quant[f"{m}::P"], quant[f"{m}::Q"] = qp, qq
        row = baseline[i].tolist()
        if row[0] != -1.0 and (min(row) < 0 or row[2] not in (4, 5, 6, 8, 32)):
            raise SubspaceError(f"{tw}: bad baseline {row}")
        t = TaskProjection(
            tid, cb, ca, {m: float(norm[i, j]) for j, m in enumerate(names)},
            {m: float(res[i, j]) for j, m in enumerate(names)}, {},
            number(meta["weight"], f"{tw} weight"), bool(flags[i, 0]),
            {k: data["extras"][f"{i}::{k}"] for k in meta.get("extra_keys", [])},
            dict(config), str(meta.get("dtype", "float32")), meta.get("source"),
            meta.get("sha256"), quant or None,
            _GRAM_SHARES[int(flags[i, 1])],
            dropped(meta.get("dropped_sq") or {}, modules, tw), own, orig,
            None if row[0] == -1.0 else dict(zip(("bytes", "error", "bits"), row)))
        sub._tasks[tid] = t  # as stored: add_task would round what is already rounded
    coords.done()
    fit = tensor(data["coords"].get("fit"), f"{what} fit", (len(FIT_CANDIDATES), 2))
    sub.fit_report = {n: (float(b), float(e)) for n, (b, e) in zip(FIT_CANDIDATES, fit.tolist()) if b >= 0}
    if len(sub._tasks) != len(metas):
        raise SubspaceError(f"{what}: duplicate task ids")
    if manifest.get("fingerprint", fingerprint(sub)) != fingerprint(sub):
        raise SubspaceError(f"{what}: its fingerprint does not match its modules' names and shapes")
    return sub
