"""Action-chunk policies behind one runtime: `make_policy(cfg, features, stats)` and the `POLICIES` registry.

A new policy is a module with an `ActionChunkPolicy` subclass and one `register_policy` call; checkpoints
find it through `config["policy"]["name"]`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from robopolicy.policies.base import ActionChunkPolicy, PolicyConfigError, policy_features
from robopolicy.policies.diffusion import DiffusionPolicy
from robopolicy.policies.flow import FlowPolicy
from robopolicy.policies.mlp import MLPPolicy
from robopolicy.policies.normalizer import NormalizationError, Normalizer

POLICIES: dict[str, type[ActionChunkPolicy]] = {
    "diffusion": DiffusionPolicy,
    "flow": FlowPolicy,
    "mlp": MLPPolicy,
}


def register_policy(name: str) -> Callable[[type[ActionChunkPolicy]], type[ActionChunkPolicy]]:
    """Class decorator adding a policy to the registry under `name`."""

    def add(cls: type[ActionChunkPolicy]) -> type[ActionChunkPolicy]:
        POLICIES[name] = cls
        return cls

    return add


def policy_config_dict(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A plain dict from a dict or an OmegaConf DictConfig (resolved)."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # the robot computer may run policies without hydra installed
        return dict(cfg)
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def make_policy(cfg: Mapping[str, Any], features: Mapping[str, Mapping],
                stats: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> ActionChunkPolicy:
    """Build the policy named by `cfg["name"]`. `stats=None` leaves identity normalization buffers
    (to be overwritten by a checkpoint's weights)."""
    cfg = policy_config_dict(cfg)
    name = cfg.get("name")
    if name not in POLICIES:
        raise PolicyConfigError(f"policy name {name!r} is unknown; choose one of {sorted(POLICIES)}.")
    return POLICIES[name](cfg, features, stats)


__all__ = [
    "POLICIES", "ActionChunkPolicy", "DiffusionPolicy", "FlowPolicy", "MLPPolicy", "NormalizationError",
    "Normalizer", "PolicyConfigError", "make_policy", "policy_config_dict", "policy_features", "register_policy",
]
