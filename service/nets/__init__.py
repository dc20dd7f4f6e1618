"""Torch modules only (no I/O): backbones, hashers and, later, attack networks.

Importing this package registers every network in :data:`NETS`.
"""

from service.nets import backbones as _backbones  # noqa: F401  (registers backbones)
from service.nets import gan as _gan  # noqa: F401
from service.nets import prototype as _prototype  # noqa: F401
from service.nets import torchvision_trunk as _torchvision_trunk  # noqa: F401
from service.nets.catalog import BACKBONES, NETS, create_backbone, create_net
from service.nets.hasher import Hasher, build_hasher

__all__ = ["BACKBONES", "NETS", "create_backbone", "create_net", "Hasher", "build_hasher"]
