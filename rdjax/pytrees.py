"""The explicit pytrees passed between the parts: one definition for every module."""

from __future__ import annotations

from typing import Any

import jax

# A flax variable collection: {'params': ..., 'batch_stats': ...} (teacher or student).
Variables = dict[str, Any]
# Feature maps, one NHWC array per scale.
Features = tuple[jax.Array, ...]
