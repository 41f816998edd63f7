"""What repeated fits of one list of adapters can share.

``compress`` searches for a byte target by fitting the same adapters again and again
(scales of a float budget, four pseudo-ranks each, a hybrid at half the bytes). Most of
a fit does not depend on the budget: the tasks' norms, each module's stacked spectra and
starts, and the refined bases of a module at given ``(k_out, k_in)``. A :class:`FitMemo`
keeps those for the length of one ``compress`` call; on the LLM test bed (210 modules)
it cut a fit at a ratio several-fold. Results are the same as without it: every value
is a deterministic function of its key and the bound adapters and options.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any


class FitMemo:
    """Values of one fit's steps by key, for one adapter list and one set of fit options.

    :meth:`bind` ties the memo to them on first use; a fit with other adapters or options
    gets ``False`` and must compute afresh (``SharedSubspace.from_adapters`` then uses a
    memo of its own). Hold one no longer than the fits that share it: the bases it keeps
    are shared, not copied, between the subspaces built from it.
    """

    def __init__(self) -> None:
        self._key: Hashable | None = None
        self._values: dict[Hashable, Any] = {}

    def bind(self, key: Hashable) -> bool:
        if self._key is None:
            self._key = key
        return self._key == key

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        if key not in self._values:
            self._values[key] = compute()
        return self._values[key]
