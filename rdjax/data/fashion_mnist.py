"""Dataset 'fashion_mnist': Fashion-MNIST one-class novelty detection (rdjax.data.novelty)."""

from rdjax.data.novelty import builder

DATASET = builder("fashion_mnist")
