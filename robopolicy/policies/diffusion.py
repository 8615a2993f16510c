"""Diffusion policy (Chi et al. 2023): a denoiser predicts the noise added to a normalized action chunk
(`prediction_type: epsilon`) or the clean chunk itself (`sample`), conditioned on the encoded observation history.

Training: DDPM forward process (diffusers `DDPMScheduler`, squaredcos_cap_v2, 100 steps), MSE to the predicted
quantity over the non-padded actions. The small MLP denoiser fits the clean chunk far better than the noise
(normalized error on training windows ~0.07 vs ~0.35 on builtin/pick_place, 3000 steps). Sampling: DDIM with eta = 0 (deterministic given the initial noise, ~10 steps) or ancestral
DDPM (`sampler: ddpm`, stochastic even for a fixed initial noise).

Real-time chunking: with `prefix_actions` the first k actions are frozen; at every sampling step the frozen part
is replaced by the prefix carried to the same noise level by the forward process q(x_t | prefix) with the same
noise, so the denoiser always sees a coherent chunk (hard-mask inpainting). A delay-aware policy (`max_delay > 0`,
trained as flow.py describes: clean committed prefixes, no loss on them, the prefix mask in the condition) is given
the committed actions themselves at every step instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from robopolicy.config import register_config, setting
from robopolicy.policies.base import ActionChunkPolicy, DenoiserPolicyConfig, OptimConfig, make_denoiser


@register_config("policy", "diffusion")
@dataclass
class DiffusionConfig(DenoiserPolicyConfig):
    name: str = setting("diffusion", "the policy (its registry name)")
    num_train_timesteps: int = setting(100, "DDPM training steps")
    beta_schedule: str = setting("squaredcos_cap_v2", "diffusers beta schedule")
    prediction_type: str = setting("sample", "sample (the clean chunk: fits far better with the mlp denoiser) | "
                                   "epsilon (Chi et al.)", choices=("sample", "epsilon"))
    sampler: str = setting("ddim", "ddim (eta 0, deterministic given the noise) | ddpm (ancestral, stochastic)",
                           choices=("ddim", "ddpm"))
    num_inference_steps: int = setting(10, "sampler steps")


@register_config("policy", "diffusion_transformer")
@dataclass
class DiffusionTransformerConfig(DiffusionConfig):
    """configs/policy/diffusion_transformer.yaml: action steps as tokens, condition tokens prepended."""

    n_action_steps: int = setting(8, "actions executed per chunk")
    denoiser: str = setting("transformer", "mlp | unet | transformer", choices=("mlp", "unet", "transformer"))
    prediction_type: str = setting("epsilon", "sample | epsilon (Chi et al.)", choices=("sample", "epsilon"))
    optim: OptimConfig = setting(OptimConfig(lr=3.0e-4, weight_decay=1.0e-4), "training recipe")


class DiffusionPolicy(ActionChunkPolicy):
    name = "diffusion"
    config_class = DiffusionConfig
    supports_prefix = True
    denoising = True

    def __init__(self, config: DiffusionConfig, features: Mapping[str, Mapping],
                 stats: Mapping[str, Mapping[str, np.ndarray]] | None):
        super().__init__(config, features, stats)
        self.max_delay, self.delay_aware = config.max_delay, config.max_delay > 0
        # delay-aware: the condition gains the prefix mask [H]
        self.denoiser = make_denoiser(config, self.action_dim, self.obs_encoder.out_dim + self.delay_aware * self.horizon)
        schedule = dict(
            num_train_timesteps=config.num_train_timesteps,
            beta_schedule=config.beta_schedule,
            # Clipping the predicted clean chunk to [-1, 1] is only right when actions are min/max normalized.
            clip_sample=self.normalizer.modes["action"] == "min_max",
            prediction_type=config.prediction_type,
        )
        self.prediction_type, self.sampler = config.prediction_type, config.sampler
        self.noise_scheduler = DDPMScheduler(**schedule)
        self.sample_scheduler = (DDIMScheduler if self.sampler == "ddim" else DDPMScheduler)(**schedule)
        self.sample_scheduler.set_timesteps(config.num_inference_steps)

    def denoising_inputs(self, batch_size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """A training draw: noise [B, H, A] and DDPM timesteps [B]."""
        noise = torch.randn(batch_size, *self.noise_shape, device=device)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (batch_size,), device=device)
        return noise, timesteps

    def denoising_error(self, batch: Mapping[str, torch.Tensor], noise: torch.Tensor, time: torch.Tensor,
                        global_cond: torch.Tensor | None = None, prefix_len: torch.Tensor | None = None) -> torch.Tensor:
        """Squared error [B, H, A] of the denoiser on the batch's chunks noised to timesteps `time` with `noise`
        (`global_cond`: the batch's observation features when the caller has them; `prefix_len` [B]: a delay-aware
        policy's committed prefix lengths, none when omitted)."""
        action_chunk = self.normalized_actions(batch)  # [B, H, A] in normalized units
        global_cond = self.encode(batch) if global_cond is None else global_cond  # [B, F]
        timesteps = time.to(action_chunk.device)
        noisy = self.noise_scheduler.add_noise(action_chunk, noise, timesteps)
        if self.delay_aware:
            if prefix_len is None:
                prefix_len = torch.zeros(len(action_chunk), dtype=torch.long, device=action_chunk.device)
            mask = self.prefix_mask(prefix_len.to(action_chunk.device))  # [B, H]
            noisy = torch.where(mask[..., None], action_chunk, noisy)  # committed actions are given clean
            global_cond = self.with_prefix_mask(global_cond, mask)
        prediction = self.denoiser(noisy, timesteps, global_cond)
        target = noise if self.prediction_type == "epsilon" else action_chunk
        return (prediction - target) ** 2

    def loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        noise, timesteps = self.denoising_inputs(len(batch["action"]), self.device)
        global_cond, penalty = self.encode_for_loss(batch)  # the VIB bottleneck's KL term, else 0
        prefix_len = self.sample_prefix_len(len(noise), self.device)
        error = self.denoising_error(batch, noise, timesteps, global_cond, prefix_len)
        loss = self.masked_mean(error, self.without_prefix(batch, prefix_len))
        return loss + penalty, {"loss": loss.item(), "encoder_penalty": penalty.item()}

    @torch.no_grad()
    def sample_chunk(self, obs: Mapping[str, torch.Tensor], noise: torch.Tensor | None = None,
                     prefix_actions: torch.Tensor | None = None) -> torch.Tensor:
        return self.sample_from_features(self.encode(obs), noise, prefix_actions)

    @torch.no_grad()
    def sample_from_features(self, global_cond: torch.Tensor, noise: torch.Tensor | None = None,
                             prefix_actions: torch.Tensor | None = None) -> torch.Tensor:
        batch_size = global_cond.shape[0]
        if noise is None:
            noise = self.draw_noise(batch_size, global_cond.device)
        noise = noise.to(global_cond.device, torch.float32)
        prefix = self.normalized_prefix(prefix_actions, global_cond.device) if self.check_prefix(prefix_actions) \
            else None
        if self.delay_aware:
            prefix_len = torch.full((batch_size,), 0 if prefix is None else prefix.shape[1], device=global_cond.device)
            global_cond = self.with_prefix_mask(global_cond, self.prefix_mask(prefix_len))
        action_chunk = noise
        step_kwargs = {"eta": 0.0} if self.sampler == "ddim" else {}
        for t in self.sample_scheduler.timesteps:
            if prefix is not None:  # delay-aware: the prefix itself (as trained); else q(x_t | prefix), same noise
                action_chunk = action_chunk.clone()
                k = prefix.shape[1]
                action_chunk[:, :k] = prefix if self.delay_aware else \
                    self.noise_scheduler.add_noise(prefix, noise[:, :k], t.reshape(1))
            prediction = self.denoiser(action_chunk, t.expand(batch_size).to(global_cond.device), global_cond)
            action_chunk = self.sample_scheduler.step(prediction, t, action_chunk, **step_kwargs).prev_sample
        if prefix is not None:
            action_chunk = action_chunk.clone()
            action_chunk[:, :prefix.shape[1]] = prefix
        return self.unnormalize_actions(action_chunk)
