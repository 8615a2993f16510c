"""Refined policies: a frozen base plus a refinement method's own module, behind the same `ChunkPolicy` runtime.

A refined policy receives its already-loaded base (constructors do no file I/O: `robopolicy.loading.load_policy`
verifies and loads the base, so a refined policy can also be built on an in-memory base in a test). The base is
kept out of `state_dict`, so a refined checkpoint holds only the method's own weights; its config.yaml policy
section holds the method's runtime settings and names the base by path and sha256 (`base_reference`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from robopolicy.checkpoint import save_checkpoint
from robopolicy.config import from_mapping, to_dict
from robopolicy.policies.base import ChunkPolicy, PolicyConfigError


def dummy_observation(features: Mapping[str, Mapping], n_obs_steps: int, batch: int = 1) -> dict[str, torch.Tensor]:
    obs = {}
    for key, spec in features.items():
        if key.startswith("observation."):
            dtype = torch.uint8 if spec["dtype"] == "uint8" else torch.float32
            obs[key] = torch.zeros(batch, n_obs_steps, *spec["shape"], dtype=dtype)
    obs["task"] = [""] * batch  # read only by language policies
    return obs


class RefinedPolicy(ChunkPolicy):
    """A frozen base plus the method's module. Subclasses set `name`, `config_class` (the method's config
    dataclass) and `runtime_fields` (the settings a refined checkpoint keeps), build their module in `build()` and
    implement `sample_chunk(obs, noise)`; `noise` keeps the meaning of `ChunkPolicy` (see each subclass for what it
    drives). Refined policies cannot keep a committed prefix (`supports_prefix` False): their decision is made
    once per chunk from the observation alone."""

    config_class: type = object
    runtime_fields: tuple[str, ...] = ()

    def __init__(self, config: Any, base: ChunkPolicy, base_ref: Mapping[str, str],
                 n_action_steps: int | None = None):
        super().__init__()
        self.cfg = config
        self.base_ref = dict(base_ref)
        object.__setattr__(self, "_base", base.requires_grad_(False).eval())  # not a submodule: see above
        self.features = base.features
        self.language = base.language  # the base reads obs["task"]: every caller hands the instruction on
        self.n_obs_steps, self.horizon, self.n_action_steps = base.n_obs_steps, base.horizon, base.n_action_steps
        if n_action_steps is not None:  # decide more often than the base: run each chunk's first k steps
            if not 1 <= n_action_steps <= base.n_action_steps:
                raise PolicyConfigError(f"n_action_steps={n_action_steps}: a refined policy executes between 1 "
                                        f"and the base's {base.n_action_steps} steps of each chunk.")
            self.n_action_steps = n_action_steps
        self.action_dim = base.action_dim
        self.obs_keys = sorted(k for k in self.features if k.startswith("observation."))
        with torch.no_grad():
            self.feature_dim = int(base.encode(dummy_observation(self.features, self.n_obs_steps)).shape[-1])
        self.build(config)

    @classmethod
    def config_from(cls, section: Mapping[str, Any]) -> Any:
        """The method config from a refined checkpoint's policy section (its runtime fields)."""
        settings = {k: v for k, v in section.items() if k not in ("name", "base")}
        unknown = sorted(set(settings) - set(cls.runtime_fields))
        if unknown:
            raise PolicyConfigError(f"policy.{unknown[0]} is not a setting of a {cls.name!r} refined policy; "
                                    f"known: {', '.join(cls.runtime_fields)}.")
        return from_mapping(cls.config_class, settings, where="policy")

    @property
    def config(self) -> dict[str, Any]:
        """The checkpoint's policy section: name, base reference and the runtime settings."""
        settings = to_dict(self.cfg)
        return {"name": self.name, "base": dict(self.base_ref), **{k: settings[k] for k in self.runtime_fields}}

    @property
    def base(self) -> ChunkPolicy:
        return self._base

    def build(self, config: Any) -> None:
        raise NotImplementedError

    def standalone(self) -> ChunkPolicy | None:
        """None: the refined checkpoint holds the method's module on its base. A method that fine-tunes the base's
        own weights (reinflow, dppo) returns the fine-tuned policy, saved as a plain checkpoint without the base."""
        return None

    @property
    def n_exec(self) -> int:
        return self.n_action_steps

    @property
    def exec_slice(self) -> slice:
        """The chunk indices executed at run time (from n_obs_steps - 1, n_action_steps of them)."""
        return slice(self.n_obs_steps - 1, self.n_obs_steps - 1 + self.n_action_steps)

    @property
    def device(self) -> torch.device:
        return self.base.device

    def encode(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.base.encode(obs)

    def normalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        return self.base.normalizer.normalize("action", actions)

    def _apply(self, fn, recurse: bool = True):  # .to(device) / .float() move the hidden base too
        self.base._apply(fn, recurse)
        return super()._apply(fn, recurse)


def save_refined(folder: str | Path, policy: RefinedPolicy, config: Mapping[str, Any],
                 extra_json: Mapping[str, Any] | None = None) -> Path:
    """A checkpoint folder `load_policy` reads like any other; config.yaml's policy section names the base."""
    return save_checkpoint(folder, policy, config={**dict(config), "policy": policy.config},
                           extra_json={"base": policy.base_ref, **dict(extra_json or {})})
