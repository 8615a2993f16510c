"""Flow-matching policy (rectified flow): a denoiser predicts the velocity that carries noise to the
normalized action chunk, conditioned on the encoded observation history.

Path x_t = (1 - t) x0 + t x1 from noise x0 (t = 0) to data x1 (t = 1); loss ||v(x_t, t) - (x1 - x0)||^2 over
the non-padded actions. With `prediction_type: sample` the denoiser predicts the clean chunk x1 instead (loss
||x1_hat - x1||^2) and the velocity is (x1_hat - x_t) / (1 - t): the same ODE, a target that is easier to fit
for the small MLP denoiser. Sampling integrates the ODE from the given noise with a few Euler or midpoint steps, so
the chunk is a deterministic function of the noise (what latent-steering methods drive).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from robopolicy.policies.base import ActionChunkPolicy, PolicyConfigError, make_denoiser

# The sinusoidal step embedding is tuned for diffusion step indices (0..100), so flow time is scaled to match.
TIME_SCALE = 100.0


class FlowPolicy(ActionChunkPolicy):
    name = "flow"

    def __init__(self, cfg: Mapping[str, Any], features: Mapping[str, Mapping],
                 stats: Mapping[str, Mapping[str, np.ndarray]] | None):
        super().__init__(cfg, features, stats)
        self.denoiser = make_denoiser(cfg, self.action_dim, self.obs_encoder.out_dim, self.horizon)
        self.num_inference_steps = int(cfg.get("num_inference_steps", 5))
        self.ode_solver = cfg.get("ode_solver", "euler")
        self.time_sampling = cfg.get("time_sampling", "beta")
        self.prediction_type = cfg.get("prediction_type", "velocity")
        if self.prediction_type not in ("velocity", "sample"):
            raise PolicyConfigError(f"flow prediction_type {self.prediction_type!r} is unknown; "
                                    "use 'velocity' or 'sample'.")
        if self.ode_solver not in ("euler", "midpoint"):
            raise PolicyConfigError(f"flow ode_solver {self.ode_solver!r} is unknown; use 'euler' or 'midpoint'.")
        if self.time_sampling not in ("uniform", "beta"):
            raise PolicyConfigError(f"flow time_sampling {self.time_sampling!r} is unknown; use 'uniform' or 'beta'.")
        self.clip_sample = self.normalizer.modes["action"] == "min_max"

    def sample_time(self, batch_size: int, device: torch.device) -> torch.Tensor:
        if self.time_sampling == "uniform":
            return torch.rand(batch_size, device=device)
        # pi0's schedule: Beta(1.5, 1) on 1 - t puts more training on the noisy end (t near 0), where the
        # few-step sampler's first, largest step is taken.
        u = torch.distributions.Beta(1.5, 1.0).sample((batch_size,)).to(device)
        return 0.999 * (1.0 - u)

    def velocity(self, x: torch.Tensor, t: float, global_cond: torch.Tensor) -> torch.Tensor:
        timestep = torch.full((x.shape[0],), t * TIME_SCALE, device=x.device)
        out = self.denoiser(x, timestep, global_cond)
        return out if self.prediction_type == "velocity" else (out - x) / (1.0 - t)

    def loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        x1 = self.normalized_actions(batch)  # [B, H, A] data
        global_cond = self.encode(batch)
        x0 = torch.randn_like(x1)  # noise
        t = self.sample_time(x1.shape[0], x1.device)[:, None, None]
        x_t = (1 - t) * x0 + t * x1
        prediction = self.denoiser(x_t, t.flatten() * TIME_SCALE, global_cond)
        target = x1 - x0 if self.prediction_type == "velocity" else x1
        loss = self.masked_mean((prediction - target) ** 2, batch)
        return loss, {"loss": loss.item()}

    @torch.no_grad()
    def sample_chunk(self, obs: Mapping[str, torch.Tensor], noise: torch.Tensor | None = None) -> torch.Tensor:
        global_cond = self.encode(obs)
        if noise is None:
            noise = torch.randn(global_cond.shape[0], *self.noise_shape, device=global_cond.device)
        x = noise.to(global_cond.device, torch.float32)
        dt = 1.0 / self.num_inference_steps
        for i in range(self.num_inference_steps):
            t = i * dt
            if self.ode_solver == "euler":
                x = torch.add(x, self.velocity(x, t, global_cond), alpha=dt)
            else:
                x_mid = torch.add(x, self.velocity(x, t, global_cond), alpha=0.5 * dt)
                x = torch.add(x, self.velocity(x_mid, t + 0.5 * dt, global_cond), alpha=dt)
        if self.clip_sample:
            x = x.clamp(-1.0, 1.0)
        return self.unnormalize_actions(x)
