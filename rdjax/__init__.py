"""rdjax: RD4AD (reverse distillation anomaly detection) in JAX/Flax."""
