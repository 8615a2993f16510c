"""`load_policy`: rebuild any policy from its checkpoint folder, a refined one together with its verified base.

This sits above the policies and the refinement methods (it imports both registries), so neither imports a
loader: a refined policy receives its already-loaded base. Nothing is loaded with pickle.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

import robopolicy.rl  # noqa: F401  (registers the refined policies: steer, residual, value_guided)
from robopolicy.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_tensors,
    policy_section,
    read_checkpoint_info,
    verify_base,
)
from robopolicy.config import ConfigError
from robopolicy.data.spec import feature_problems, policy_features
from robopolicy.policies import POLICIES, ChunkPolicy, make_policy
from robopolicy.rl.refined import RefinedPolicy


def load_policy(dir: str | os.PathLike, *, expect_features: Mapping[str, Mapping] | None = None,
                device: str | torch.device = "cpu", allow_extra_features: bool = False,
                num_inference_steps: int | None = None) -> ChunkPolicy:
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
        problems = feature_problems(policy_features(features), policy_features(expect_features),
                                    extra_ok=allow_extra_features, check_dtype=True)
        if problems:
            raise CheckpointError(f"checkpoint {folder} does not fit the expected features: {'; '.join(problems)}.")
    section = policy_section(info)
    name = section.get("name")
    if name not in POLICIES:
        raise CheckpointError(
            f"{folder / CONFIG_FILE} names policy {name!r}, which is not registered (known: {sorted(POLICIES)})."
        )
    if num_inference_steps is not None:
        if "num_inference_steps" not in section:
            raise CheckpointError(f"{folder} holds a {name!r} policy, which has no sampler steps to set "
                                  "(num_inference_steps applies to flow and diffusion policies).")
        if int(num_inference_steps) < 1:
            raise CheckpointError(f"num_inference_steps must be at least 1, got {num_inference_steps}.")
        section["num_inference_steps"] = int(num_inference_steps)
    weights, metadata = load_tensors(folder / WEIGHTS_FILE, device)
    saved_name = metadata.get("policy")
    if saved_name is not None and saved_name != name:
        raise CheckpointError(
            f"{folder / WEIGHTS_FILE} holds weights of policy {saved_name!r} but {CONFIG_FILE} configures "
            f"{name!r}; the files come from different checkpoints."
        )
    try:
        cls = POLICIES[name]
        if issubclass(cls, RefinedPolicy):
            policy = _refined(cls, section, features, folder)
        else:
            policy = make_policy(section, features, stats=None)
    except (ConfigError, ValueError, KeyError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{folder / CONFIG_FILE}: cannot build policy {name!r} ({e}).") from e
    _check_weights(policy, weights, folder, name)
    policy.load_state_dict(weights, strict=True)
    return policy.to(device).eval()


def _refined(cls: type[RefinedPolicy], section: Mapping, features: Mapping, folder: Path) -> RefinedPolicy:
    """A refined policy on its base: the base is verified (hashed once) and loaded like any checkpoint."""
    base_path = verify_base(section.get("base"))
    base = load_policy(base_path)
    if feature_problems(policy_features(features), base.features, extra_ok=False, check_dtype=True):
        raise CheckpointError(f"the refined checkpoint {folder}'s features differ from those of its base "
                              f"{base_path}; the base was replaced by another model.")
    return cls(cls.config_from(section), base, section["base"])


def _check_weights(policy: torch.nn.Module, weights: Mapping[str, torch.Tensor], folder: Path, name: str) -> None:
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
