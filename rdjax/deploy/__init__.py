"""Using a trained workdir or package: rdjax.load and the Predictor (predictor, loading,
images), `rdjax predict` (predict, names), `rdjax export`, `rdjax package`, `rdjax port`."""
