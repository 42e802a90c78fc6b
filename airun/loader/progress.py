"""A progress bar on stderr for weight loading, shown only on a terminal or when asked."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress_enabled(show: bool | None) -> bool:
    """``None`` means: show it when stderr is a terminal."""
    if show is not None:
        return show
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return False


def with_progress(items: Iterable[T], *, total: int | None, desc: str, show: bool | None = None) -> Iterator[T]:
    """Yields ``items`` unchanged, one by one (laziness is kept: the next item is pulled only when asked for),
    advancing a tqdm bar on stderr after the consumer is done with each item."""
    if not progress_enabled(show):
        yield from items
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, dynamic_ncols=True, leave=False) as bar:
        for item in items:
            yield item
            bar.update(1)
