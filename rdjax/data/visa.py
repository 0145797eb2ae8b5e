"""Dataset 'visa': VisA with its official 1cls split (rdjax.data.layouts)."""

from rdjax.data.layouts import visa

DATASET = visa
