"""Value-guided chunk selection (V-GPS, Nakamoto et al. 2024; IDQL's selection step): sample N chunks from the
frozen base and execute the one with the highest Q(s, executed chunk). The base weights never change.

Q is regressed on Monte-Carlo returns-to-go of chunk-level transitions (sparse success reward by default): from
the demonstration store when `store` is given (offline), and from rollouts of the guided policy itself (online),
refitted as data arrives. The refined checkpoint holds Q and `n_samples`; `guidance_chunk_fn` applies the same
selection to any (Q, base) pair, and `policy.n_samples` can be changed at evaluation time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from robopolicy.config import register_config, setting
from robopolicy.policies import ChunkPolicy, register_policy
from robopolicy.rl.buffer import ReplayBuffer
from robopolicy.rl.collector import RewardSpec, raw_dtypes, transition_shapes
from robopolicy.rl.online import AlgoConfig
from robopolicy.rl.refined import RefinedPolicy
from robopolicy.rl.sac import mlp


@register_config("algo", "value_guided")
@dataclass
class ValueGuidedConfig(AlgoConfig):
    name: str = setting("value_guided", "value-guided chunk selection")
    n_samples: int = setting(8, "candidate chunks per decision (overridable at evaluation time)")
    store: str | None = setting(None, "a demonstration store whose episodes also train Q (offline); null: rollouts "
                                "only")
    learning_starts: int = setting(1000, "env steps of data before the first update")
    collect_steps: int = setting(64, "env steps between rounds of updates")

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be at least 1, got {self.n_samples}.")


@register_policy("value_guided")
class ValueGuidedPolicy(RefinedPolicy):
    """Refined runtime: the best of `n_samples` base chunks by Q; `noise` seeds the candidates (see
    `candidate_noise`)."""

    name = "value_guided"
    config_class = ValueGuidedConfig
    runtime_fields = ("n_samples", "hidden")

    def build(self, config: ValueGuidedConfig) -> None:
        self.n_samples = config.n_samples
        self.chunk_dim = self.n_exec * self.action_dim
        self.q = mlp(self.feature_dim + self.chunk_dim, list(config.hidden), 1)

    def value(self, features: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
        """Q [B] of executed chunks [B, H, A] (robot units) at observation features [B, F]."""
        executed = self.normalize_actions(chunk[:, self.exec_slice]).flatten(1)
        return self.q(torch.cat([features, executed], dim=-1)).squeeze(-1)

    def candidate_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """[B, H, A] -> [B, N, H, A]: the given noise first, then N - 1 drawn from a generator seeded by it, so the
        selection is deterministic given the noise (each row independently of the batch it comes in)."""
        rows = []
        for row in noise:
            seed = int(torch.round(row.double() * 1e4).abs().sum().item()) % (2**62)
            extra = torch.randn(self.n_samples - 1, *row.shape, generator=torch.Generator().manual_seed(seed))
            rows.append(torch.cat([row[None].cpu(), extra]))
        return torch.stack(rows).to(noise.device)

    @torch.no_grad()
    def select(self, obs: Mapping[str, torch.Tensor], noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen chunk [B, H, A], values of all candidates [B, N])."""
        b, n = noise.shape[0], self.n_samples
        noises = self.candidate_noise(noise)
        obs_n = {k: repeat(torch.as_tensor(v), "b ... -> (b n) ...", n=n) for k, v in obs.items()}
        chunks = self.base.sample_chunk(obs_n, rearrange(noises, "b n h a -> (b n) h a"))
        features = repeat(self.encode(obs), "b f -> (b n) f", n=n)
        values = rearrange(self.value(features, chunks), "(b n) -> b n", n=n)
        chunks = rearrange(chunks, "(b n) h a -> b n h a", n=n)
        return chunks[torch.arange(b), values.argmax(dim=1)], values

    @torch.no_grad()
    def sample_chunk(self, obs: Mapping[str, torch.Tensor], noise: torch.Tensor | None = None,
                     prefix_actions: torch.Tensor | None = None) -> torch.Tensor:
        self.check_prefix(prefix_actions)
        if noise is None:
            noise = self.draw_noise(next(iter(obs.values())).shape[0])
        return self.select(obs, noise)[0]


def guidance_chunk_fn(policy: ValueGuidedPolicy, n_samples: int | None = None):
    """A `chunk_fn` for `evaluate(..., chunk_fn=...)` with `n_samples` candidates (default: the policy's)."""
    if n_samples is not None:
        policy.n_samples = int(n_samples)
    return policy.sample_chunk


def apply_guidance(policy, guidance: str | None, n_samples: int | None = None, ckpt: str = "the checkpoint"):
    """The policy to evaluate for `eval guidance=... n_samples=...`: "value" selects among `n_samples` chunks with
    the checkpoint's Q (a value_guided checkpoint is required), "none" runs a value_guided checkpoint's base alone,
    None leaves the policy as it is."""
    if guidance in (None, "null"):
        return policy
    if guidance not in ("value", "none"):
        raise ValueError(f"guidance={guidance!r} is unknown; use guidance=value or guidance=none.")
    if not isinstance(policy, ValueGuidedPolicy):
        if guidance == "none":
            return policy
        raise ValueError(f"guidance=value needs a value_guided checkpoint (robopolicy finetune algo=value_guided); "
                         f"{ckpt} holds a {policy.name!r} policy.")
    if guidance == "none":
        return policy.base
    if n_samples is not None:
        if int(n_samples) < 1:
            raise ValueError(f"n_samples must be at least 1, got {n_samples}.")
        policy.n_samples = int(n_samples)
    return policy


class ValueGuidance:
    """Collects rollouts with the guided policy and regresses Q on their Monte-Carlo returns."""

    keep_raw_obs = False
    on_policy = False
    n_step = 1  # Q regresses Monte-Carlo returns: no bootstrapping

    def __init__(self, policy: ValueGuidedPolicy, cfg: ValueGuidedConfig, seed: int = 0):
        self.policy = policy
        self.gamma = cfg.gamma
        self.generator = torch.Generator().manual_seed(seed)
        self.optim = torch.optim.Adam(policy.q.parameters(), lr=cfg.lr)

    def observe(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.policy.encode(obs)

    def act(self, obs, inputs, workers, explore):
        noise = torch.randn(inputs.shape[0], *self.policy.noise_shape, generator=self.generator)
        executed = self.policy.sample_chunk(obs, noise)[:, self.policy.exec_slice]
        return self.policy.normalize_actions(executed).flatten(1), executed, {}

    def start_episode(self, worker: int, env_steps: int) -> None:
        pass

    def update(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        q = self.policy.q(torch.cat([batch["obs"], batch["action"]], dim=-1)).squeeze(-1)
        loss = F.mse_loss(q, batch["mc_return"])
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        self.optim.step()
        return {"q_loss": loss.item(), "q_mean": q.mean().item()}


@torch.no_grad()
def store_transitions(policy: ValueGuidedPolicy, store_path: str, gamma: float, reward: RewardSpec
                      ) -> dict[str, np.ndarray]:
    """Chunk-level transitions with Monte-Carlo returns from a demonstration store's episodes (offline data).

    A decision at frame t sees frames t - To + 1 .. t (the first frame repeated before the start) and executes
    actions t .. t + n_exec - 1 (the last action repeated past the end).
    """
    from robopolicy.data import DemoStore

    store = DemoStore.open(store_path)
    missing = [k for k in [*policy.obs_keys, "action"] if k not in store.features]
    if missing:
        raise ValueError(f"store {store_path} lacks {missing}, which the base policy uses; pass its own store.")
    rows: dict[str, list[np.ndarray]] = {k: [] for k in ("obs", "action", "reward", "done", "steps", "mc_return")}
    for index in range(store.num_episodes):
        ep = store.get_episode(index)
        length = len(ep["action"])
        starts = np.arange(0, length, policy.n_exec)
        frames = np.clip(starts[:, None] + np.arange(-policy.n_obs_steps + 1, 1), 0, length - 1)  # [n, To]
        obs = {k: torch.from_numpy(np.asarray(ep[k])[frames]) for k in policy.obs_keys}
        acts = np.clip(starts[:, None] + np.arange(policy.n_exec), 0, length - 1)  # [n, n_exec]
        chunk = policy.normalize_actions(torch.from_numpy(np.asarray(ep["action"], np.float32)[acts])).flatten(1)
        per_step = reward(ep["next.reward"], ep["next.success"]).astype(np.float32)
        steps = np.minimum(policy.n_exec, length - starts)
        chunk_reward = np.add.reduceat(per_step, starts)
        mc, ret = np.zeros(len(starts), np.float32), 0.0
        for j in reversed(range(len(starts))):
            ret = chunk_reward[j] + gamma ** steps[j] * ret
            mc[j] = ret
        rows["obs"].append(policy.encode(obs).numpy())
        rows["action"].append(chunk.numpy())
        rows["reward"].append(chunk_reward)
        done = np.zeros(len(starts), np.float32)
        done[-1] = float(np.asarray(ep["next.success"]).any())  # an episode that succeeded terminated there
        rows["done"].append(done)
        rows["steps"].append(steps.astype(np.float32))
        rows["mc_return"].append(mc)
    out = {k: np.concatenate(v) for k, v in rows.items()}
    out["next_obs"] = np.zeros_like(out["obs"])  # unused by Monte-Carlo regression
    return out


def make_method(base: ChunkPolicy, base_ref: Mapping[str, str], algo: ValueGuidedConfig, reward: RewardSpec,
                seed: int) -> tuple[ValueGuidance, ReplayBuffer]:
    policy = ValueGuidedPolicy(algo, base, base_ref)
    method = ValueGuidance(policy, algo, seed)
    buffer = ReplayBuffer(algo.buffer_size, transition_shapes(method, policy.feature_dim, policy.chunk_dim),
                          raw_dtypes(method))
    if algo.store:
        buffer.add(store_transitions(policy, algo.store, method.gamma, reward))
    return method, buffer
