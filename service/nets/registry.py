"""Registry of network constructors (backbones and heads)."""

from __future__ import annotations

from typing import Any

from torch import nn

from service.registry import Registry

NETS: Registry[nn.Module] = Registry("network")


def create_net(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered network by name."""
    return NETS.create(name, **kwargs)
