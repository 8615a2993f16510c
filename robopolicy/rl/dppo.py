"""DPPO (Ren et al. 2024): PPO fine-tuning of a diffusion policy, each denoising step a Gaussian policy step.

The base's sampler runs as usual for its first steps; its last `ft_denoising_steps` become Gaussian steps of a
two-level MDP (the environment's decision, then the denoising steps inside it):

    x_{k-1} ~ N(mu_theta(x_k, k, s), std_k^2),   log pi(x_{k-1} | x_k, s) with std_k clamped below at min_logprob_std
    chain ddpm (DPPO's, the default): mu = the DDPM posterior mean, std_k = its posterior std, at least
                          min_sampling_std (more noise at the earlier fine-tuned steps, which the later ones denoise)
    chain ddim:           mu = the deterministic DDIM step (eta 0), std_k = min_sampling_std

PPO (`chain_ppo.ChainPPO`) takes one clipped ratio per fine-tuned denoising step, its advantage (the decision's)
discounted by denoising_discount ** (steps to the final chunk). The fine-tuned network is saved as a plain
`diffusion` checkpoint with the chain's sampler: DDIM (eta 0) runs the ddim chain's means; DDPM samples the ddpm
chain with its own posterior stds (the minimum std is exploration only). The weights do not depend on the sampler,
so either chain fine-tunes a base trained with either.

One network serves every step: the earlier, unscored steps follow the fine-tuned weights too (DPPO keeps a frozen
copy for them, which a standalone checkpoint would have to carry).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from robopolicy.config import register_config, setting
from robopolicy.policies import ChunkPolicy, DiffusionPolicy
from robopolicy.rl.chain_ppo import (
    ChainPolicy,
    ChainPPO,
    ChainPPOConfig,
    make_chain_method,
)
from robopolicy.rl.collector import RewardSpec
from robopolicy.rl.ppo import RolloutStore


@register_config("algo", "dppo")
@dataclass
class DPPOConfig(ChainPPOConfig):
    name: str = setting("dppo", "the method (configs/algo/<name>.yaml)")
    ft_denoising_steps: int = setting(5, "the last this many sampler steps are fine-tuned Gaussian steps (at most the "
                                      "base's num_inference_steps)")
    # push-v3 noisy weak base (README), 1M env steps: ddim reached 0.9 over 100 episodes on seed 0 only (finals
    # 0.97, 0.78, 0.84 on seeds 0-2); ddpm on each of seeds 0-2, at 600k, 250k and 500k env steps. pick_place sloppy
    # base: ddim 0.93 at 100k, ddpm 0.94 at 160k
    chain: str = setting("ddpm", "ddim: each fine-tuned step is the deterministic DDIM step plus noise of std "
                         "min_sampling_std | ddpm: the DDPM posterior step with its own std, at least "
                         "min_sampling_std (DPPO's chain); the refined checkpoint samples with this sampler",
                         choices=("ddim", "ddpm"))
    min_sampling_std: float = setting(0.1, "std of the fine-tuned steps' exploration noise (normalized units; the "
                                      "ddpm chain's floor)")
    min_logprob_std: float = setting(0.1, "the std is clamped to at least this in the log-probability")
    denoising_discount: float = setting(0.99, "a denoising step k steps before the final chunk has its advantage "
                                        "discounted by this ** k")
    # push-v3 noisy weak base, seed 1, DDIM chain (README): 0.1 did not beat 1 (50-episode evaluations 0.52-0.66
    # against 0.66-0.78 over 300k-550k env steps), so DPPO's schedule is an option here, not the default
    first_step_clip: float = setting(1.0, "the first fine-tuned step's PPO clip as a fraction of ppo_clip, growing "
                                     "exponentially (rate clip_rate) to ppo_clip at the final step: DPPO's schedule "
                                     "(0.1: its clip_ploss_coef_base 1e-3 under 1e-2), which keeps the early steps, "
                                     "whose change moves every later step's input, closer to the base; 1: ppo_clip "
                                     "at every step")
    clip_rate: float = setting(3.0, "the exponential rate of the per-step clip schedule (DPPO's clip_ploss_coef_rate)")
    # measured on the pick_place sloppy diffusion base (README; DDIM chain): 0.46 -> 0.94 over 100 episodes at 140k
    # env steps with these; the shared defaults (actor_lr 1e-5, value network at 3e-4 on unscaled returns) reached
    # 0.76 at 100k
    actor_lr: float = setting(3.0e-5, "Adam learning rate of the fine-tuned denoiser")
    lr: float = setting(1.0e-3, "Adam learning rate of the value network")
    value_warmup: int = setting(2, "the first this many PPO updates train the value network only")
    normalize_returns: bool = setting(True, "fit the value network to returns over a running std of them")

    def __post_init__(self) -> None:
        if self.ft_denoising_steps < 1 or self.min_sampling_std <= 0.0:
            raise ValueError(f"dppo needs ft_denoising_steps >= 1 and min_sampling_std > 0, got "
                             f"{self.ft_denoising_steps} and {self.min_sampling_std}.")
        if not 0.0 < self.first_step_clip <= 1.0 or self.clip_rate <= 0.0:
            raise ValueError(f"dppo's first_step_clip is a fraction of ppo_clip in (0, 1] and its clip_rate is > 0, "
                             f"got {self.first_step_clip} and {self.clip_rate}.")


class DPPOPolicy(ChainPolicy):
    """A fine-tuned copy of a diffusion base whose last sampler steps are Gaussian policy steps."""

    name = "dppo"
    config_class = DPPOConfig
    base_class = DiffusionPolicy
    joint_ratio = False

    def build_chain(self, config: DPPOConfig) -> None:
        model = self.model
        if model.sampler != config.chain:  # the chain's steps are this sampler's; the saved checkpoint samples with it
            model.cfg = dataclasses.replace(model.cfg, sampler=config.chain)
            model.sampler = config.chain
            model.sample_scheduler = (DDIMScheduler if config.chain == "ddim" else DDPMScheduler).from_config(
                model.noise_scheduler.config)
            model.sample_scheduler.set_timesteps(model.cfg.num_inference_steps)
        self.chain = config.chain
        self.timesteps = model.sample_scheduler.timesteps
        self.ft_steps = min(config.ft_denoising_steps, len(self.timesteps))
        ft_timesteps = self.timesteps[len(self.timesteps) - self.ft_steps:]
        if config.chain == "ddpm":
            self.x0_coef, self.xt_coef, posterior_std = ddpm_posterior(model.sample_scheduler, ft_timesteps)
            self.stds = posterior_std.clamp(min=config.min_sampling_std)  # [K]
            self.scratch = torch.Generator()  # the scheduler's step draws noise this chain does not use
        else:
            self.stds = torch.full((self.ft_steps,), config.min_sampling_std)
        self.logprob_stds = self.stds.clamp(min=config.min_logprob_std)
        k = torch.arange(self.ft_steps, dtype=torch.float32)
        self.step_weights = config.denoising_discount ** (self.ft_steps - 1 - k)  # [K], 1 at the final step
        self.step_clip = config.ppo_clip * clip_schedule(self.ft_steps, config.first_step_clip, config.clip_rate)

    def sampler_step(self, cond: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                     generator: torch.Generator | None) -> torch.Tensor:
        """One unscored step of the sampler itself (before the fine-tuned steps): DDIM's (eta 0) or DDPM's, with its
        noise."""
        prediction = self.model.denoiser(x, t.expand(x.shape[0]), cond)
        kwargs = {"eta": 0.0} if self.chain == "ddim" else {"generator": generator}
        return self.model.sample_scheduler.step(prediction, t, x, **kwargs).prev_sample

    def step_mean(self, cond: torch.Tensor, x: torch.Tensor, t: torch.Tensor, k: int) -> torch.Tensor:
        """The k-th fine-tuned step's mean from x_t (differentiable in the denoiser): the deterministic DDIM step, or
        the DDPM posterior mean of the scheduler's clean-chunk estimate."""
        prediction = self.model.denoiser(x, t.expand(x.shape[0]), cond)
        if self.chain == "ddim":
            return self.model.sample_scheduler.step(prediction, t, x, eta=0.0).prev_sample
        x0 = self.model.sample_scheduler.step(prediction, t, x, generator=self.scratch).pred_original_sample
        return self.x0_coef[k] * x0 + self.xt_coef[k] * x

    def sample_chain(self, cond: torch.Tensor, generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(cond.shape[0], *self.noise_shape, generator=generator)
        first_ft = len(self.timesteps) - self.ft_steps
        for t in self.timesteps[:first_ft]:
            x = self.sampler_step(cond, x, t, generator)
        chain, log_probs = [x], []
        for k, t in enumerate(self.timesteps[first_ft:]):
            mean = self.step_mean(cond, x, t, k)
            x = mean + self.stds[k] * torch.randn(mean.shape, generator=generator)
            chain.append(x)
            log_probs.append(self.step_log_prob(x, mean, torch.full_like(mean, self.logprob_stds[k].item())))
        return torch.stack(chain, 1), torch.stack(log_probs, 1)

    def chain_log_prob(self, cond: torch.Tensor, chain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_probs = []
        for k, t in enumerate(self.timesteps[len(self.timesteps) - self.ft_steps:]):
            mean = self.step_mean(cond, chain[:, k], t, k)
            log_probs.append(self.step_log_prob(chain[:, k + 1], mean,
                                                torch.full_like(mean, self.logprob_stds[k].item())))
        entropy = torch.distributions.Normal(0.0, self.logprob_stds).entropy().sum() * self.scored_elements
        return torch.stack(log_probs, 1), entropy.expand(chain.shape[0])


def ddpm_posterior(scheduler: DDPMScheduler, timesteps: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DDPM posterior q(x_prev | x_t, x_0) = N(a x_0 + b x_t, std^2) of each of the scheduler's `timesteps` to
    its previous one (Ho et al. 2020, eq. 7; the coefficients diffusers' DDPMScheduler.step uses, with its
    "fixed_small" variance): [K] each."""
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
    a, b, std = [], [], []
    for t in timesteps.tolist():
        prev = int(scheduler.previous_timestep(t))
        abar_t = alphas_cumprod[t]
        abar_prev = alphas_cumprod[prev] if prev >= 0 else alphas_cumprod.new_tensor(1.0)  # x_0 itself after t = 0
        alpha_t = abar_t / abar_prev
        a.append(abar_prev.sqrt() * (1 - alpha_t) / (1 - abar_t))
        b.append(alpha_t.sqrt() * (1 - abar_prev) / (1 - abar_t))
        std.append(((1 - abar_prev) / (1 - abar_t) * (1 - alpha_t)).clamp(min=1e-20).sqrt())
    return tuple(torch.stack(v).float() for v in (a, b, std))


def clip_schedule(steps: int, first: float, rate: float) -> torch.Tensor:
    """[steps] fractions of ppo_clip: `first` at the first fine-tuned step, exponentially up to 1 at the final one."""
    if steps == 1:
        return torch.ones(1)
    t = torch.linspace(0.0, 1.0, steps)
    return first + (1.0 - first) * torch.expm1(rate * t) / math.expm1(rate)


def make_method(base: ChunkPolicy, base_ref: Mapping[str, str], algo: DPPOConfig, reward: RewardSpec, seed: int
                ) -> tuple[ChainPPO, RolloutStore]:
    policy = DPPOPolicy(algo, base, base_ref)
    return make_chain_method(policy, algo, seed, step_weights=policy.step_weights, step_clip=policy.step_clip)
