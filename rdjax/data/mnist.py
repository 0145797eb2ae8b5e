"""Dataset 'mnist': MNIST one-class novelty detection (rdjax.data.novelty)."""

from rdjax.data.novelty import builder

DATASET = builder("mnist")
