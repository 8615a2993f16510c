"""PPO through a generative policy's sampling chain, shared by `reinflow` (flow base) and `dppo` (diffusion base).

Both make the few-step sampler a Markov chain of Gaussian steps, x_{k+1} ~ N(mean_theta(x_k, k, s), std_k^2), whose
log-likelihood is exact given the stored chain, and fine-tune the base's own denoising network with the clipped
PPO surrogate (`ppo.PPO`, GAE over whole episodes, a value network on the encoder's features):

    decision   the chain [K + 1, H, A] (normalized units) sampled once per chunk; its last element, clipped to
               [-1, 1], is the chunk whose executed steps run open loop
    log-prob   reinflow: the chain's joint log-likelihood (one ratio per decision)
               dppo: one per denoising step (a ratio per step, DPPO's two-level MDP), with the denoising discount
               (each divided by the elements it scores with `log_prob_average`, as DPPO's code averages)
    scored     with `score_executed` (the default), only each step's executed slice (n_action_steps of the
               horizon H): a base trained on chunks of 16 that runs 4 of them otherwise puts 3/4 of every ratio
               on elements no action carries (DPPO and ReinFlow fine-tune bases whose whole chunk runs)

The observation encoder and the normalizer stay frozen (the value network and the chain are conditioned on the
features recorded at collection). The result needs no base: `standalone()` is the fine-tuned copy, which
`robopolicy finetune` saves as a plain `flow` / `diffusion` checkpoint that runs the deterministic sampler.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from einops import rearrange

from robopolicy.config import setting
from robopolicy.policies import ActionChunkPolicy, ChunkPolicy
from robopolicy.policies.base import PolicyConfigError
from robopolicy.rl.online import AlgoConfig
from robopolicy.rl.ppo import PPO, PPOConfig, RolloutStore
from robopolicy.rl.refined import RefinedPolicy


@dataclass
class ChainPPOConfig(AlgoConfig, PPOConfig):
    """Settings shared by the chain fine-tuning methods (`lr` is the value network's)."""

    actor_lr: float = setting(1.0e-5, "Adam learning rate of the fine-tuned denoising network (and noise network)")
    ppo_rollout: int = setting(512, "chunk transitions (whole episodes) per update")
    ppo_epochs: int = setting(5, "passes over each rollout")
    ppo_minibatch: int = setting(128, "transitions per minibatch")
    ppo_clip: float = setting(0.01, "clipped-surrogate ratio bound: small, as DPPO and ReinFlow use, since a "
                          "chain's ratio multiplies over many action dimensions")
    gae_lambda: float = setting(0.95, "GAE lambda")
    value_coef: float = setting(0.5, "value loss weight")
    entropy_coef: float = setting(0.0, "entropy bonus weight (on the chain's Gaussian steps)")
    max_grad_norm: float = setting(1.0, "gradient norm clip")
    separate_grad_clip: bool = setting(True, "clip the actor's and the value network's gradients each to "
                                       "max_grad_norm (DPPO's separate optimizers); false: their joint norm, "
                                       "which a value loss on returns of ~100 dominates: the actor's step then varies "
                                       "with the value loss")
    value_warmup: int = setting(0, "the first this many PPO updates train the value network only (DPPO's critic "
                                "warm-up), so the actor does not follow an untrained V(s)'s advantages")
    normalize_returns: bool = setting(False, "fit the value network to returns over a running std of them (as "
                                      "ReinFlow's and DPPO's running reward scaling): shaped returns of ~100 leave an "
                                      "unscaled V(s) far off for most of a short budget")
    log_prob_average: bool = setting(True, "PPO's ratio from the chain's log-likelihood averaged over the chunk's "
                                     "scored elements (DPPO's practice: summed, a tiny shift of a 64-element "
                                     "Gaussian's mean already moves the ratio past ppo_clip); false: the exact sum")
    value_on_noise: bool = setting(False, "the baseline is V(s, x_0): the value network also sees the chain's "
                                   "first element x_0 (reinflow: the sampler's initial noise; dppo: the sample "
                                   "entering the fine-tuned steps), drawn before any step PPO scores, so the spread "
                                   "of returns that x_0 causes leaves the advantages; the gradient stays unbiased, "
                                   "as x_0 is part of the decision's state in the chain's MDP")
    # push-v3's noisy weak bases (horizon 16, 4 executed; README, seed 0): scoring the whole chunk neither method
    # reached 0.9 within 1M env steps (finals 0.80 reinflow, 0.79 dppo); scoring the executed steps, 0.91 over 100
    # episodes at 550k (reinflow) and 750k (dppo), finals 0.99 and 0.97
    score_executed: bool = setting(True, "PPO's ratio scores only the chunk steps that run (each chain step's "
                                   "executed slice, n_action_steps of the horizon's steps); the rest of the chunk "
                                   "stays in the chain as part of the state its next step sees. Not the chain's "
                                   "exact likelihood (the fine-tuned network also moves the unscored elements, "
                                   "which this ignores); it drops the score of elements no action carries, which "
                                   "otherwise add variance to the gradient and spend the clip range")


class ChainPolicy(RefinedPolicy):
    """A trainable copy of the base (`model`) whose sampler runs as a chain of Gaussian steps.

    Subclasses set `base_class`, add their noise module in `build_chain` and implement `sample_chain` and
    `chain_log_prob`; `joint_ratio` says whether PPO scores the chain as one action (True) or per step."""

    base_class: type[ActionChunkPolicy] = ActionChunkPolicy
    joint_ratio: bool = True

    def build(self, config: ChainPPOConfig) -> None:
        if not isinstance(self.base, self.base_class):
            raise PolicyConfigError(f"{self.name} fine-tunes a {self.base_class.name!r} base; this base is a "
                                    f"{self.base.name!r} policy.")
        self.model = copy.deepcopy(self.base)  # the weights PPO fine-tunes; the base stays the frozen reference
        self.model.requires_grad_(False)
        self.model.denoiser.requires_grad_(True)
        self.scored = self.exec_slice if config.score_executed else slice(None)
        self.build_chain(config)

    @property
    def scored_elements(self) -> int:
        """How many elements of each chain step PPO's log-likelihood scores."""
        return len(range(self.horizon)[self.scored]) * self.action_dim

    def step_log_prob(self, x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """log N(x_next; mean, std^2) of one chain step over its scored chunk steps: [B, H, A] -> [B]."""
        return gaussian_step_log_prob(x_next[:, self.scored], mean[:, self.scored], std[:, self.scored])

    def build_chain(self, config: ChainPPOConfig) -> None:
        raise NotImplementedError

    def standalone(self) -> ChunkPolicy:
        return self.model

    def encode(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.model.encode(obs)

    @torch.no_grad()
    def sample_chunk(self, obs: Mapping[str, torch.Tensor], noise: torch.Tensor | None = None,
                     prefix_actions: torch.Tensor | None = None) -> torch.Tensor:
        """The fine-tuned model's deterministic sampler: what the saved checkpoint runs."""
        return self.model.sample_chunk(obs, noise, prefix_actions)

    def final_chunk(self, chain: torch.Tensor) -> torch.Tensor:
        """The normalized chunk a chain ends in, clipped to [-1, 1] as the samplers clip min_max actions."""
        final = chain[:, -1]
        return final.clamp(-1.0, 1.0) if self.model.normalizer.modes["action"] == "min_max" else final

    def sample_chain(self, cond: torch.Tensor, generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(chain [B, K + 1, H, A], log-probability of each step [B, K]) from the features `cond` [B, F]."""
        raise NotImplementedError

    def chain_log_prob(self, cond: torch.Tensor, chain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probability of each stored step [B, K], entropy of the chain's Gaussians [B]), differentiable."""
        raise NotImplementedError


def gaussian_step_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x_next; mean, std^2) summed over the chunk: [B, H, A] -> [B]."""
    return torch.distributions.Normal(mean, std).log_prob(x_next).flatten(1).sum(-1)


class ChainPPO:
    """The on-policy method: sample chains on the collector, PPO-update the fine-tuned model on whole episodes."""

    keep_raw_obs = False
    on_policy = True
    n_step = 1

    def __init__(self, policy: ChainPolicy, cfg: ChainPPOConfig, seed: int = 0,
                 step_weights: torch.Tensor | None = None, step_clip: torch.Tensor | None = None):
        self.policy = policy
        self.gamma = cfg.gamma
        self.log_prob_scale = 1.0 / policy.scored_elements if cfg.log_prob_average else 1.0
        self.chunk_size = policy.horizon * policy.action_dim
        self.ppo = PPO(policy.feature_dim, 0, cfg, actor=policy, seed=seed, log_prob=self.log_prob,
                       step_weights=None if policy.joint_ratio else step_weights,
                       step_clip=None if policy.joint_ratio else step_clip, actor_lr=cfg.actor_lr,
                       value_warmup=cfg.value_warmup, normalize_returns=cfg.normalize_returns,
                       separate_grad_clip=cfg.separate_grad_clip,
                       value_inputs=self.value_inputs if cfg.value_on_noise else None,
                       value_dim=policy.feature_dim + self.chunk_size if cfg.value_on_noise else None)
        self.generator = torch.Generator().manual_seed(seed)

    def value_inputs(self, episode: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """[features, x_0] at each decision, and at each next decision: the next row's x_0 (after the episode's last
        decision, whose bootstrap counts only when the time limit cut it, its own x_0 stands in for the next)."""
        x0 = episode["u"][:, :self.chunk_size]
        next_x0 = torch.cat([x0[1:], x0[-1:]])
        return torch.cat([episode["obs"], x0], -1), torch.cat([episode["next_obs"], next_x0], -1)

    def log_prob(self, cond: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """PPO's score of stored chains `u` [B, (K + 1) H A]: [B] (joint) or [B, K] (per step), and entropy."""
        chain = rearrange(u, "b (k h a) -> b k h a", h=self.policy.horizon, a=self.policy.action_dim)
        log_prob, entropy = self.policy.chain_log_prob(cond, chain)
        return self.reduce(log_prob), entropy * self.log_prob_scale

    def reduce(self, log_prob: torch.Tensor) -> torch.Tensor:
        """Per-step log-likelihoods [B, K] -> what PPO's ratio compares: [B] (joint) or [B, K]."""
        log_prob = log_prob * self.log_prob_scale
        return log_prob.sum(-1) if self.policy.joint_ratio else log_prob

    def observe(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.policy.encode(obs)

    def act(self, obs, inputs, workers, explore):
        policy = self.policy
        if not explore:
            chunk = policy.sample_chunk(obs)
            return policy.normalize_actions(chunk[:, policy.exec_slice]).flatten(1), chunk[:, policy.exec_slice], {}
        chain, log_prob = policy.sample_chain(inputs, self.generator)
        executed = policy.final_chunk(chain)[:, policy.exec_slice]  # [b, n_exec, A], normalized
        extras = {"u": chain.flatten(1), "log_prob": self.reduce(log_prob),
                  "policy_mask": torch.ones(len(workers))}
        return executed.flatten(1), policy.model.unnormalize_actions(executed), extras

    def start_episode(self, worker: int, env_steps: int) -> None:
        pass

    def update(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        raise RuntimeError("chain PPO is on-policy: the online loop calls update_rollouts().")

    def ready(self) -> bool:
        return self.ppo.ready()

    def update_rollouts(self) -> dict[str, float]:
        return self.ppo.update()


def make_chain_method(policy: ChainPolicy, cfg: ChainPPOConfig, seed: int,
                      step_weights: torch.Tensor | None = None, step_clip: torch.Tensor | None = None
                      ) -> tuple[ChainPPO, RolloutStore]:
    method = ChainPPO(policy, cfg, seed, step_weights, step_clip)
    return method, method.ppo.rollouts
