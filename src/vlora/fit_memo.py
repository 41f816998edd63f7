"""What repeated fits of one list of adapters can share.

``compress`` searches for a byte target by fitting the same adapters again and again
(scales of a float budget, four pseudo-ranks each, a hybrid at half the bytes). Most of
a fit does not depend on the budget: the tasks' norms, each module's stacked spectra and
starts, the refined bases of a module at given ``(k_out, k_in)``, and each adapter's
canonical factors ``(U_t, S_t, V_t)`` per module, which every fit's stacks, refinement
and projections need (QR and SVD per adapter and module: a third of a byte search's time
on the LLM test bed before they were kept), and the span of each module's factors that
refinement works in (:func:`vlora.linalg.task_span`). A :class:`FitMemo` keeps those for the
length of one ``compress`` call; on the LLM test bed (210 modules) it cut a fit at a
ratio several-fold. Results are the same as without it: every value is a deterministic
function of its key and the bound adapters and options.

The factors and spans are float64, together several times the adapters' float32 bytes:
they are kept only while those bytes are at most :data:`FACTOR_CACHE_BYTES`, and only
for fits on the CPU (else they are recomputed).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

FACTOR_CACHE_BYTES = 1 << 30  # adapters' float32 LoRA bytes up to which factors are kept


class FitMemo:
    """Values of one fit's steps by key, for one adapter list and one set of fit options.

    :meth:`bind` ties the memo to them on first use; a fit with other adapters or options
    gets ``False`` and must compute afresh (``SharedSubspace.from_adapters`` then uses a
    memo of its own). Hold one no longer than the fits that share it: the bases it keeps
    are shared, not copied, between the subspaces built from it.
    """

    def __init__(self, keep_factors: bool = True) -> None:
        self._key: Hashable | None = None
        self._values: dict[Hashable, Any] = {}
        self.keep_factors = keep_factors

    def bind(self, key: Hashable) -> bool:
        if self._key is None:
            self._key = key
        return self._key == key

    @classmethod
    def for_adapters(cls, adapters: Sequence[Any], device: Any = None) -> FitMemo:
        """A memo for fits of ``adapters`` (LoRAWeights) on ``device`` (None: the CPU),
        keeping factors if they are small enough and the fit runs on the CPU (an
        accelerator's memory is not spent on them)."""
        small = 4 * sum(a.num_lora_params() for a in adapters) <= FACTOR_CACHE_BYTES
        return cls(keep_factors=small and (device is None or str(device) == "cpu"))

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        if key not in self._values:
            self._values[key] = compute()
        return self._values[key]

    def large(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """:meth:`get` for values as large as the adapters (their canonical factors, the
        spans refinement works in): kept only if ``keep_factors``."""
        return self.get(key, compute) if self.keep_factors else compute()
