"""Resumable training checkpoints without pickles.

A checkpoint folder holds ``model.safetensors`` (module state), ``optimizer.safetensors`` (the
optimizer's tensors, flattened) and ``state.json`` (epoch, history, optimizer hyper-parameters
and the config it belongs to). Writes go to temporary names first and are renamed, so a run
killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from service.errors import ConfigError


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _key(pid: str) -> int | str:
    return int(pid) if pid.isdigit() else pid


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int | str, dict[str, Any]] = {}
    for key, t in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(_key(pid), {})[name] = t
    for pid, st in meta.get("scalars", {}).items():
        state.setdefault(_key(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def save_checkpoint(
    folder: Path, modules: dict[str, nn.Module], opt: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Save module states (prefixed by their key), the optimizer and ``state`` atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = {
        f"{name}.{k}": v.detach().cpu().contiguous()
        for name, mod in modules.items()
        for k, v in mod.state_dict().items()
    }
    opt_tensors, opt_meta = _flatten_optimizer(opt)
    for fname, tensors in (("model.safetensors", weights), ("optimizer.safetensors", opt_tensors)):
        tmp = folder / (fname + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, folder / fname)
    _atomic_json(folder / "state.json", {**state, "optimizer": opt_meta})


def load_checkpoint(
    folder: Path, modules: dict[str, nn.Module], opt: torch.optim.Optimizer, config: dict
) -> dict[str, Any] | None:
    """Restore a checkpoint into ``modules`` and ``opt``; None when there is none.

    Refuses a checkpoint that was written for another config (resuming it would mix runs).
    """
    state_file = folder / "state.json"
    if not state_file.is_file():
        return None
    state = json.loads(state_file.read_text())
    if state.get("config") != config:
        raise ConfigError(
            f"checkpoint in {folder} belongs to another config; use a new --checkpoint-dir "
            "or delete that folder to start over",
            field="checkpoint_dir",
        )
    weights = load_file(str(folder / "model.safetensors"))
    for name, mod in modules.items():
        prefix = name + "."
        mod.load_state_dict(
            {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        )
    opt.load_state_dict(
        _unflatten_optimizer(load_file(str(folder / "optimizer.safetensors")), state["optimizer"])
    )
    return state
