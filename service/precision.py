"""Numeric precision of forward passes: ``fp32``, or ``bf16`` autocast (mixed precision).

``bf16`` runs matrix products and convolutions in bfloat16 under ``torch.autocast`` (weights
stay float32; bf16 has float32's exponent range, so no loss scaling is needed) and, on CUDA,
puts conv nets and their inputs in channels-last memory format (what Tensor Cores want).
``auto`` is ``bf16`` on CUDA and ``fp32`` elsewhere, so the CPU default computes exactly what
it always did. ``bf16`` on the CPU also works (``torch.autocast("cpu")``), slowly unless the
processor has bf16 instructions; it is what tests use to exercise the bf16 path without a GPU.

What stays float32 whatever the precision, because it decides results: hasher outputs are
cast back to float32 before anything reads them (a code is the sign of a float32 value;
losses and attack objectives are computed in float32), attack perturbations, projections and
the final rounding to uint8 (so delivered images honour eps exactly).
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any, Literal

import torch
from torch import nn

from service.errors import ConfigError

Precision = Literal["fp32", "bf16"]
CHOICES: tuple[str, ...] = ("auto", "fp32", "bf16")


def check_precision(name: Any, field: str = "precision") -> str:
    """``name`` if it is ``auto``, ``fp32`` or ``bf16``; a ConfigError naming ``field`` else."""
    if not isinstance(name, str) or name not in CHOICES:
        raise ConfigError(
            f"{field} must be one of {', '.join(CHOICES)}; got {name!r}", field=field)
    return name


def _device_type(device: str | torch.device) -> str:
    return device.type if isinstance(device, torch.device) else torch.device(device).type


def resolve_precision(name: str, device: str | torch.device,
                      field: str = "precision") -> Precision:
    """``fp32`` or ``bf16`` for a setting on ``device`` (``auto``: bf16 on CUDA only)."""
    check_precision(name, field)
    if name == "auto":
        return "bf16" if _device_type(device) == "cuda" else "fp32"
    return "bf16" if name == "bf16" else "fp32"


def autocast(precision: str, device: str | torch.device) -> AbstractContextManager[Any]:
    """The context a forward pass of ``precision`` runs in on ``device``.

    ``bf16``: ``torch.autocast(device type, dtype=torch.bfloat16)``. ``fp32``: nothing, or,
    inside an enclosing autocast region, a region with autocast turned off, so that an fp32
    module computes in float32 wherever it is called from.
    """
    dev = _device_type(device)
    if precision == "bf16":
        return torch.autocast(dev, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ConfigError(f"precision must be fp32 or bf16 here; got {precision!r}",
                          field="precision")
    if torch.is_autocast_enabled(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()


def uses_channels_last(precision: str, device: str | torch.device) -> bool:
    """Whether conv nets and their inputs go channels-last: bf16 on CUDA."""
    return precision == "bf16" and _device_type(device) == "cuda"


def to_memory_format(module: nn.Module, channels_last: bool) -> nn.Module:
    """Put ``module``'s 4-d weights in channels-last (or back in the default) format."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return module.to(memory_format=fmt)


def as_batch(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x`` in channels-last format when asked and 4-d; else ``x`` itself."""
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x

