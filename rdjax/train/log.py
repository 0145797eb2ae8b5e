"""Progress lines of a run: each names the category it is about."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import jax
import tqdm

from rdjax import modes

_CATEGORY: contextvars.ContextVar[str] = contextvars.ContextVar("category", default="")


def log(fmt: str, *args: Any) -> None:
    """Progress lines on stdout, above any progress bar, each naming the category it is
    about (two categories' runs look alike otherwise)."""
    if jax.process_index() == 0:
        prefix = f"[{_CATEGORY.get()}] " if _CATEGORY.get() else ""
        tqdm.tqdm.write(prefix + fmt % args)


def label(config: Any) -> str:
    """What a run's log lines and bars call it: its category, or 'unified'."""
    unified = modes.Setting(config.setting) is modes.Setting.UNIFIED
    return modes.Setting.UNIFIED.value if unified else str(config.dataset.category)


@contextlib.contextmanager
def naming(category: str) -> Iterator[None]:
    """log's lines within the block start with ``category``."""
    token = _CATEGORY.set(category)
    try:
        yield
    finally:
        _CATEGORY.reset(token)
