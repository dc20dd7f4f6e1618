"""Pixel conversions and a light training augmentation for small images."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from service.data._checks import non_negative_int
from service.errors import ConfigError


def to_float(images: npt.NDArray[np.uint8] | torch.Tensor) -> torch.Tensor:
    """Convert ``uint8`` pixels to ``float32`` values in ``[0, 1]`` (divided by 255).

    Args:
        images: ``uint8`` numpy array or tensor of any shape.

    Returns:
        A new ``float32`` tensor of the same shape (on the input tensor's device).

    Raises:
        ConfigError: The input is not ``uint8``.
    """
    tensor = (
        torch.from_numpy(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    )
    if tensor.dtype != torch.uint8:
        raise ConfigError(f"to_float expects uint8 pixels, got {tensor.dtype}", field="images")
    return tensor.to(torch.float32).div_(255.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Convert ``[0, 1]`` floats to ``uint8`` pixels: ``round(x * 255)`` clamped to 0..255.

    Rounding is half to even (``torch.round``); values outside ``[0, 1]`` saturate. For every
    ``uint8`` ``u``, ``to_uint8(to_float(u)) == u`` exactly.

    Args:
        images: Floating-point tensor of any shape.

    Returns:
        A ``uint8`` tensor of the same shape and device.

    Raises:
        ConfigError: The input is not a floating-point tensor or contains NaN.
    """
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise ConfigError("to_uint8 expects a floating-point tensor", field="images")
    if torch.isnan(images).any():
        raise ConfigError("to_uint8 got NaN values", field="images")
    return torch.round(images * 255.0).clamp_(0, 255).to(torch.uint8)


def random_shift_flip(
    batch: torch.Tensor,
    generator: torch.Generator,
    max_shift: int = 2,
    flip: bool = True,
) -> torch.Tensor:
    """Randomly translate and horizontally flip each image of a batch.

    Each image is shifted by ``dy, dx`` drawn uniformly from ``-max_shift..max_shift``
    (zero padding, then cropping back to ``(H, W)``) and, when ``flip``, mirrored left-right
    with probability 1/2. Random numbers are drawn on ``generator``'s device in this order:
    ``dy`` (B values), ``dx`` (B values), then the flip coins (B values, only when
    ``flip``), so the result is deterministic given the generator state. The work is a
    single pad and two gathers for the whole batch; the input is not modified.

    Args:
        batch: Floating-point images ``(B, C, H, W)``.
        generator: Source of randomness.
        max_shift: Largest shift in pixels (``>= 0``).
        flip: Whether to apply random horizontal flips.

    Returns:
        A new tensor of the same shape, dtype and device. Values stay within the input's
        range extended by 0 (the padding value), so ``[0, 1]`` stays ``[0, 1]``.

    Raises:
        ConfigError: ``batch`` is not a 4-D floating-point tensor or ``max_shift`` is
            negative.
    """
    if batch.ndim != 4 or not batch.is_floating_point():
        raise ConfigError(
            f"batch must be a float (B, C, H, W) tensor, got {batch.dtype} {tuple(batch.shape)}",
            field="batch",
        )
    shift = non_negative_int(max_shift, "max_shift")
    b, c, h, w = batch.shape
    gen_device = generator.device
    dy = torch.randint(0, 2 * shift + 1, (b,), generator=generator, device=gen_device)
    dx = torch.randint(0, 2 * shift + 1, (b,), generator=generator, device=gen_device)
    if flip:
        flips = torch.randint(0, 2, (b,), generator=generator, device=gen_device).bool()
    else:
        flips = torch.zeros(b, dtype=torch.bool, device=gen_device)
    dy, dx, flips = dy.to(batch.device), dx.to(batch.device), flips.to(batch.device)

    padded = torch.nn.functional.pad(batch, (shift, shift, shift, shift))
    ar_h = torch.arange(h, device=batch.device)
    ar_w = torch.arange(w, device=batch.device)
    rows = dy[:, None] + ar_h[None, :]
    cols = dx[:, None] + torch.where(flips[:, None], (w - 1) - ar_w[None, :], ar_w[None, :])
    width_padded = w + 2 * shift
    out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, width_padded))
    return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))
