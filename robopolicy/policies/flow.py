"""Flow-matching policy (rectified flow): a denoiser predicts the velocity that carries noise to the
normalized action chunk, conditioned on the encoded observation history.

Path x_t = (1 - t) x0 + t x1 from noise x0 (t = 0) to data x1 (t = 1). With `prediction_type: sample` (the
default) the denoiser predicts the clean chunk x1 (loss ||x1_hat - x1||^2, a target the small MLP denoiser fits
well) and the velocity is (x1_hat - x_t) / (1 - t); with `velocity` it predicts x1 - x0 directly. Sampling
integrates the ODE from the given noise with a few Euler or midpoint steps, so the chunk is a deterministic function
of the noise (what latent-steering methods drive). An Euler step towards a clipped x1_hat is DDIM's step on the
straight path; `schedule_power` places the few steps (see `time_grid`).

Real-time chunking: with `prefix_actions` the first k actions are frozen and the rest is generated consistently
with them by inpainting with the policy's own denoiser: before every velocity evaluation the frozen part is set
to the prefix's point on the straight path, (1 - t) * noise + t * prefix (hard-mask inpainting, RePaint-style
without resampling, not the guided soft-mask version of the RTC paper).

Delay-aware (training-time real-time chunking, `max_delay > 0`): the denoiser is trained for the execution it will
meet. Each training chunk gets a committed prefix of k actions, k ~ U{0 .. n_obs_steps + max_delay} (0: the first
chunk of an episode, nothing committed): the prefix positions of x_t hold the clean actions (their flow time is 1)
and carry no loss, and the denoiser's condition gains the prefix mask [H]. Sampling with `prefix_actions` then
sets the prefix to the committed actions at every step and the denoiser, which has learned to continue a given
prefix, generates the rest: no inpainting approximation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from robopolicy.config import register_config, setting
from robopolicy.policies.base import ActionChunkPolicy, DenoiserPolicyConfig, PolicyConfigError, make_denoiser
from robopolicy.policies.encoders import EncoderConfig

# The sinusoidal step embedding is tuned for diffusion step indices (0..100), so flow time is scaled to match.
TIME_SCALE = 100.0


@register_config("policy", "flow")
@dataclass
class FlowConfig(DenoiserPolicyConfig):
    name: str = setting("flow", "the policy (its registry name)")
    num_inference_steps: int = setting(4, "Euler steps; 4 keeps a state-only chunk under 2 ms of CPU at batch 1")
    ode_solver: str = setting("euler", "euler | midpoint", choices=("euler", "midpoint"))
    schedule_power: float = setting(3.0, "sampler times t_i = 1 - (1 - i/N)^p: 1 uniform; > 1 one long first step")
    clip_prediction: bool = setting(True, "clip the predicted clean chunk to [-1, 1] at every step (min_max actions)")
    time_sampling: str = setting("uniform", "uniform | beta (pi0: more training at the noisy end)",
                                 choices=("uniform", "beta"))
    prediction_type: str = setting("sample", "sample (the clean chunk; velocity derived from it) | velocity",
                                   choices=("sample", "velocity"))
    def __post_init__(self) -> None:
        super().__post_init__()
        if self.schedule_power <= 0.0:
            raise PolicyConfigError(f"flow schedule_power must be positive, got {self.schedule_power}.")


@register_config("policy", "flow_image")
@dataclass
class FlowImageConfig(FlowConfig):
    """configs/policy/flow_image.yaml: a CPU-sized image encoder (patchify stem, half the channels), trained and
    sampled as the image recipe was measured."""

    encoder: EncoderConfig = setting(EncoderConfig(image_channels=[16, 32, 64], stem_stride=4), "observation encoder")
    schedule_power: float = setting(1.0, "sampler times t_i = 1 - (1 - i/N)^p: 1 uniform; > 1 one long first step")
    clip_prediction: bool = setting(False, "clip the predicted clean chunk to [-1, 1] at every step")
    time_sampling: str = setting("beta", "uniform | beta (pi0: more training at the noisy end)",
                                 choices=("uniform", "beta"))
    prediction_type: str = setting("velocity", "sample | velocity", choices=("sample", "velocity"))


class FlowPolicy(ActionChunkPolicy):
    name = "flow"
    config_class = FlowConfig
    supports_prefix = True
    denoising = True

    def __init__(self, config: FlowConfig, features: Mapping[str, Mapping],
                 stats: Mapping[str, Mapping[str, np.ndarray]] | None):
        super().__init__(config, features, stats)
        self.max_delay, self.delay_aware = config.max_delay, config.max_delay > 0
        self.denoiser = self.build_denoiser(config)
        self.num_inference_steps = config.num_inference_steps
        self.ode_solver, self.time_sampling = config.ode_solver, config.time_sampling
        self.prediction_type, self.schedule_power = config.prediction_type, config.schedule_power
        self.clip_sample = self.normalizer.modes["action"] == "min_max"
        self.clip_prediction = config.clip_prediction and self.clip_sample

    def build_denoiser(self, config: FlowConfig) -> Callable[..., torch.Tensor]:
        """`denoiser(x_t [B, H, A], timestep [B], condition) -> [B, H, A]`, the condition being `condition(obs)`."""
        # delay-aware: the condition gains the prefix mask [H]
        return make_denoiser(config, self.action_dim, self.obs_encoder.out_dim + self.delay_aware * self.horizon)

    def condition(self, obs: Mapping[str, torch.Tensor]):
        """What the denoiser is conditioned on, computed once per chunk: here the encoded observation [B, F]."""
        return self.encode(obs)

    def sample_time(self, batch_size: int, device: torch.device) -> torch.Tensor:
        if self.time_sampling == "uniform":
            return torch.rand(batch_size, device=device)
        # pi0's schedule: Beta(1.5, 1) on 1 - t puts more training on the noisy end (t near 0), where the
        # few-step sampler's first, largest step is taken.
        u = torch.distributions.Beta(1.5, 1.0).sample((batch_size,)).to(device)
        return 0.999 * (1.0 - u)

    def time_grid(self) -> list[float]:
        """The sampler's times t_0 = 0 < ... < t_N = 1: t_i = 1 - (1 - i/N)^p. p = 1 is uniform; p > 1 takes a
        long first step and ever shorter ones near the data, where the clean chunk is refined."""
        n = self.num_inference_steps
        return [1.0 - (1.0 - i / n) ** self.schedule_power for i in range(n + 1)]

    def clean_estimate(self, x: torch.Tensor, t: float, global_cond) -> torch.Tensor:
        """The denoiser's estimate of the clean chunk x1 from x_t, clipped to [-1, 1] with `clip_prediction`
        (as diffusers' DDIM clips its predicted original sample)."""
        timestep = torch.full((x.shape[0],), t * TIME_SCALE, device=x.device)
        out = self.denoiser(x, timestep, global_cond)
        x1 = out if self.prediction_type == "sample" else x + (1.0 - t) * out
        return x1.clamp(-1.0, 1.0) if self.clip_prediction else x1

    def velocity(self, x: torch.Tensor, t: float, global_cond) -> torch.Tensor:
        """dx/dt along the straight path towards the clean estimate."""
        return (self.clean_estimate(x, t, global_cond) - x) / (1.0 - t)

    def integrate(self, x: torch.Tensor, global_cond,
                  constrain: Callable[[torch.Tensor, float], torch.Tensor] | None = None) -> torch.Tensor:
        """The ODE from noise x (t = 0) to t = 1 over `time_grid`. `constrain(x_t, t)`, applied before every
        velocity evaluation, lets a caller pin part of the chunk (prefix inpainting)."""
        constrain = constrain or (lambda x_t, t: x_t)
        grid = self.time_grid()
        for t, t_next in zip(grid[:-1], grid[1:]):
            x = self.ode_step(constrain(x, t), t, t_next, global_cond, constrain)
        return x

    def ode_step(self, x: torch.Tensor, t: float, t_next: float, global_cond,
                 constrain: Callable[[torch.Tensor, float], torch.Tensor] | None = None) -> torch.Tensor:
        """One solver step from x_t to x_{t_next} (Euler or midpoint); also the mean of ReinFlow's noisy step."""
        dt = t_next - t
        if self.ode_solver == "euler":
            return torch.add(x, self.velocity(x, t, global_cond), alpha=dt)
        constrain = constrain or (lambda x_t, t: x_t)
        x_mid = constrain(torch.add(x, self.velocity(x, t, global_cond), alpha=0.5 * dt), t + 0.5 * dt)
        return torch.add(x, self.velocity(x_mid, t + 0.5 * dt, global_cond), alpha=dt)

    def denoising_inputs(self, batch_size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """A training draw: noise x0 [B, H, A] and flow time t [B]."""
        return torch.randn(batch_size, *self.noise_shape, device=device), self.sample_time(batch_size, device)

    def denoising_error(self, batch: Mapping[str, torch.Tensor], noise: torch.Tensor, time: torch.Tensor,
                        global_cond=None, prefix_len: torch.Tensor | None = None) -> torch.Tensor:
        """Squared error [B, H, A] of the denoiser on the batch's chunks carried to `time` along `noise`
        (`global_cond`: the batch's condition when the caller has it; `prefix_len` [B]: a delay-aware policy's
        committed prefix lengths, none when omitted)."""
        x1 = self.normalized_actions(batch)  # [B, H, A] data
        global_cond = self.condition(batch) if global_cond is None else global_cond
        t = time.to(x1.device)[:, None, None]
        x_t = (1 - t) * noise + t * x1
        if self.delay_aware:
            if prefix_len is None:
                prefix_len = torch.zeros(len(x1), dtype=torch.long, device=x1.device)
            mask = self.prefix_mask(prefix_len.to(x1.device))  # [B, H]
            x_t = torch.where(mask[..., None], x1, x_t)  # committed actions are clean: their flow time is 1
            global_cond = self.with_prefix_mask(global_cond, mask)
        prediction = self.denoiser(x_t, t.flatten() * TIME_SCALE, global_cond)
        target = x1 - noise if self.prediction_type == "velocity" else x1
        return (prediction - target) ** 2

    def condition_for_loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the denoiser's condition, the encoder's penalty: the VIB bottleneck's KL term while training, else 0)."""
        return self.encode_for_loss(batch)

    def loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        noise, time = self.denoising_inputs(len(batch["action"]), self.device)
        global_cond, penalty = self.condition_for_loss(batch)
        prefix_len = self.sample_prefix_len(len(noise), self.device)
        error = self.denoising_error(batch, noise, time, global_cond, prefix_len)
        loss = self.masked_mean(error, self.without_prefix(batch, prefix_len))
        return loss + penalty, {"loss": loss.item(), "encoder_penalty": penalty.item()}

    @torch.no_grad()
    def sample_chunk(self, obs: Mapping[str, torch.Tensor], noise: torch.Tensor | None = None,
                     prefix_actions: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:
            noise = self.draw_noise(len(obs[self.obs_keys[0]]), self.device)
        return self.sample_from_features(self.condition(obs), noise, prefix_actions)

    @torch.no_grad()
    def sample_from_features(self, global_cond, noise: torch.Tensor | None = None,
                             prefix_actions: torch.Tensor | None = None) -> torch.Tensor:
        """`sample_chunk` from the denoiser's condition (observation features [B, F]: what bottleneck steering
        perturbs)."""
        return self.unnormalize_actions(self.normalized_sample(global_cond, noise, prefix_actions))

    def normalized_sample(self, global_cond, noise: torch.Tensor | None = None,
                          prefix_actions: torch.Tensor | None = None) -> torch.Tensor:
        """`sample_from_features` in normalized action units, differentiable in `global_cond` and the denoiser
        (bottleneck steering's actor climbs its critic through it)."""
        device = self.device
        if noise is None:
            noise = self.draw_noise(global_cond.shape[0], device)
        noise = noise.to(device, torch.float32)
        constrain = None
        has_prefix = self.check_prefix(prefix_actions)
        if self.delay_aware:
            k = min(prefix_actions.shape[1], self.horizon) if has_prefix else 0
            prefix_len = torch.full((noise.shape[0],), k, dtype=torch.long, device=device)
            global_cond = self.with_prefix_mask(global_cond, self.prefix_mask(prefix_len))
        if has_prefix:
            prefix = self.normalized_prefix(prefix_actions, device)  # [B, k, A]
            k = prefix.shape[1]

            def constrain(x_t: torch.Tensor, t: float) -> torch.Tensor:
                x_t = x_t.clone()
                # delay-aware: the committed actions themselves (as trained); else their point on the path
                x_t[:, :k] = prefix if self.delay_aware else (1.0 - t) * noise[:, :k] + t * prefix
                return x_t

        x = self.integrate(noise, global_cond, constrain)
        if constrain is not None:
            x = constrain(x, 1.0)
        if self.clip_sample:
            x = x.clamp(-1.0, 1.0)
        return x
