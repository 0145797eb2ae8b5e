"""rdjax: the reverse-distillation family of anomaly detectors (RD4AD) in JAX/Flax.

    import rdjax
    model = rdjax.load("runs/bottle")
    result = model.predict(["part1.png", "part2.png"])

Attributes are imported on first use, so `import rdjax.models` does not load the
inference stack.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Model", "Prediction", "load"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from rdjax import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'rdjax' has no attribute {name!r}")
