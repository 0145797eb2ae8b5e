"""Dataset 'folder': any folders of normal and anomalous images (rdjax.data.layouts)."""

from rdjax.data import DatasetBuilder
from rdjax.data.layouts import folder

DATASET: DatasetBuilder = folder
