"""The policy contract (`ChunkPolicy`) and the pieces every policy trained from data shares
(`ActionChunkPolicy`: config fields, feature bookkeeping, the normalizer, the observation encoder and the masked
loss). Each method's own file (diffusion.py, flow.py, mlp.py) adds only `loss` and `sample_chunk`.

The runtime every caller uses (offline training, evaluation, every refinement method, the policy server):

    sample_chunk(obs, noise=None, prefix_actions=None) -> actions [B, horizon, A] in robot units
        obs            key -> [B, n_obs_steps, ...] (uint8 images [B, To, H, W, 3]); `obs["task"]`: the
                       instruction strings [B] for policies that declare `language`
        noise          THE ONE MEANING OF NOISE: a standard normal tensor [B, *noise_shape]. The chunk is a
                       deterministic function of (obs, noise, prefix_actions). None draws it from torch's global
                       generator. What a policy does with it is its own (a flow or diffusion sampler starts from it;
                       a steered policy uses it as its actor's epsilon; a residual passes it to its base; a
                       value-guided policy derives its candidates from it; a regression policy ignores it), so a
                       caller that wants reproducible chunks draws the noise itself from a seeded generator.
        prefix_actions [B, k, A] robot units, the actions already committed (real-time chunking): only for a
                       policy that declares `supports_prefix`; the returned chunk starts with them.
    noise_shape  (horizon, A);  encode(obs) -> features [B, F];  loss(batch) -> (loss, metrics)

Capabilities are declared as class attributes, never probed: `supports_prefix`, `language`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from robopolicy.data.spec import IMAGE_PREFIX, policy_features
from robopolicy.policies.encoders import ObservationEncoder
from robopolicy.policies.mlp_denoiser import MLPDenoiser
from robopolicy.policies.normalizer import Normalizer
from robopolicy.policies.transformer import TransformerDenoiser
from robopolicy.policies.unet1d import ConditionalUnet1D


class PolicyConfigError(ValueError):
    """A policy config or its features are unusable; the message names the field."""


class ChunkPolicy(nn.Module):
    """The root of every policy, trained from data or refined from a base (see the module docstring)."""

    name: str = ""
    supports_prefix: bool = False  # sample_chunk honours prefix_actions (real-time chunking)
    language: bool = False  # reads obs["task"], one instruction string per batch element

    features: dict[str, dict]
    n_obs_steps: int
    horizon: int
    n_action_steps: int
    action_dim: int
    obs_keys: list[str]

    @property
    def noise_shape(self) -> tuple[int, int]:
        return (self.horizon, self.action_dim)

    def encode(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError(f"{type(self).__name__} is not trained from a loss on demonstrations.")

    def sample_chunk(self, obs: Mapping[str, torch.Tensor], noise: torch.Tensor | None = None,
                     prefix_actions: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def check_prefix(self, prefix_actions: torch.Tensor | None) -> bool:
        """True when a non-empty prefix is given; refuses one for a policy that does not declare support."""
        if prefix_actions is None or prefix_actions.shape[1] == 0:
            return False
        if not self.supports_prefix:
            raise ValueError(f"the {self.name!r} policy cannot keep a committed prefix (supports_prefix is False).")
        return True

    def draw_noise(self, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Noise [B, *noise_shape] from torch's global generator (what `noise=None` means)."""
        return torch.randn(batch_size, *self.noise_shape, device=device)


class ActionChunkPolicy(ChunkPolicy):
    """Base of the policies trained from demonstrations: normalizer, observation encoder, masked loss."""

    def __init__(self, cfg: Mapping[str, Any], features: Mapping[str, Mapping],
                 stats: Mapping[str, Mapping[str, np.ndarray]] | None):
        super().__init__()
        self.config = dict(cfg)
        self.features = policy_features(features)
        if "action" not in self.features:
            raise PolicyConfigError("the policy's features have no 'action' key; the store must record actions.")
        for field in ("horizon", "n_obs_steps", "n_action_steps"):
            if field not in cfg:
                raise PolicyConfigError(f"policy config {cfg.get('name')!r} lacks the field {field!r}.")
        self.horizon = int(cfg["horizon"])
        self.n_obs_steps = int(cfg["n_obs_steps"])
        self.n_action_steps = int(cfg["n_action_steps"])
        if self.n_obs_steps - 1 + self.n_action_steps > self.horizon:
            raise PolicyConfigError(
                f"n_obs_steps - 1 + n_action_steps = {self.n_obs_steps - 1 + self.n_action_steps} exceeds "
                f"horizon {self.horizon}; the executed actions must lie inside the chunk."
            )
        self.action_dim = int(np.prod(self.features["action"]["shape"]))
        self.obs_keys = sorted(k for k in self.features if k.startswith("observation."))

        norm_cfg = dict(cfg.get("normalization") or {})
        modes = {"action": norm_cfg.get("action", "min_max")}
        for key in self.obs_keys:
            modes[key] = norm_cfg.get("images", "mean_std") if key.startswith(IMAGE_PREFIX) \
                else norm_cfg.get("state", "min_max")
        self.normalizer = Normalizer(self.features, modes, stats)
        self.obs_encoder = ObservationEncoder(self.features, self.n_obs_steps, dict(cfg.get("encoder") or {}))

    @property
    def device(self) -> torch.device:
        return self.normalizer.norms["action"].center.device

    def normalize_obs(self, obs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Normalized observations of the last `n_obs_steps` frames: low-dim [B, To, D], images [B, To, 3, H, W]."""
        out = {}
        for key in self.obs_keys:
            if key not in obs:
                raise KeyError(f"observation lacks {key!r}; this policy needs {self.obs_keys}.")
            x = torch.as_tensor(obs[key], device=self.device)[:, -self.n_obs_steps:]
            out[key] = self.normalizer.normalize(key, x)
        return out

    def encode(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Observation features [B, F] (the denoiser's global condition; reused by residual / value heads)."""
        return self.obs_encoder(self.normalize_obs(obs))

    def normalized_actions(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.normalizer.normalize("action", torch.as_tensor(batch["action"], device=self.device))

    def unnormalize_actions(self, action_chunk: torch.Tensor) -> torch.Tensor:
        return self.normalizer.unnormalize("action", action_chunk)

    def masked_mean(self, error: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean of a per-element error [B, H, A] over the actions that are not padding."""
        if "action_is_pad" not in batch:
            return error.mean()
        valid = (~torch.as_tensor(batch["action_is_pad"], device=error.device)).to(error.dtype)[..., None]
        return (error * valid).sum() / (valid.sum() * error.shape[-1]).clamp_min(1.0)

    def normalized_prefix(self, prefix_actions: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A committed prefix [B, k, A] in robot units -> normalized (clipped like the sampler's output)."""
        prefix = self.normalizer.normalize("action", prefix_actions[:, :self.horizon].to(device, torch.float32))
        return prefix.clamp(-1.0, 1.0) if self.normalizer.modes["action"] == "min_max" else prefix


def make_denoiser(cfg: Mapping[str, Any], action_dim: int, cond_dim: int, horizon: int) -> nn.Module:
    """The network shared by diffusion (predicts epsilon or the clean chunk) and flow (predicts velocity or the
    clean chunk): `denoiser: mlp|unet|transformer`."""
    kind = cfg.get("denoiser", "unet")
    if kind == "unet":
        unet = dict(cfg.get("unet") or {})
        down_dims = list(unet.get("down_dims", [64, 128, 256]))
        if horizon % (2 ** (len(down_dims) - 1)):
            raise PolicyConfigError(
                f"horizon {horizon} must be divisible by 2**(len(unet.down_dims) - 1) = {2 ** (len(down_dims) - 1)}."
            )
        return ConditionalUnet1D(action_dim, cond_dim, down_dims, int(unet.get("kernel_size", 5)),
                                 int(unet.get("n_groups", 8)), int(unet.get("step_embed_dim", 64)))
    if kind == "transformer":
        tf = dict(cfg.get("transformer") or {})
        return TransformerDenoiser(action_dim, cond_dim, horizon, int(tf.get("d_model", 128)),
                                   int(tf.get("n_layers", 4)), int(tf.get("n_heads", 4)), float(tf.get("dropout", 0.0)))
    if kind == "mlp":
        mlp = dict(cfg.get("mlp") or {})
        return MLPDenoiser(action_dim, cond_dim, horizon, int(mlp.get("hidden_dim", 256)), int(mlp.get("n_blocks", 3)),
                           int(mlp.get("step_embed_dim", 64)))
    raise PolicyConfigError(f"policy config denoiser {kind!r} is unknown; use 'mlp', 'unet' or 'transformer'.")
