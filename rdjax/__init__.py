"""rdjax: RD4AD (reverse distillation anomaly detection) in JAX/Flax.

    import rdjax
    model = rdjax.load("runs/bottle")
    result = model.predict(["part1.png", "part2.png"])
"""

from rdjax.inference import Model, Prediction, load

__all__ = ["Model", "Prediction", "load"]
