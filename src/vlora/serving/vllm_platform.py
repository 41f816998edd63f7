"""An opt-in vLLM CPU platform whose LoRA runs one matmul per adapter, not per token.

vLLM's CPU LoRA path (``vllm/lora/punica_wrapper/punica_cpu.py`` over
``vllm/lora/ops/torch_ops/lora_ops.py``) gathers each token's adapter weights
(``lora_b_weights[lora_indices_tensor]``): a prefill of T tokens copies T x rank x d
floats per module and slice before its einsum. :class:`GroupedPunicaWrapper` groups the
tokens by adapter slot instead and runs ``x_g @ A_slot^T @ B_slot^T`` once per distinct
adapter in the batch, on the stacked weights vLLM already holds (no copy of them), and at
each adapter's own rank where vLLM zero-pads it to ``max_lora_rank``.

vLLM lets a platform choose the punica wrapper (``Platform.get_punica_wrapper``), and a
platform comes from the ``vllm.platform_plugins`` entry point. Only one out-of-tree
platform may be active, so this one is OFF unless ``VLORA_VLLM_PLATFORM=1``:
:func:`platform_plugin` returns None otherwise and vLLM picks its own CPU platform as if
vlora were not installed. Enabled, the platform is vLLM's CPU platform (the Zen one where
vLLM would pick that) with only the wrapper changed. ``VLLM_TARGET_DEVICE=cpu`` makes vLLM
skip platform plugins altogether (``vllm/platforms/__init__.py``,
``resolve_current_platform_cls_qualname``); vLLM logs ``Using GroupedPunicaWrapper.`` when
this wrapper is in use.

Semantics are PunicaWrapperCPU's (shrink overwrites the first ``rank`` columns of its
buffer, scaled; expand adds each slice at its offset; float32 buffers), with one
difference: a token mapped to no adapter (index -1) gets no LoRA. PunicaWrapperCPU
indexes the stacked weights with -1 too, which is the *last* slot, so a base-model
request batched with LoRA requests gets the last slot's adapter applied whenever that
slot holds one (vLLM's GPU kernels skip -1, as this wrapper does).

Nothing here imports vLLM at module level: the classes are built on first access
(module ``__getattr__``), which only vLLM's processes do.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

ENV = "VLORA_VLLM_PLATFORM"
_BUILT: dict[str, type] = {}


def platform_plugin() -> str | None:
    """vLLM's ``vllm.platform_plugins`` hook: this module's platform where ``$VLORA_VLLM_PLATFORM``
    is 1 and vLLM is a CPU build, else None (vLLM's own platform)."""
    if os.environ.get(ENV, "") != "1":
        return None
    from vllm.platforms import cpu_platform_plugin

    if cpu_platform_plugin() is None:
        logger.warning("%s=1 but this vLLM is not a CPU build: vlora's platform not used", ENV)
        return None
    return f"{__name__}.VLoRACpuPlatform"


def lora_groups(indices) -> list[tuple[int, object]]:
    """``[(slot, rows)]``: the rows of ``indices`` (a 1-d tensor of adapter slots, -1 for
    none) that use each slot, in order of first use; ``rows`` is a ``slice`` where they are
    contiguous (no copy needed), else a LongTensor. Slot -1 is left out."""
    import torch

    slots, counts = torch.unique_consecutive(indices.cpu(), return_counts=True)
    runs: dict[int, list[tuple[int, int]]] = {}
    start = 0
    for s, n in zip(slots.tolist(), counts.tolist()):
        if s >= 0:
            runs.setdefault(s, []).append((start, start + n))
        start += n
    out = []
    for s, spans in runs.items():
        if len(spans) == 1:
            out.append((s, slice(*spans[0])))
        else:
            rows = torch.cat([torch.arange(a, b) for a, b in spans]).to(indices.device)
            out.append((s, rows))
    return out


def _weight(stacked, slot: int):
    """One slot's ``(rows, cols)`` matrix of a stacked LoRA tensor (``[slots, 1, r, c]`` or
    ``[slots, r, c]``)."""
    w = stacked[slot]
    return w[0] if w.dim() == 3 else w


def _add_rows(y, rows, cols: slice, out) -> None:
    """``y[rows, cols] += out`` in place (``rows`` a slice or an index tensor)."""
    if isinstance(rows, slice):
        y[rows, cols] += out
    else:
        y[:, cols].index_add_(0, rows, out)


def _set_rows(y, rows, cols: slice, out) -> None:
    """``y[rows, cols] = out`` in place."""
    y[rows, cols] = out


def _take(x, rows):
    return x[rows]


def _build_wrapper():
    import torch
    from vllm.logger import init_logger
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    vllm_logger = init_logger("vllm.vlora_platform")  # under "vllm": vLLM's log handlers

    class GroupedPunicaWrapper(PunicaWrapperCPU):
        """PunicaWrapperCPU with the per-token weight gathers replaced by one matmul per
        distinct adapter slot in the batch (groups computed once per step)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._token_groups: list = []
            self._sampler_groups: list = []
            self._ranks: dict = {}  # id(lora_a stack) -> (stacks, versions, {slot: rank})

        def _rank(self, a, b, slot: int) -> int:
            """The rank that slot's product ``B A`` uses within the zero-padded stacks: rows
            of A or columns of B past the last ones that are both non-zero add nothing.
            Cached until vLLM writes either stack (set_lora / reset_lora bump its version
            counter); the padded rank where the stacks keep no version counter."""
            try:
                versions = (a._version, b._version)
            except RuntimeError:  # inference tensors: nothing tells when a slot is rewritten
                vllm_logger.info_once("GroupedPunicaWrapper: stacks without version counters, "
                                      "zero-padded rank not skipped")
                return a.shape[-2]
            vllm_logger.info_once("GroupedPunicaWrapper: zero-padded rank skipped")
            hit = self._ranks.get(id(a))
            if hit is None or hit[0][0] is not a or hit[0][1] is not b or hit[1] != versions:
                hit = self._ranks[id(a)] = ((a, b), versions, {})
            if slot not in hit[2]:
                used = _weight(a, slot).ne(0).any(1) & _weight(b, slot).ne(0).any(0)
                nz = used.nonzero()
                hit[2][slot] = int(nz[-1]) + 1 if len(nz) else 0
            return hit[2][slot]

        def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
            super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
            self._token_groups = lora_groups(self.token_lora_indices)
            self._sampler_groups = lora_groups(self.sampler_indices)

        # y[i][:, :r] = scale * x @ A_i^T, row by row with each row's adapter
        def add_shrink(self, y, x, lora_a_stacked, scale, **kwargs):
            x = x.view(-1, x.shape[-1])
            for i, a in enumerate(lora_a_stacked):
                yi = y[i].view(-1, y[i].shape[-1])
                for slot, rows in self._token_groups:
                    w = _weight(a, slot).to(yi.dtype)
                    out = torch.mm(_take(x, rows).to(yi.dtype), w.t())
                    if scale != 1.0:
                        out = out * scale
                    _set_rows(yi, rows, slice(0, w.shape[0]), out)

        # y[:, off_i : off_i + size_i] (+)= x[i] @ B_i^T
        def add_expand(self, y, x, lora_b_stacked, output_slices, offset_start=0,
                       add_inputs=True, **kwargs):
            y2 = y.view(-1, y.shape[-1])
            offset = offset_start
            for i, b in enumerate(lora_b_stacked):
                cols = slice(offset, offset + output_slices[i])
                for slot, rows in self._token_groups:
                    w = _weight(b, slot).to(y2.dtype)
                    out = torch.mm(_take(x[i], rows).to(y2.dtype), w.t())
                    (_add_rows if add_inputs else _set_rows)(y2, rows, cols, out)
                offset += output_slices[i]

        def add_lora_embedding(self, y, x, lora_b_stacked, add_inputs=True, **kwargs):
            for slot, rows in self._token_groups:
                w = _weight(lora_b_stacked, slot).to(y.dtype)
                out = torch.mm(_take(x, rows).to(y.dtype), w.t())
                n = min(out.shape[1], y.shape[1])  # the adapter and model may pad differently
                (_add_rows if add_inputs else _set_rows)(y, rows, slice(0, n), out[:, :n])

        def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                            *, buffer=None, **kwargs):
            assert len(lora_a_stacked) == len(lora_b_stacked) == len(output_slices)
            if buffer is not None:  # the caller reads the shrunk buffer: keep both steps
                self.add_shrink(buffer, x, lora_a_stacked, scale, **kwargs)
                self.add_expand(y, buffer, lora_b_stacked, output_slices, add_inputs=True)
                return
            y2, x = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
            for slot, rows in self._token_groups:
                xg = _take(x, rows).float()  # PunicaWrapperCPU's buffer is float32
                offset = 0
                for a, b, size in zip(lora_a_stacked, lora_b_stacked, output_slices):
                    r = self._rank(a, b, slot)  # the adapter's own rank, not max_lora_rank
                    if r:
                        h = torch.mm(xg, _weight(a, slot)[:r].float().t())
                        if scale != 1.0:
                            h = h * scale
                        out = torch.mm(h.to(y2.dtype), _weight(b, slot)[:, :r].to(y2.dtype).t())
                        _add_rows(y2, rows, slice(offset, offset + size), out)
                    offset += size

        def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None,
                            **kwargs):
            y2, x = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
            for slot, rows in self._sampler_groups:
                h = torch.mm(_take(x, rows).float(), _weight(lora_a_stacked, slot).float().t())
                if scale != 1.0:
                    h = h * scale
                out = torch.mm(h.to(y2.dtype), _weight(lora_b_stacked, slot).to(y2.dtype).t())
                n = min(out.shape[1], y2.shape[1])
                _add_rows(y2, rows, slice(0, n), out[:, :n])

    GroupedPunicaWrapper.__module__ = __name__
    return GroupedPunicaWrapper


def _build_platform():
    from vllm.platforms import cpu_platform_plugin
    from vllm.utils.import_utils import resolve_obj_by_qualname

    base = resolve_obj_by_qualname(cpu_platform_plugin() or "vllm.platforms.cpu.CpuPlatform")

    def get_punica_wrapper(cls) -> str:
        return f"{__name__}.GroupedPunicaWrapper"

    return type("VLoRACpuPlatform", (base,), {
        "__module__": __name__, "__doc__": f"{base.__name__} with vlora's grouped LoRA wrapper.",
        "get_punica_wrapper": classmethod(get_punica_wrapper)})


def __getattr__(name: str):
    builders = {"GroupedPunicaWrapper": _build_wrapper, "VLoRACpuPlatform": _build_platform}
    if name not in builders:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _BUILT:
        _BUILT[name] = builders[name]()
    return _BUILT[name]
