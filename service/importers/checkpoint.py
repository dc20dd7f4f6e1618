"""Reading a user's checkpoint without running anything from it.

A ``.safetensors`` file is read with safetensors (no pickle at all). Anything else goes
through ``torch.load(path, weights_only=True, map_location="cpu")``: torch's restricted
unpickler, which builds tensors, numbers, strings and plain containers and refuses every
other global *before* calling it. A checkpoint that needs one (a whole pickled model, as
``torch.save(model)`` writes, or a planted ``__reduce__``) is refused with
:class:`UnsafeCheckpoint`; nothing from it has run by then. Full unpickling is never used.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from service.errors import BadInput, CorruptData, DataNotFound

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "state")
LOADER = "torch.load(weights_only=True, map_location='cpu')"
MAX_KEY_CHARS = 300


class UnsafeCheckpoint(BadInput):
    """A checkpoint needs Python objects beyond tensors and plain containers to load."""

    code = "unsafe_checkpoint"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_torch(path: Path, field: str) -> Any:
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        m = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if m is None:  # not a pickle of anything torch knows (text, a truncated file...)
            why = re.search(r"WeightsUnpickler error: \s*(.+)", str(exc))
            raise CorruptData(f"{field}: {path.name} is not a readable torch checkpoint "
                              f"({why.group(1).strip()[:120] if why else 'unpickling failed'})",
                              field=field) from None
        what = f" (the first one: {m.group(1)})"
        raise UnsafeCheckpoint(
            f"{field}: {path.name} was refused: loading it needs Python objects beyond tensors "
            f"and plain containers{what}. HashAudit reads checkpoints with {LOADER} only and "
            "never unpickles arbitrary objects, so nothing from the file ran. If it is a "
            "whole pickled model (torch.save(model)), load it where its code lives and save "
            "the weights alone: torch.save(model.state_dict(), 'model.pt')",
            field=field) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError,
            IndexError, TypeError, AttributeError) as exc:
        raise CorruptData(f"{field}: {path.name} is not a readable torch checkpoint "
                          f"({type(exc).__name__}: {str(exc)[:200]})", field=field) from None


def _load_safetensors(path: Path, field: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptData(f"{field}: {path.name} is not a readable safetensors file ({exc})",
                          field=field) from None


def _is_state(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def read_state_dict(path: Path | str, state_key: str | None = None,
                    field: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of a checkpoint and a record of how they were read.

    Args:
        path: ``.safetensors``, or a file written by ``torch.save`` (``.pt``, ``.pth``, ...).
        state_key: the entry holding the state dict when the file wraps it in a dict
            (``{"state_dict": ..., "epoch": ...}``); by default the file itself when it is a
            state dict, else the one of ``state_dict``, ``model_state_dict``, ``model``,
            ``net``, ``state`` that is.
        field: names the input in errors.

    Returns:
        ``(state dict, record)``; the record holds the file name, sha256, size, loader, the
        entry used and the ``module.`` prefix stripped (``torch.nn.DataParallel`` adds it to
        every key).

    Raises:
        DataNotFound: no such file.
        UnsafeCheckpoint: the file needs arbitrary globals to load (nothing from it ran).
        CorruptData: not a checkpoint, or no state dict of tensors in it.
    """
    p = Path(path)
    if not p.is_file():
        raise DataNotFound(f"{field}: checkpoint file not found: {p}", field=field)
    record: dict[str, Any] = {"file": p.name, "sha256": sha256_of(p), "bytes": p.stat().st_size}
    if p.suffix.lower() == ".safetensors":
        obj: Any = _load_safetensors(p, field)
        record["loader"] = "safetensors"
    else:
        obj = _load_torch(p, field)
        record["loader"] = LOADER
    used = None
    if state_key is not None:
        if not isinstance(obj, dict) or state_key not in obj:
            keys = sorted(str(k) for k in obj)[:10] if isinstance(obj, dict) else []
            raise CorruptData(f"{field}: {p.name} has no entry {state_key!r} (top-level "
                              f"entries: {keys or type(obj).__name__})", field="state_key")
        obj, used = obj[state_key], state_key
    elif isinstance(obj, dict) and not _is_state(obj):
        used = next((k for k in WRAPPER_KEYS if _is_state(obj.get(k))), None)
        if used is not None:
            obj = obj[used]
    if not _is_state(obj):
        bad = ""
        if isinstance(obj, dict):
            k, v = next(((k, v) for k, v in obj.items()
                         if not (isinstance(k, str) and isinstance(v, torch.Tensor))),
                        (None, None))
            bad = f"; entry {str(k)[:80]!r} holds a {type(v).__name__}, not a tensor"
        raise CorruptData(
            f"{field}: {p.name} holds no state dict of tensors{bad}. Save one with "
            "torch.save(model.state_dict(), path), or name the entry that holds it "
            "(--state-key)", field=field)
    state: dict[str, torch.Tensor] = obj
    long = next((k for k in state if len(k) > MAX_KEY_CHARS), None)
    if long is not None:
        raise CorruptData(f"{field}: a key of {len(long)} characters", field=field)
    prefix = "module."
    if all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}
    else:
        prefix = ""
    record.update({"state_key": used, "stripped_prefix": prefix or None,
                   "tensors": len(state)})
    return state, record
