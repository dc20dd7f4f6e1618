"""Binary hash codes: binarisation, bit packing and hex encoding.

A K-bit hash code is represented in one of three ways in this package:

* **±1 codes** -- a float or integer array/tensor of shape ``(N, K)`` whose entries
  are ``+1`` or ``-1`` (what a deep-hashing network produces after ``sign``).
* **packed codes** -- a ``uint8`` array of shape ``(N, ceil(K / 8))`` holding one bit
  per code entry (bit ``1`` for ``+1``), most significant bit first within each byte
  (the :func:`numpy.packbits` default, "big" bit order). Padding bits in the last
  byte are zero.
* **hex strings** -- the packed bytes of a single code written as lowercase hex.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "codes_to_hex",
    "hex_to_codes",
    "num_bytes",
    "pack_bits",
    "sign_codes",
    "to_numpy",
    "unpack_bits",
]

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, "torch.Tensor")


def _is_tensor(x: object) -> bool:
    """Whether ``x`` is a torch tensor, without importing torch.

    If torch has never been imported, no tensor can exist, so this package does not
    pay torch's import cost (and memory) when used with numpy arrays only.
    """
    torch_module = sys.modules.get("torch")
    return torch_module is not None and isinstance(x, torch_module.Tensor)


def to_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Return ``x`` as a numpy array (detaching and moving torch tensors to the CPU).

    Args:
        x: A numpy array, a torch tensor or anything :func:`numpy.asarray` accepts.

    Returns:
        A numpy array view or copy of ``x``.
    """
    if _is_tensor(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def num_bytes(bits: int) -> int:
    """Number of bytes needed to pack ``bits`` bits, i.e. ``ceil(bits / 8)``.

    Args:
        bits: Code length K (must be positive).

    Returns:
        ``ceil(bits / 8)``.

    Raises:
        ValueError: If ``bits`` is not a positive integer.
    """
    if int(bits) != bits or bits <= 0:
        raise ValueError(f"bits must be a positive integer, got {bits!r}")
    return (int(bits) + 7) // 8


def sign_codes(x: ArrayOrTensor) -> ArrayOrTensor:
    """Binarise real-valued (e.g. relaxed ``tanh``) outputs to ±1 codes.

    Unlike :func:`torch.sign` / :func:`numpy.sign`, zero maps to ``+1`` so that every
    entry becomes a valid bit and the result is deterministic. NaN maps to ``-1``.

    Args:
        x: Torch tensor or numpy array of any shape.

    Returns:
        Same container type and shape as ``x``. Floating-point and signed-integer
        inputs keep their dtype; boolean and unsigned inputs yield ``int8``
        (numpy) / ``torch.int8`` (torch) since they cannot hold ``-1``.
    """
    if _is_tensor(x):
        import torch

        if x.is_floating_point() or x.dtype in (
            torch.int8,
            torch.int16,
            torch.int32,
            torch.int64,
        ):
            dtype = x.dtype
        else:
            dtype = torch.int8
        one = torch.ones((), dtype=dtype, device=x.device)
        return torch.where(x >= 0, one, -one)
    arr = np.asarray(x)
    if arr.dtype.kind in "fi":
        dtype = arr.dtype
    else:
        dtype = np.dtype(np.int8)
    return np.where(arr >= 0, 1, -1).astype(dtype, copy=False)


def pack_bits(codes: np.ndarray | torch.Tensor) -> np.ndarray:
    """Pack codes into bytes, one bit per code entry.

    Args:
        codes: Array of shape ``(N, K)`` (or a single code of shape ``(K,)``) with
            entries in ±1, {0, 1} or bool. Bit ``1`` is written where ``code > 0``
            (so ``-1``, ``0`` and ``False`` all give bit ``0``). Torch tensors are
            accepted and converted to numpy.

    Returns:
        ``uint8`` array of shape ``(N, ceil(K / 8))`` (or ``(ceil(K / 8),)`` for 1-D
        input), big-endian bit order within each byte, zero padding bits.

    Raises:
        ValueError: If ``codes`` is not 1-D or 2-D or has zero bits.
    """
    arr = to_numpy(codes)
    if arr.ndim not in (1, 2):
        raise ValueError(f"codes must be 1-D or 2-D, got shape {arr.shape}")
    if arr.shape[-1] == 0:
        raise ValueError("codes must have at least one bit")
    return np.packbits(arr > 0, axis=-1)


def unpack_bits(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: unpack bytes back into ±1 codes.

    Args:
        packed: ``uint8`` array of shape ``(N, ceil(bits / 8))`` or ``(ceil(bits / 8),)``.
        bits: Code length K; trailing padding bits are dropped.

    Returns:
        ``int8`` array of shape ``(N, bits)`` (or ``(bits,)``) with entries ±1.

    Raises:
        ValueError: If ``packed`` is not ``uint8`` or its byte count does not match
            ``bits``.
    """
    arr = to_numpy(packed)
    if arr.dtype != np.uint8:
        raise ValueError(f"packed codes must be uint8, got {arr.dtype}")
    if arr.ndim not in (1, 2):
        raise ValueError(f"packed codes must be 1-D or 2-D, got shape {arr.shape}")
    if arr.shape[-1] != num_bytes(bits):
        raise ValueError(f"{bits} bits need {num_bytes(bits)} bytes, got {arr.shape[-1]}")
    unpacked = np.unpackbits(arr, axis=-1, count=int(bits)).astype(np.int8)
    return unpacked * np.int8(2) - np.int8(1)


def codes_to_hex(codes_row: np.ndarray | torch.Tensor) -> str:
    """Encode one code as the lowercase hex string of its packed bytes.

    Args:
        codes_row: A single code of shape ``(K,)`` (±1, {0, 1} or bool; see
            :func:`pack_bits`).

    Returns:
        ``2 * ceil(K / 8)`` lowercase hex characters. The code length is not stored;
        pass it to :func:`hex_to_codes` to decode.

    Raises:
        ValueError: If ``codes_row`` is not 1-D.
    """
    arr = to_numpy(codes_row)
    if arr.ndim != 1:
        raise ValueError(f"codes_row must be 1-D, got shape {arr.shape}")
    return pack_bits(arr).tobytes().hex()


def hex_to_codes(hex_str: str, bits: int) -> np.ndarray:
    """Decode a hex string written by :func:`codes_to_hex`.

    Args:
        hex_str: Hex string (case-insensitive) of ``ceil(bits / 8)`` bytes.
        bits: Code length K.

    Returns:
        ``int8`` array of shape ``(bits,)`` with entries ±1.

    Raises:
        ValueError: If the string is not valid hex or has the wrong length.
    """
    try:
        raw = bytes.fromhex(hex_str)
    except ValueError as exc:
        raise ValueError(f"not a valid hex string: {hex_str!r}") from exc
    packed = np.frombuffer(raw, dtype=np.uint8)
    return unpack_bits(packed, bits)
