"""Optimizer / scheduler state for exact resume, saved without pickle: tensors in safetensors, the rest in JSON.

`torch.save` would pickle; an optimizer's state dict is a small tree of tensors and numbers, so we flatten it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"  # written last: its presence marks a complete training state


def save_train_state(directory: Path, *, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler, extra: dict | None = None) -> None:
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for pid, state in opt["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{name}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    save_file(tensors, str(directory / STATE_TENSORS))
    meta = {"step": step, "param_groups": opt["param_groups"], "optim_scalars": scalars,
            "scheduler": scheduler.state_dict(), "extra": extra or {}}
    tmp = directory / (STATE_JSON + ".tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, directory / STATE_JSON)


def has_train_state(directory: Path) -> bool:
    return (directory / STATE_JSON).is_file() and (directory / STATE_TENSORS).is_file()


def load_train_state(directory: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler) -> dict:
    """Restores model, optimizer and scheduler in place; returns the JSON part (with `step`)."""
    meta = json.loads((directory / STATE_JSON).read_text())
    tensors = load_file(str(directory / STATE_TENSORS))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for pid, values in meta["optim_scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    return meta
