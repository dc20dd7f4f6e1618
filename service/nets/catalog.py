"""Registry of network constructors (backbones and heads)."""

from __future__ import annotations

from typing import Any

from torch import nn

from service.registry import Registry

NETS: Registry[nn.Module] = Registry("network")
BACKBONES: Registry[nn.Module] = Registry("backbone")


def create_net(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered network by name."""
    return NETS.create(name, **kwargs)


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered hasher backbone by name."""
    return BACKBONES.create(name, **kwargs)
