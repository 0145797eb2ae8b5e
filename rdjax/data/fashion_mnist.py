"""Dataset 'fashion_mnist': Fashion-MNIST one-class novelty detection (rdjax.data.novelty)."""

from rdjax.data import DatasetBuilder
from rdjax.data.novelty import builder

DATASET: DatasetBuilder = builder("fashion_mnist")
