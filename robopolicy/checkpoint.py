"""Policy checkpoints: a folder that rebuilds the policy on its own, loaded without pickle.

    dir/config.yaml         resolved run config; `policy:` holds the policy config (its `name` picks the class)
    dir/model.safetensors   weights incl. normalizer buffers; header metadata names the policy
    dir/features.json       feature specs, policy name, versions, format version, creation time, `extra`
    dir/extra.safetensors   optional tensors of a refinement method (noise policy, residual, value head...)

A run folder (`robopolicy train` or `finetune`) keeps its checkpoints under RUN/checkpoints/ with a symlink
RUN/checkpoints/last to the newest: `resolve_checkpoint` takes either a checkpoint or a run folder, `point_last`
moves the link.

Writes go to a temporary sibling folder that is renamed into place, so a killed process never leaves a half
checkpoint under the final name.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import robopolicy
from robopolicy.policies import POLICIES, ActionChunkPolicy, make_policy

FORMAT_VERSION = 1
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


def _plain(value: Any) -> Any:
    """JSON/YAML-safe copy of a config (OmegaConf containers, tuples and numpy values become plain types)."""
    try:
        from omegaconf import Container, OmegaConf

        if isinstance(value, Container):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # a robot computer without hydra only ever sees plain dicts
        pass
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return value.tolist()
    return value


def _write_and_sync(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(dir: str | os.PathLike, policy: ActionChunkPolicy, *, config: Mapping[str, Any],
                    extra_json: Mapping[str, Any] | None = None,
                    extra_tensors: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write the checkpoint folder `dir` atomically (replacing an existing one) and return its path."""
    final = Path(dir)
    config = _plain(config)
    config.setdefault("policy", _plain(policy.config))
    if config["policy"].get("name") != policy.name:
        raise CheckpointError(
            f"config['policy']['name'] is {config['policy'].get('name')!r} but the policy is {policy.name!r}; "
            f"pass the config the policy was built from."
        )
    info = {
        "format_version": FORMAT_VERSION,
        "policy": policy.name,
        "features": _plain(policy.features),
        "n_obs_steps": policy.n_obs_steps,
        "horizon": policy.horizon,
        "n_action_steps": policy.n_action_steps,
        "versions": {"robopolicy": robopolicy.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "extra": _plain(dict(extra_json or {})),
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


def _feature_mismatches(actual: Mapping[str, Mapping], expected: Mapping[str, Mapping],
                        allow_extra: bool) -> list[str]:
    problems = []
    wanted = {k: v for k, v in expected.items() if k.startswith("observation.") or k == "action"}
    missing = sorted(set(actual) - set(wanted))
    extra = sorted(set(wanted) - set(actual))
    if missing:
        problems.append(f"the policy needs {missing} which the expected features lack")
    if extra and not allow_extra:
        problems.append(f"the expected features have {extra} which the policy does not use")
    for key in sorted(set(actual) & set(wanted)):
        if list(actual[key]["shape"]) != list(wanted[key]["shape"]):
            problems.append(f"{key!r} has shape {list(actual[key]['shape'])} in the checkpoint but "
                            f"{list(wanted[key]['shape'])} expected")
        elif actual[key].get("dtype") != wanted[key].get("dtype"):
            problems.append(f"{key!r} has dtype {actual[key].get('dtype')} in the checkpoint but "
                            f"{wanted[key].get('dtype')} expected")
    return problems


def _load_tensors(path: Path, device: str | torch.device) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path), device=str(device)), metadata
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path} is damaged or truncated ({e}); re-save or re-download the checkpoint.") from e


def load_policy(dir: str | os.PathLike, *, expect_features: Mapping[str, Mapping] | None = None,
                device: str | torch.device = "cpu", allow_extra_features: bool = False,
                num_inference_steps: int | None = None) -> ActionChunkPolicy:
    """Rebuild the policy from the folder alone and load its weights strictly; returned in eval mode.

    `expect_features` (e.g. an environment's or robot's feature specs) must supply every feature the policy
    uses with the same shape and dtype; observation keys the policy does not use are an error unless
    `allow_extra_features`. `num_inference_steps` replaces the saved sampler step count of a flow or diffusion
    policy (the weights do not depend on it): more steps, slower chunks.
    """
    folder = Path(dir)
    info = read_checkpoint_info(folder)
    features = info["features"]
    if expect_features is not None:
        problems = _feature_mismatches(features, expect_features, allow_extra_features)
        if problems:
            raise CheckpointError(f"checkpoint {folder} does not fit the expected features: {'; '.join(problems)}.")
    policy_cfg = info["config"]["policy"]
    name = policy_cfg.get("name")
    if num_inference_steps is not None:
        if "num_inference_steps" not in policy_cfg:
            raise CheckpointError(f"{folder} holds a {name!r} policy, which has no sampler steps to set "
                                  "(num_inference_steps applies to flow and diffusion policies).")
        if int(num_inference_steps) < 1:
            raise CheckpointError(f"num_inference_steps must be at least 1, got {num_inference_steps}.")
        policy_cfg = {**policy_cfg, "num_inference_steps": int(num_inference_steps)}
    if name not in POLICIES:
        import robopolicy.rl  # noqa: F401  (registers the refined policies: steer, residual, value_guided)
    if name not in POLICIES:
        raise CheckpointError(
            f"{folder / CONFIG_FILE} names policy {name!r}, which is not registered (known: {sorted(POLICIES)})."
        )
    weights, metadata = _load_tensors(folder / WEIGHTS_FILE, device)
    saved_name = metadata.get("policy")
    if saved_name is not None and saved_name != name:
        raise CheckpointError(
            f"{folder / WEIGHTS_FILE} holds weights of policy {saved_name!r} but {CONFIG_FILE} configures "
            f"{name!r}; the files come from different checkpoints."
        )
    try:
        policy = make_policy(policy_cfg, features, stats=None)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{folder / CONFIG_FILE}: cannot build policy {name!r} ({e}).") from e
    expected = policy.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = [f"{k} {list(weights[k].shape)} vs {list(expected[k].shape)}"
              for k in sorted(set(expected) & set(weights)) if weights[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            details.append(f"{len(shapes)} of another shape (e.g. {shapes[0]})")
        raise CheckpointError(
            f"{folder / WEIGHTS_FILE} does not match the {name!r} policy configured in {CONFIG_FILE}: "
            f"{', '.join(details)} weights; the config was edited or the weights belong to another model."
        )
    policy.load_state_dict(weights, strict=True)
    return policy.to(device).eval()


def load_extra_tensors(dir: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Tensors saved with `extra_tensors=` (empty when none were saved)."""
    path = Path(dir) / EXTRA_TENSORS_FILE
    if not path.is_file():
        return {}
    return _load_tensors(path, device)[0]
