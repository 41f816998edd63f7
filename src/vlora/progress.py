"""Progress bars for long work (rich, on stderr), silent when disabled.

Inside :func:`session` (every ``vlora`` command runs in one) all the stages of the work
draw one bar: each :func:`track` adds its items to the bar's total and names its stage,
and :func:`expect` announces work ahead (e.g. every candidate fit of a byte budget), so
the bar's estimate covers the whole of it instead of restarting stage by stage. Outside
a session each ``track`` draws a bar of its own.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


class _Bar:
    """One rich bar, drawn from the first enabled stage on; ``reserved`` counts the items
    :func:`expect` added to the total that no stage has claimed yet."""

    def __init__(self) -> None:
        self.progress: Any = None
        self.task: Any = None
        self.reserved = 0

    def _create(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn())
        # stdout is the command's output (JSON perhaps): never redirected into the bar's stderr
        self.progress = Progress(*columns, console=Console(stderr=True), transient=True,
                                 redirect_stdout=False)
        self.task = self.progress.add_task("", total=0)

    def add(self, items: int, description: str | None = None, reserve: bool = False) -> None:
        """Add ``items`` to the total; a stage (``reserve`` False) first claims what
        :func:`expect` reserved, an announcement (``reserve`` True) reserves them."""
        if self.progress is None:
            self._create()
        claimed = 0 if reserve else min(items, self.reserved)
        self.reserved += items if reserve else -claimed
        total = self.progress.tasks[0].total or 0
        self.progress.update(self.task, total=total + items - claimed,
                             **({"description": description} if description else {}))
        self.progress.start()  # a no-op while it runs; after a pause the counts go on

    def stop(self) -> None:
        """Take the bar off the screen (until a stage starts again): a command prints
        its results when no announced work is left, and a live bar would draw over them."""
        if self.progress is not None:
            self.progress.stop()


_BAR: contextvars.ContextVar[_Bar | None] = contextvars.ContextVar("vlora_progress", default=None)


@contextlib.contextmanager
def session() -> Iterator[None]:
    """One bar for everything tracked inside (drawn only if some stage is enabled)."""
    bar = _Bar()
    token = _BAR.set(bar)
    try:
        yield
    finally:
        _BAR.reset(token)
        bar.stop()


def expect(items: int, enabled: bool = True) -> None:
    """Announce ``items`` units that stages to come will track (inside a session)."""
    bar = _BAR.get()
    if enabled and bar is not None and items > 0:
        bar.add(items, reserve=True)


def track(items: Iterable[T], description: str, total: int | None = None,
          enabled: bool = True) -> Iterator[T]:
    """Yield ``items``, advancing the session's bar (or a bar of its own) when ``enabled``."""
    if not enabled:
        yield from items
        return
    items = list(items) if total is None else items
    total = len(items) if total is None else total  # type: ignore[arg-type]
    bar = _BAR.get()
    with contextlib.ExitStack() as own:
        if bar is None:
            bar = _Bar()
            own.callback(bar.stop)
        bar.add(total, description)
        for item in items:
            yield item
            bar.progress.advance(bar.task)
        if bar.reserved == 0:
            bar.stop()
