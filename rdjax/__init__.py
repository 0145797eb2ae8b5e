"""rdjax: the reverse-distillation family of anomaly detectors (RD4AD) in JAX/Flax.

    import rdjax
    model = rdjax.load("runs/bottle")  # an rdjax.Predictor
    result = model.predict(["part1.png", "part2.png"])

Attributes are imported on first use, so `import rdjax.models` does not load the
inference stack. `rdjax.Model`, the predictor's name up to 0.7.0, stays an alias of
rdjax.Predictor for old code (the model contract is rdjax.models.Model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["Model", "Prediction", "Predictor", "load"]
_ALIASES = {"Model": "Predictor"}  # old name -> the name it stands for

# The configs ship inside the package as rdjax.configs, from the repository's top-level
# configs/ (pyproject.toml). Run from a clone's root with rdjax installed non-editable,
# `import rdjax` finds the source folder, which has no configs/ of its own: the
# repository's then serves as rdjax.configs, so the documented command works there too.
_source = Path(__file__).parent
if not (_source / "configs").is_dir() and (_source.parent / "configs" / "__init__.py").is_file():
    __path__.append(str(_source.parent))


def __getattr__(name: str) -> Any:
    if name in __all__:
        from rdjax.deploy import predictor

        return getattr(predictor, _ALIASES.get(name, name))
    raise AttributeError(f"module 'rdjax' has no attribute {name!r}")
