"""Action-chunk policies behind one runtime (`ChunkPolicy`): `make_policy(cfg, features, stats)` and the
`POLICIES` registry.

A new policy is a module with an `ActionChunkPolicy` subclass, its config dataclass registered as
("policy", name) with `robopolicy.config.register_config`, and one `register_policy` call (or an entry below);
checkpoints find it through `config["policy"]["name"]`. Refined policies (`robopolicy.rl`) register themselves
the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from robopolicy.config import from_mapping
from robopolicy.data.spec import policy_features
from robopolicy.policies.base import ActionChunkPolicy, ChunkPolicy, PolicyConfig, PolicyConfigError
from robopolicy.policies.diffusion import DiffusionConfig, DiffusionPolicy
from robopolicy.policies.flow import FlowConfig, FlowPolicy
from robopolicy.policies.mlp import MLPConfig, MLPPolicy
from robopolicy.policies.normalizer import NormalizationError, Normalizer
from robopolicy.policies.vla import VLAConfig, VLAPolicy

POLICIES: dict[str, type[ChunkPolicy]] = {
    "diffusion": DiffusionPolicy,
    "flow": FlowPolicy,
    "mlp": MLPPolicy,
    "vla": VLAPolicy,
}


def register_policy(name: str) -> Callable[[type[ChunkPolicy]], type[ChunkPolicy]]:
    """Class decorator adding a policy to the registry under `name`."""

    def add(cls: type[ChunkPolicy]) -> type[ChunkPolicy]:
        POLICIES[name] = cls
        return cls

    return add


def policy_class(name: Any) -> type[ActionChunkPolicy]:
    """The class of a policy trained from data, by name; one sentence naming the choices otherwise."""
    cls = POLICIES.get(name)
    if cls is None or not issubclass(cls, ActionChunkPolicy):
        known = sorted(n for n, c in POLICIES.items() if issubclass(c, ActionChunkPolicy))
        raise PolicyConfigError(f"policy name {name!r} is unknown; choose one of {known}.")
    return cls


def policy_config(cfg: Mapping[str, Any] | PolicyConfig) -> PolicyConfig:
    """The typed, validated config of a policy from a mapping (a YAML section, a checkpoint's config)."""
    if isinstance(cfg, PolicyConfig):
        return cfg
    name = cfg.get("name") if isinstance(cfg, Mapping) else None
    return from_mapping(policy_class(name).config_class, cfg, where="policy")


def make_policy(cfg: Mapping[str, Any] | PolicyConfig, features: Mapping[str, Mapping],
                stats: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> ActionChunkPolicy:
    """Build the policy named by `cfg["name"]`. `stats=None` leaves identity normalization buffers
    (to be overwritten by a checkpoint's weights)."""
    config = policy_config(cfg)
    return policy_class(config.name)(config, features, stats)


__all__ = [
    "POLICIES", "ActionChunkPolicy", "ChunkPolicy", "DiffusionConfig", "DiffusionPolicy", "FlowConfig", "FlowPolicy",
    "MLPConfig", "MLPPolicy", "NormalizationError", "Normalizer", "PolicyConfig", "PolicyConfigError", "make_policy",
    "policy_class", "policy_config", "policy_features", "register_policy", "VLAConfig", "VLAPolicy",
]
