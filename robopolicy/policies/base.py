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

Capabilities are declared as class attributes, never probed: `supports_prefix`, `language`; `delay_aware` (the
policy was trained on committed prefixes, so the control node runs real-time chunking) comes from the config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from robopolicy.config import ConfigError, setting, to_dict
from robopolicy.data.spec import IMAGE_PREFIX, policy_features
from robopolicy.policies.encoders import EncoderConfig, ObservationEncoder
from robopolicy.policies.mlp_denoiser import MLPDenoiser
from robopolicy.policies.normalizer import NORM_MODES, Normalizer
from robopolicy.policies.transformer import TransformerDenoiser
from robopolicy.policies.unet1d import ConditionalUnet1D


class PolicyConfigError(ConfigError):
    """A policy config or its features are unusable; the message names the field."""


# ------------------------------------------------------------------------------------------------ configs


@dataclass
class NormalizationConfig:
    state: str = setting("min_max", "every low-dim observation key", choices=NORM_MODES)
    action: str = setting("min_max", "min_max keeps actions in [-1, 1], the scale of the noise (and clips samples)",
                          choices=NORM_MODES)
    images: str = setting("mean_std", "per channel; unit: [0, 1] -> [-1, 1]", choices=NORM_MODES)
    state_bound: float | None = setting(None, "clamp the normalized low-dim observations to [-b, b] (min_max from "
                                              "few demos can scale a barely moving feature 100x); null: no clamp")

    def __post_init__(self) -> None:
        if self.state_bound is not None and self.state_bound <= 0:
            raise PolicyConfigError(f"normalization.state_bound={self.state_bound} must be positive, or null.")


@dataclass
class OptimConfig:
    """The policy's own training recipe; `robopolicy train optim.*=...` overrides it per run."""

    lr: float = setting(1.0e-3, "AdamW learning rate (after warmup, cosine to 0)")
    weight_decay: float = setting(1.0e-6, "AdamW weight decay")
    betas: list[float] = setting([0.95, 0.999], "AdamW betas")
    warmup_steps: int = setting(100, "linear warmup steps")
    grad_clip: float = setting(1.0, "gradient norm clip")
    ema_decay: float = setting(0.995, "EMA of the weights, the one evaluated and saved")


@dataclass
class PolicyConfig:
    """Fields every policy has. A policy's own config subclasses it and is registered as ("policy", name)."""

    name: str = setting("", "the policy (its registry name)")
    horizon: int = setting(16, "actions per generated chunk")
    n_obs_steps: int = setting(2, "observation frames the policy sees")
    n_action_steps: int = setting(4, "actions executed per chunk (short open-loop segments matter at 10 Hz)")
    normalization: NormalizationConfig = setting(NormalizationConfig(), "per-key normalization modes")
    encoder: EncoderConfig = setting(EncoderConfig(), "observation encoder")
    optim: OptimConfig = setting(OptimConfig(), "training recipe")

    def __post_init__(self) -> None:
        if min(self.horizon, self.n_obs_steps, self.n_action_steps) < 1:
            raise PolicyConfigError("horizon, n_obs_steps and n_action_steps must be at least 1.")
        if self.n_obs_steps - 1 + self.n_action_steps > self.horizon:
            raise PolicyConfigError(
                f"n_obs_steps - 1 + n_action_steps = {self.n_obs_steps - 1 + self.n_action_steps} exceeds "
                f"horizon {self.horizon}; the executed actions must lie inside the chunk."
            )


@dataclass
class MLPDenoiserConfig:
    hidden_dim: int = setting(256, "width of the residual MLP blocks")
    n_blocks: int = setting(3, "residual blocks")
    step_embed_dim: int = setting(64, "sinusoidal step embedding width")


@dataclass
class UnetConfig:
    down_dims: list[int] = setting([32, 64, 128], "channels per U-Net level (horizon divisible by 2**(levels - 1))")
    kernel_size: int = setting(5, "temporal convolution kernel")
    n_groups: int = setting(8, "GroupNorm groups")
    step_embed_dim: int = setting(64, "sinusoidal step embedding width")


@dataclass
class TransformerConfig:
    d_model: int = setting(128, "token width")
    n_layers: int = setting(4, "decoder layers")
    n_heads: int = setting(4, "attention heads")
    dropout: float = setting(0.0, "dropout")


@dataclass
class DenoiserPolicyConfig(PolicyConfig):
    """Fields of the generative policies (flow, diffusion): the denoising network."""

    denoiser: str = setting("mlp", "mlp (fast, state tasks) | unet (Chi et al.'s 1-D U-Net) | transformer",
                            choices=("mlp", "unet", "transformer"))
    mlp: MLPDenoiserConfig = setting(MLPDenoiserConfig(), "denoiser: mlp")
    unet: UnetConfig = setting(UnetConfig(), "denoiser: unet")
    transformer: TransformerConfig = setting(TransformerConfig(), "denoiser: transformer")
    num_inference_steps: int = setting(4, "sampler steps")
    max_delay: int = setting(0, "delay-aware training (training-time RTC): > 0 trains on committed prefixes of up to "
                             "n_obs_steps + max_delay actions (the control node then runs rtc); 0: off")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_inference_steps < 1:
            raise PolicyConfigError(f"num_inference_steps must be at least 1, got {self.num_inference_steps}.")
        if self.max_delay < 0 or self.n_obs_steps + self.max_delay > self.horizon - 1:
            raise PolicyConfigError(f"max_delay must be between 0 and horizon - 1 - n_obs_steps = "
                                    f"{self.horizon - 1 - self.n_obs_steps}, got {self.max_delay}.")
        levels = len(self.unet.down_dims)
        if self.denoiser == "unet" and self.horizon % (2 ** (levels - 1)):
            raise PolicyConfigError(
                f"horizon {self.horizon} must be divisible by 2**(len(unet.down_dims) - 1) = {2 ** (levels - 1)}."
            )


# ------------------------------------------------------------------------------------------------ policies


class ChunkPolicy(nn.Module):
    """The root of every policy, trained from data or refined from a base (see the module docstring)."""

    name: str = ""
    supports_prefix: bool = False  # sample_chunk honours prefix_actions (real-time chunking)
    language: bool = False  # reads obs["task"], one instruction string per batch element
    delay_aware: bool = False  # trained to continue a committed prefix (training-time RTC; set from the config)
    # trained by a denoising loss whose noise and time a caller may fix: denoising_inputs(B) -> (noise, time) and
    # denoising_error(batch, noise, time) -> squared error [B, H, A] (what preference optimization compares)
    denoising: bool = False

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
    """Base of the policies trained from demonstrations: normalizer, observation encoder, masked loss.
    Built by `make_policy` from its typed config (`config_class`); `config` is kept for the checkpoint."""

    config_class: type[PolicyConfig] = PolicyConfig

    def __init__(self, config: PolicyConfig, features: Mapping[str, Mapping],
                 stats: Mapping[str, Mapping[str, np.ndarray]] | None):
        super().__init__()
        self.cfg = config
        self.features = policy_features(features)
        if "action" not in self.features:
            raise PolicyConfigError("the policy's features have no 'action' key; the store must record actions.")
        self.horizon, self.n_obs_steps, self.n_action_steps = config.horizon, config.n_obs_steps, config.n_action_steps
        self.action_dim = int(np.prod(self.features["action"]["shape"]))
        self.obs_keys = sorted(k for k in self.features if k.startswith("observation."))

        norm = config.normalization
        modes = {"action": norm.action}
        for key in self.obs_keys:
            modes[key] = norm.images if key.startswith(IMAGE_PREFIX) else norm.state
        self.normalizer = Normalizer(self.features, modes, stats, state_bound=norm.state_bound)
        self.obs_encoder = self.build_obs_encoder(config)

    def set_state_bound(self, bound: float | None) -> None:
        """Clamp the normalized low-dim observations to [-bound, bound] from now on (None: no clamp); kept in the
        config too, so a checkpoint saved afterwards applies it wherever it is loaded."""
        self.cfg.normalization = dataclasses.replace(self.cfg.normalization, state_bound=bound)
        self.normalizer.state_bound = bound

    def build_obs_encoder(self, config: PolicyConfig) -> nn.Module:
        """The module turning normalized observations into the policy's condition (the vla policy's differs)."""
        return ObservationEncoder(self.features, self.n_obs_steps, config.encoder)

    @property
    def config(self) -> dict:
        """The policy's config as plain data (what a checkpoint's config.yaml holds under `policy:`)."""
        return to_dict(self.cfg)

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

    def encode_for_loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [B, F], the encoder's penalty to add to the loss: beta * KL of a VIB bottleneck, else 0)."""
        features, kl = self.obs_encoder.encode_with_kl(self.normalize_obs(batch))
        return features, self.cfg.encoder.bottleneck_beta * kl.mean()

    def sample_from_features(self, global_cond: torch.Tensor, noise: torch.Tensor | None = None,
                             prefix_actions: torch.Tensor | None = None) -> torch.Tensor:
        """`sample_chunk` from given observation features [B, F] (what bottleneck steering perturbs)."""
        raise NotImplementedError

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

    def per_sample_error(self, error: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean of a per-element error [B, H, A] over each sample's actions that are not padding -> [B]."""
        if "action_is_pad" not in batch:
            return error.mean(dim=(1, 2))
        valid = (~torch.as_tensor(batch["action_is_pad"], device=error.device)).to(error.dtype)[..., None]
        return (error * valid).sum(dim=(1, 2)) / (valid.sum(dim=(1, 2)) * error.shape[-1]).clamp_min(1.0)

    # ---- delay-aware training (training-time real-time chunking; flow and diffusion set max_delay) ----
    max_delay: int = 0

    def prefix_mask(self, prefix_len: torch.Tensor) -> torch.Tensor:
        """[B] committed prefix lengths -> [B, H] bool, True on the committed positions."""
        return torch.arange(self.horizon, device=prefix_len.device)[None] < prefix_len[:, None]

    def with_prefix_mask(self, global_cond: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """A delay-aware denoiser's condition: [observation features [B, F], prefix mask [B, H]]."""
        return torch.cat([global_cond, mask.to(global_cond.dtype)], dim=-1)

    def sample_prefix_len(self, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """A training draw of committed prefix lengths [B], uniform over 0 .. n_obs_steps + max_delay (all 0 when
        the policy is not delay-aware)."""
        high = self.n_obs_steps + self.max_delay if self.delay_aware else 0
        return torch.randint(0, high + 1, (batch_size,), device=device)

    def without_prefix(self, batch: Mapping[str, torch.Tensor], prefix_len: torch.Tensor) -> Mapping[str, torch.Tensor]:
        """The batch with its committed prefix marked as padding: given to the denoiser, not predicted, no loss."""
        if not self.delay_aware:
            return batch
        pad = batch.get("action_is_pad")
        mask = self.prefix_mask(prefix_len.to(self.device))
        return {**batch, "action_is_pad": mask if pad is None else torch.as_tensor(pad, device=mask.device) | mask}

    def normalized_prefix(self, prefix_actions: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A committed prefix [B, k, A] in robot units -> normalized (clipped like the sampler's output)."""
        prefix = self.normalizer.normalize("action", prefix_actions[:, :self.horizon].to(device, torch.float32))
        return prefix.clamp(-1.0, 1.0) if self.normalizer.modes["action"] == "min_max" else prefix


def make_denoiser(cfg: DenoiserPolicyConfig, action_dim: int, cond_dim: int) -> nn.Module:
    """The network shared by diffusion (predicts epsilon or the clean chunk) and flow (predicts velocity or the
    clean chunk): `denoiser: mlp|unet|transformer`."""
    if cfg.denoiser == "unet":
        unet = cfg.unet
        return ConditionalUnet1D(action_dim, cond_dim, list(unet.down_dims), unet.kernel_size, unet.n_groups,
                                 unet.step_embed_dim)
    if cfg.denoiser == "transformer":
        tf = cfg.transformer
        return TransformerDenoiser(action_dim, cond_dim, cfg.horizon, tf.d_model, tf.n_layers, tf.n_heads, tf.dropout)
    mlp = cfg.mlp
    return MLPDenoiser(action_dim, cond_dim, cfg.horizon, mlp.hidden_dim, mlp.n_blocks, mlp.step_embed_dim)
