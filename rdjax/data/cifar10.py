"""Dataset 'cifar10': CIFAR-10 one-class novelty detection (rdjax.data.novelty)."""

from rdjax.data import DatasetBuilder
from rdjax.data.novelty import builder

DATASET: DatasetBuilder = builder("cifar10")
