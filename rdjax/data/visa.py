"""Dataset 'visa': VisA with its official 1cls split (rdjax.data.layouts)."""

from rdjax.data import DatasetBuilder
from rdjax.data.layouts import visa

DATASET: DatasetBuilder = visa
