"""Policy checkpoints: a folder that rebuilds the policy on its own, loaded without pickle.

    dir/config.yaml         resolved run config; `policy:` holds the policy config (its `name` picks the class)
    dir/model.safetensors   weights incl. normalizer buffers; header metadata names the policy
    dir/features.json       feature specs, policy name, versions, format version, creation time, `extra`
    dir/extra.safetensors   optional tensors of a refinement method (noise policy, residual, value head...)

A run folder (`robopolicy train` or `finetune`) keeps its checkpoints under RUN/checkpoints/ with a symlink
RUN/checkpoints/last to the newest: `resolve_checkpoint` takes either a checkpoint or a run folder, `point_last`
moves the link.

Writes go to a temporary sibling folder that is renamed into place, so a killed process never leaves a half
checkpoint under the final name. This module reads and writes folders; `robopolicy.loading.load_policy`, a layer
above the policies and the refinement methods, rebuilds a policy (a refined one with its verified base) from one.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import robopolicy
from robopolicy.config import plain

if TYPE_CHECKING:
    from robopolicy.policies import ChunkPolicy

# 2: config.yaml holds every field of the policy's typed config (format 1 relied on fallbacks in the code)
FORMAT_VERSION = 2
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
FEATURES_FILE = "features.json"
EXTRA_TENSORS_FILE = "extra.safetensors"


LAST_LINK = "last"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, damaged, or does not fit what the caller expects."""


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or a run folder's newest checkpoint (RUN/checkpoints/last), as an absolute path."""
    p = Path(path)
    if (p / "checkpoints" / LAST_LINK).exists():
        p = p / "checkpoints" / LAST_LINK
    if not (p / FEATURES_FILE).is_file():
        raise CheckpointError(f"No checkpoint at {path}: pass a checkpoint folder or a training run folder "
                              "(one with checkpoints/last).")
    return p.resolve()


def point_last(checkpoint: str | os.PathLike) -> None:
    """Atomically point the sibling link `last` at `checkpoint` (a folder inside RUN/checkpoints/)."""
    checkpoint = Path(checkpoint)
    tmp = checkpoint.parent / f".{LAST_LINK}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(checkpoint.name)
    os.replace(tmp, checkpoint.parent / LAST_LINK)  # atomic: `last` always names a complete checkpoint


def _write_and_sync(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(dir: str | os.PathLike, policy: ChunkPolicy, *, config: Mapping[str, Any],
                    extra_json: Mapping[str, Any] | None = None,
                    extra_tensors: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write the checkpoint folder `dir` atomically (replacing an existing one) and return its path. `config` is
    the run's resolved config; its `policy` section is always the policy's own, complete config."""
    final = Path(dir)
    config = {**plain(config), "policy": plain(policy.config)}
    info = {
        "format_version": FORMAT_VERSION,
        "policy": policy.name,
        "features": plain(policy.features),
        "n_obs_steps": policy.n_obs_steps,
        "horizon": policy.horizon,
        "n_action_steps": policy.n_action_steps,
        "versions": {"robopolicy": robopolicy.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "extra": plain(dict(extra_json or {})),
    }
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        weights = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"policy": policy.name,
                                                              "format_version": str(FORMAT_VERSION)})
        if extra_tensors:
            save_file({k: v.detach().cpu().contiguous() for k, v in extra_tensors.items()},
                      str(tmp / EXTRA_TENSORS_FILE))
        _write_and_sync(tmp / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
        # features.json last: its presence marks a complete folder for readers of the temp dir too.
        _write_and_sync(tmp / FEATURES_FILE, json.dumps(info, indent=2))
        if final.exists():
            # A directory cannot be renamed over a non-empty one: move the old one aside first.
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_checkpoint_info(dir: str | os.PathLike) -> dict[str, Any]:
    """features.json content plus the resolved config under "config"."""
    folder = Path(dir)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist; pass the folder save_checkpoint wrote.")
    for name in (CONFIG_FILE, FEATURES_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise CheckpointError(f"checkpoint {folder} has no {name}; it is incomplete or not a checkpoint.")
    try:
        info = json.loads((folder / FEATURES_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{folder / FEATURES_FILE} is not valid JSON ({e}); the checkpoint is damaged.") from e
    try:
        config = yaml.safe_load((folder / CONFIG_FILE).read_text())
    except yaml.YAMLError as e:
        raise CheckpointError(f"{folder / CONFIG_FILE} is not valid YAML ({e}); the checkpoint is damaged.") from e
    if not isinstance(info, dict) or "features" not in info:
        raise CheckpointError(f"{folder / FEATURES_FILE} has no 'features' entry; the checkpoint is damaged.")
    if int(info.get("format_version", -1)) > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {folder} has format version {info.get('format_version')}, newer than this robopolicy "
            f"reads ({FORMAT_VERSION}); upgrade robopolicy."
        )
    if not isinstance(config, dict) or not isinstance(config.get("policy"), dict):
        raise CheckpointError(f"{folder / CONFIG_FILE} has no 'policy' section; the checkpoint is damaged.")
    return {**info, "config": config}


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu"
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors file and its header metadata; a damaged file is a CheckpointError."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path), device=str(device)), metadata
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path} is damaged or truncated ({e}); re-save or re-download the checkpoint.") from e


def load_extra_tensors(dir: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Tensors saved with `extra_tensors=` (empty when none were saved)."""
    path = Path(dir) / EXTRA_TENSORS_FILE
    if not path.is_file():
        return {}
    return load_tensors(path, device)[0]


# ------------------------------------------------------------------------------------- bases of refined policies


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def base_reference(ckpt: str | os.PathLike) -> dict[str, str]:
    """What a refined checkpoint records about its base: absolute path and sha256 of its weights (hashed once,
    when refinement starts)."""
    folder = Path(ckpt).resolve()
    if not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"base checkpoint {folder} has no {WEIGHTS_FILE}; pass a checkpoint folder.")
    return {"path": str(folder), "sha256": file_sha256(folder / WEIGHTS_FILE)}


def verify_base(reference: Mapping[str, str]) -> Path:
    """The base folder a refined checkpoint names, after checking it is there and unchanged (hashed once here)."""
    if not isinstance(reference, Mapping) or "path" not in reference:
        raise CheckpointError("the refined checkpoint's policy section lacks its base: base={path, sha256}.")
    path = Path(str(reference["path"]))
    if not (path / WEIGHTS_FILE).is_file():
        raise CheckpointError(
            f"the refined checkpoint's base {path} is missing (no {WEIGHTS_FILE}); put the base checkpoint back "
            f"at that path, or refine again from an existing base."
        )
    actual = file_sha256(path / WEIGHTS_FILE)
    if actual != reference.get("sha256"):
        raise CheckpointError(
            f"the refined checkpoint's base {path} has changed since refinement (sha256 {actual[:12]}..., "
            f"expected {str(reference.get('sha256'))[:12]}...); restore the original base or refine again."
        )
    return path


# --------------------------------------------------------------------------------- checkpoints of format 1


# Format 1 checkpoints were read with per-key fallbacks in the code: a key missing from an old config.yaml
# meant the value below (the setting had not been introduced yet). Format 2 writes every field of the typed
# config, so these fallbacks apply to format 1 folders only, and nowhere else.
LEGACY_POLICY_DEFAULTS: dict[str, dict[str, Any]] = {
    "flow": {"num_inference_steps": 5, "time_sampling": "beta", "prediction_type": "velocity",
             "schedule_power": 1.0, "clip_prediction": False},
    "diffusion": {"prediction_type": "epsilon", "num_inference_steps": 100},
    "steer": {"noise_scale": 1.0, "actor_sampling": "mean", "latent": "full"},
    "residual": {"scale": 0.2, "n_action_steps": None},
    "value_guided": {"n_samples": 8},
}
LEGACY_SHARED_DEFAULTS: dict[str, Any] = {"denoiser": "unet", "encoder": {"crop": None},
                                          "unet": {"down_dims": [64, 128, 256]}}


# keys added after format 2 that change what a checkpoint builds or computes: a checkpoint without them was written
# before they existed, and means the value they had then (the VIB bottleneck's head was one linear layer; the
# normalized state was not clamped), whatever the default is now
LATER_KEYS: dict[str, dict[str, Any]] = {"encoder": {"bottleneck_hidden": 0, "bottleneck_mean": "learned"},
                                         "normalization": {"state_bound": None}}
# the same for the top-level keys of one policy: a vla written before the entity pointer was built without it, and
# one written before its hard selection, instruction dropout and cosine-only match had a soft, learned-match pointer
# trained on every instruction
LATER_POLICY_KEYS: dict[str, dict[str, Any]] = {"vla": {"pointer": False, "pointer_selection": "soft",
                                                        "pointer_learned_match": True, "instruction_dropout": 0.0}}


def policy_section(info: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's policy config, with missing keys filled by the values they meant when it was written."""
    section = dict(info["config"]["policy"])
    for key, values in LATER_KEYS.items():
        if isinstance(section.get(key), Mapping):
            section[key] = {**values, **section[key]}
    for key, value in LATER_POLICY_KEYS.get(section.get("name"), {}).items():
        section.setdefault(key, value)
    if int(info.get("format_version", 1)) >= 2:
        return section
    legacy = {**(LEGACY_SHARED_DEFAULTS if section.get("name") in ("flow", "diffusion") else {}),
              **LEGACY_POLICY_DEFAULTS.get(section.get("name"), {})}
    for key, value in legacy.items():
        if isinstance(value, Mapping):
            section[key] = {**value, **dict(section.get(key) or {})}
        else:
            section.setdefault(key, value)
    return section
