"""Teacher encoder, OCBE and student decoder."""

from rdjax.models.rd4ad import RD4AD
from rdjax.models.resnet import ARCHS, ArchSpec, get_arch

__all__ = ["ARCHS", "ArchSpec", "RD4AD", "get_arch"]
