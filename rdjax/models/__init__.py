"""Flax modules and the models built from them. A model is chosen by name from
`rdjax.registry.MODELS` (config.model.name): RD4AD is 'rd4ad', RD++ 'rdpp'."""

from rdjax.models.rd4ad import RD4AD
from rdjax.models.rdpp import RDPP
from rdjax.models.resnet import ARCHS, ArchSpec, get_arch

__all__ = ["ARCHS", "ArchSpec", "RD4AD", "RDPP", "get_arch"]
