"""Defaults derived from the task and the base, measured at the start of `robopolicy finetune`.

The README's refinement recipes differ by task family only through a few measurable properties, so `finetune`
measures them on the base's own evaluation episodes (which it runs anyway) and fills the settings the user did not
give, printing each choice and why; settings given on the command line always win.

    measured (TaskProfile)                     sets (when not given)
    the task's reward: shaped or 0/1           reward: dense for the methods that learn from a shaped reward
                                               (residual, reinflow, dppo, steer with latent=bottleneck), else sparse
    the largest reward of a step short of      reward_scale: 2 / m rounded down to two digits when m > 2
    success, m (90th percentile over episodes)  (MetaWorld's shaped reward nears 10 per step close to the goal:
                                               0.2), else 1, so no step's reward outweighs the step penalty:
                                               hovering near the goal never pays
    the reward family                          step_penalty: 2 on the shaped reward (hovering near the goal must
                                               cost more than finishing), 1 on the sparse one (DSRL's offset)
    the task's episode limit (env steps)       residual and bottleneck steering on long-horizon tasks
                                               (> LONG_EPISODE steps: MetaWorld's 300; the built-in tasks' 60-200):
                                               per-step decisions (n_action_steps 1, as ResiP) with 10-step TD
                                               reinflow and dppo on long-horizon tasks: PPO updates on 2048 chunk
                                               decisions (minibatches of 512), as many episodes per update as 512
                                               hold on the built-in tasks, with ppo_clip 0.03 and actor_lr 4.5e-5
    the base's noise authority                 steer / value_guided on a base whose sampler noise barely moves its
                                               actions: says so and names the method that will work

Noise authority: the spread (std over sampler noises, in the base's normalized action units) of the executed
actions at the tasks' first observations, as benchmarks/noise_authority.py measures it over a store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from einops import rearrange, repeat

LONG_EPISODE = 250  # env steps of the task's episode limit: MetaWorld's is 300, the built-in tasks' 60-200
# mean std of executed normalized actions over noises, below which steering has nothing to pick from; measured:
# a push-v3 base cloned from 5 expert demos 0.017, from 30 noisy demos 0.31; a pick_place base from sloppy demos 0.15
LOW_AUTHORITY = 0.05
DENSE_STEP_PENALTY = 2.0  # the README's recipes on the shaped reward
# learn best from the task's shaped reward; steer_bottleneck: steer with algo.latent=bottleneck, a residual on a VIB
# latent (ZPRL) that moves the base's actions as a residual on them does
SHAPED_METHODS = ("residual", "residual_ppo", "reinflow", "dppo", "steer_bottleneck")
PER_STEP_METHODS = ("residual", "residual_ppo", "steer_bottleneck")  # per-step decisions on long episodes
# chunk decisions per PPO update (and per minibatch) for the chain methods on long episodes, and the wider trust
# region and step that a gradient over 4x the decisions affords; measured on the push-v3 noisy weak bases (README,
# seed 0, 1M env steps): with 512 / 128 (the defaults, ~10 of its episodes per update) reinflow fell from 0.48 to
# 0.16 by 250k; scoring the whole chunk, 2048 / 512 ended at 0.83 (0.80 in a rerun) and with ppo_clip 0.03 and
# actor_lr 4.5e-5 at 0.89; scoring the executed steps (score_executed, the default), these reached 0.91 over 100
# episodes at 550k and ended at 0.99 (seeds 1 and 2: 0.91 at 1M, 0.92 at 750k). dppo's DDIM chain with them: 0.91 at
# 750k (seeds 1 and 2 did not reach it: 0.78 and 0.84 at 1M; with 512 / 128 it swung between 0.24 and 0.64 through
# 450k); its DDPM chain (the default now) with them: 0.9 on seeds 0 / 1 / 2 at 600k / 250k / 500k
LARGE_ROLLOUT_METHODS = ("reinflow", "dppo")
LONG_ROLLOUT, LONG_MINIBATCH = 2048, 512
LONG_CLIP, LONG_ACTOR_LR = 0.03, 4.5e-5
STEERING_METHODS = ("steer", "steer_na", "value_guided")  # choose among the base's own chunks


@dataclass
class TaskProfile:
    episodes: int
    base_success: float
    mean_length: float  # env steps per base episode
    horizon: int | None  # the task's episode limit in env steps (None: unknown; the base's mean length stands in)
    step_reward: float  # 90th percentile over episodes of the largest reward of a step short of success
    shaped: bool  # the task's reward is not only 0/1 on success
    noise_authority: float | None  # mean std of executed normalized actions over sampler noises (None: not measured)

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class Choice:
    key: str  # "reward", "algo.n_step", ...
    value: Any
    why: str


@dataclass
class Derived:
    choices: list[Choice] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)  # what the user should know (a method that will not work)

    def set(self, explicit: set[str], key: str, value: Any, why: str) -> None:
        if key not in explicit:
            self.choices.append(Choice(key, value, why))


def floor_2_digits(x: float) -> float:
    """x (> 0) rounded down to two significant digits: a reward scale rounded up (2 / 9.6 = 0.208 to 0.21) would put
    the largest step's scaled reward above the step penalty, so that hovering there pays."""
    unit = 10.0 ** (math.floor(math.log10(x)) - 1)
    return round(math.floor(x / unit + 1e-9) * unit, 12)


def profile_task(base_eval: dict, policy, first_observations: dict[str, np.ndarray] | None = None,
                 horizon: int | None = None) -> TaskProfile:
    """The profile from the base's evaluation (`evaluate`'s summary with per_episode), the task's first
    observations [B, ...] (for the noise authority) and its episode limit, when given."""
    episodes = base_eval["per_episode"]
    returns = np.array([e["return"] for e in episodes], dtype=np.float64)
    lengths = np.array([max(e["length"], 1) for e in episodes], dtype=np.float64)
    successes = np.array([e["success"] for e in episodes], dtype=bool)
    sparse_returns = np.where(successes, 1.0, 0.0)
    authority = None
    if first_observations is not None and getattr(policy, "denoising", False) and not policy.language:
        authority = noise_authority(policy, first_observations)
    return TaskProfile(episodes=len(episodes), base_success=float(successes.mean()),
                       mean_length=float(lengths.mean()), horizon=horizon,
                       step_reward=float(np.percentile([abs(e.get("max_step_reward", 0.0)) for e in episodes], 90)),
                       shaped=not np.allclose(returns, sparse_returns), noise_authority=authority)


def derive_defaults(profile: TaskProfile, method: str, explicit: set[str], given_reward: str = "sparse") -> Derived:
    """The settings to fill (those not in `explicit`, as dotted keys) and advice, for `method` on this task;
    `given_reward`: the reward setting as configured (what counts when `reward` is explicit)."""
    out = Derived()
    if "reward" in explicit:
        reward = given_reward
    elif profile.shaped and method in SHAPED_METHODS:
        reward = "dense"
        out.set(explicit, "reward", reward, f"{method} learns from the task's shaped reward")
    else:
        reward = "sparse"
        out.set(explicit, "reward", reward, "the task's reward is 0/1 on success only" if method in SHAPED_METHODS
                else f"{method} works from success alone (DSRL's setting)")
    if reward == "dense":
        m = profile.step_reward
        scale = 1.0 if m <= DENSE_STEP_PENALTY else floor_2_digits(DENSE_STEP_PENALTY / m)
        out.set(explicit, "reward_scale", scale,
                f"the task's reward reaches {m:.2f} in one step short of success on the base's episodes" + (
                    f": x{scale} keeps every step under the step penalty" if scale < 1 else ""))
        out.set(explicit, "step_penalty", DENSE_STEP_PENALTY, "on a shaped reward, hovering near the goal must cost more than "
                                               "finishing")
    else:
        out.set(explicit, "step_penalty", 1.0, "sparse reward: -1 per step, 0 on success (DSRL's offset)")
    horizon = profile.horizon or profile.mean_length  # the episode limit; the base's mean length when unknown
    if method in PER_STEP_METHODS:
        if horizon > LONG_EPISODE and "algo.n_action_steps" not in explicit:
            why = (f"the task's episodes run up to {horizon:.0f} env steps: a per-step residual (ResiP's; ZPRL's on "
                   "the latent) corrects each move as it happens")
            out.set(explicit, "algo.n_action_steps", 1, why)
            out.set(explicit, "algo.n_step", 10, "per-step decisions: TD targets over 10 steps")
        elif method != "steer_bottleneck":  # steering keeps its n-decision targets over chunks
            out.set(explicit, "algo.n_step", 1, f"the task's episodes run up to {horizon:.0f} env steps: one "
                                                "decision per chunk, one-decision TD")
    if method in LARGE_ROLLOUT_METHODS and horizon > LONG_EPISODE:
        out.set(explicit, "algo.ppo_rollout", LONG_ROLLOUT,
                f"the task's episodes run up to {horizon:.0f} env steps: each PPO update sees {LONG_ROLLOUT} chunk "
                "decisions, enough whole episodes that its gradient is not one of a few episodes' luck")
        out.set(explicit, "algo.ppo_minibatch", LONG_MINIBATCH, f"{LONG_ROLLOUT} decisions per update: minibatches "
                f"of {LONG_MINIBATCH}")
        out.set(explicit, "algo.ppo_clip", LONG_CLIP, f"{LONG_ROLLOUT} decisions per update: a less noisy gradient "
                "takes a wider trust region")
        out.set(explicit, "algo.actor_lr", LONG_ACTOR_LR, f"{LONG_ROLLOUT} decisions per update: a larger step")
    if method in STEERING_METHODS and profile.noise_authority is not None and \
            profile.noise_authority < LOW_AUTHORITY:
        out.advice.append(
            f"the base's sampler noise barely moves its actions (spread {profile.noise_authority:.3f} in normalized "
            f"units, below {LOW_AUTHORITY}): {method} can only choose among near-identical chunks. Use "
            "algo=residual, or train the base on varied demonstrations (or with policy.encoder.bottleneck=vib and "
            "steer it with algo.latent=bottleneck).")
    return out


@torch.no_grad()
def noise_authority(policy, observations: dict[str, np.ndarray], noises: int = 16, noise_scale: float = 1.0,
                    seed: int = 0) -> float:
    """Mean std (over `noises` sampler noises) of the executed normalized actions at these observations."""
    # an episode's first observation fills the whole history, as the runtime pads it at the start
    obs = {k: repeat(torch.as_tensor(v), "b ... -> b t ...", t=policy.n_obs_steps)
           for k, v in observations.items() if k in policy.obs_keys}
    return float(spread(policy, *sample_over_noises(policy, obs, noises, noise_scale, seed))["mean_std"])


@torch.no_grad()
def sample_over_noises(policy, obs: dict[str, torch.Tensor], noises: int, noise_scale: float,
                       seed: int) -> tuple[torch.Tensor, int]:
    """Chunks for `noises` draws of the sampler noise at each observation [(B noises), H, A], and `noises`."""
    b = next(iter(obs.values())).shape[0]
    generator = torch.Generator().manual_seed(seed)
    noise = noise_scale * torch.randn(b * noises, *policy.noise_shape, generator=generator)
    return policy.sample_chunk({k: repeat(v, "b ... -> (b n) ...", n=noises) for k, v in obs.items()}, noise), noises


def spread(policy, chunks: torch.Tensor, noises: int) -> dict:
    """Per action dimension: std and range of the executed actions (normalized) over the `noises` chunks of each
    observation, averaged over observations and executed steps."""
    start = policy.n_obs_steps - 1  # the executed steps
    executed = policy.normalizer.normalize("action", chunks[:, start:start + policy.n_action_steps])
    executed = rearrange(executed, "(b n) t a -> b n t a", n=noises)
    std = executed.std(dim=1).mean(dim=(0, 1))
    rng = (executed.amax(dim=1) - executed.amin(dim=1)).mean(dim=(0, 1))
    return {"observations": executed.shape[0], "std": [round(float(x), 4) for x in std],
            "range": [round(float(x), 4) for x in rng], "mean_std": round(float(std.mean()), 4)}
