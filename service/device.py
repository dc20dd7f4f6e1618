"""Device selection: ``auto`` picks CUDA when present, else the CPU."""

from __future__ import annotations

import torch

from service.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """Map a device setting (``auto``, ``cpu``, ``cuda``, ``cuda:N``) to a torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}", field="device") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but CUDA is not available", field="device")
    return dev
