"""The persistent XLA compilation cache of `rdjax train` and `rdjax eval` (--compilation_cache):
its default folder, its size cap, and switching it on or off in jax before anything compiles."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

XLA_CACHE_MAX_BYTES = 2 * 2**30  # the oldest programs are deleted beyond this, at each start


def default_compilation_cache() -> str:
    """$RDJAX_XLA_CACHE (''/'0' turns it off), else $JAX_COMPILATION_CACHE_DIR, else
    the user's cache folder (~/.cache/rdjax/xla)."""
    if "RDJAX_XLA_CACHE" in os.environ:
        value = os.environ["RDJAX_XLA_CACHE"]
        return "" if value in ("", "0") else value
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rdjax" / "xla")


def prune_cache(directory: Path, max_bytes: int) -> None:
    """Delete the least recently used files until the folder holds at most ``max_bytes``.
    Done once at start rather than by jax's own LRU mode, whose bookkeeping files race
    when several processes (hosts, parallel runs) share one cache; a file another process
    deleted first is simply skipped."""
    entries = []
    for path in directory.glob("*"):
        with contextlib.suppress(OSError):
            stat = path.stat()
            entries.append((max(stat.st_atime, stat.st_mtime), stat.st_size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= max_bytes:
            break
        try:
            path.unlink()
        except FileNotFoundError:  # another process deleted it first
            pass
        except OSError:  # it stays, and counts
            continue
        total -= size


def use_compilation_cache(directory: str) -> None:
    """Keep compiled programs on disk, at most XLA_CACHE_MAX_BYTES: a repeated run, and
    each category of category='all' after the first, skips compiling the same steps
    again. Programs are keyed by their HLO, jax version and devices, so a stale entry is
    never used."""
    import jax

    if not directory:  # jax itself reads JAX_COMPILATION_CACHE_DIR: switch it off explicitly
        jax.config.update("jax_enable_compilation_cache", False)
        return
    folder = Path(directory).expanduser()
    if folder.is_dir():
        prune_cache(folder, XLA_CACHE_MAX_BYTES)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
