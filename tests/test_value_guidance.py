"""Value-guided selection: the executed chunk is the candidate with the highest Q, deterministic given the noise;
Q fits Monte-Carlo returns from rollouts and from a demonstration store."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_rl_core import TASK, base_ckpt, finetune_cfg, make_envs, refined  # noqa: F401  (base_ckpt is a fixture)

from robopolicy.finetune import finetune
from robopolicy.loading import load_policy
from robopolicy.rl.collector import RewardSpec
from robopolicy.rl.value_guidance import (
    ValueGuidedPolicy,
    apply_guidance,
    guidance_chunk_fn,
    store_transitions,
)


def make_guided(base, n_samples: int = 6) -> ValueGuidedPolicy:
    torch.manual_seed(1)
    return refined(ValueGuidedPolicy, base, n_samples=n_samples,
                              hidden=[16])


def test_value_guided_executes_the_argmax_candidate(base_ckpt):  # noqa: F811
    policy = make_guided(base_ckpt)
    obs = {"observation.state": torch.randn(4, 2, *policy.features["observation.state"]["shape"])}
    noise = torch.randn(4, *policy.noise_shape)
    chunk = policy.sample_chunk(obs, noise)
    # score every candidate independently, one at a time, and compare with the selection
    candidates = policy.candidate_noise(noise)  # [B, N, H, A]
    assert torch.equal(candidates[:, 0], noise)
    for b in range(4):
        one = {k: v[b:b + 1].expand(policy.n_samples, *v.shape[1:]) for k, v in obs.items()}
        chunks = policy.base.sample_chunk(one, candidates[b])
        values = policy.value(policy.encode(one), chunks)
        assert torch.allclose(chunk[b], chunks[values.argmax()], atol=1e-5)
        assert not torch.allclose(chunks[0], chunks[1])  # the candidates differ
    assert torch.equal(policy.sample_chunk(obs, noise), chunk)  # deterministic given the noise
    alone = policy.sample_chunk({k: v[2:3] for k, v in obs.items()}, noise[2:3])  # same choice in any batch
    assert torch.allclose(alone, chunk[2:3], atol=1e-5)
    one_sample = guidance_chunk_fn(policy, n_samples=1)
    assert torch.allclose(one_sample(obs, noise), policy.base.sample_chunk(obs, noise))  # N=1 is the base


def test_eval_guidance_switch(base_ckpt):  # noqa: F811
    policy = make_guided(base_ckpt)
    assert apply_guidance(policy, "value", 16) is policy and policy.n_samples == 16
    assert apply_guidance(policy, "none") is policy.base and apply_guidance(policy, None) is policy
    with pytest.raises(ValueError, match="needs a value_guided checkpoint"):
        apply_guidance(policy.base, "value", 4, ckpt="/some/base")
    with pytest.raises(ValueError, match="n_samples must be at least 1"):
        apply_guidance(policy, "value", 0)


def test_value_guided_fits_returns_from_rollouts(tmp_path, base_ckpt):  # noqa: F811
    cfg = finetune_cfg({"name": "value_guided", "n_samples": 4}, base_ckpt, tmp_path / "run", reward="dense")
    summary = finetune(cfg, make_envs, log=lambda m: None)
    assert summary["updates"] > 0 and all(math.isfinite(v) for v in summary["last_metrics"].values())
    loaded = load_policy(summary["checkpoint"])
    assert isinstance(loaded, ValueGuidedPolicy) and loaded.n_samples == 4


class RandomAgent:
    def __init__(self, action_dim: int):
        self.rng, self.action_dim = np.random.default_rng(0), action_dim

    def reset(self, index: int, seed: int) -> None:
        pass

    def act(self, obs, active):
        return self.rng.uniform(-1, 1, (len(active), self.action_dim)).astype(np.float32)


def test_store_transitions_give_chunk_returns(tmp_path, base_ckpt):  # noqa: F811
    import sim
    from robopolicy.data import DemoStore
    from robopolicy.features import features_from_env
    from robopolicy.rollout import run_episodes

    env = sim.make_env(TASK)
    features = features_from_env(env.observation_space, env.action_space)
    env.close()
    store = DemoStore.create(tmp_path / "store", features=features, fps=10)
    envs = make_envs(1)
    try:  # random-action episodes of MAX_STEPS = 10 frames: chunks of 4, 4, 2 steps
        for ep in run_episodes(envs, RandomAgent(features["action"]["shape"][0]), 2, seed=0, record=True):
            store.append_episode(ep.stacked(), task="reach", source="policy", success=ep.success)
    finally:
        envs.close()
    policy = make_guided(base_ckpt)
    rows = store_transitions(policy, str(tmp_path / "store"), gamma=0.9, reward=RewardSpec("dense", 1.0, 0.0, 0.0))
    assert rows["obs"].shape == (6, policy.feature_dim) and rows["action"].shape == (6, policy.chunk_dim)
    assert rows["steps"].tolist() == [4, 4, 2, 4, 4, 2]
    first = store.get_episode(0)
    assert np.isclose(rows["reward"][:3].sum(), first["next.reward"].sum(), atol=1e-4)
    assert np.isclose(rows["mc_return"][1], rows["reward"][1] + 0.9 ** 4 * rows["mc_return"][2], atol=1e-5)
    assert np.isclose(rows["mc_return"][2], rows["reward"][2])
    # the executed chunk of decision 1 is actions 4..7, normalized like the base does
    expected = policy.normalize_actions(torch.from_numpy(first["action"][4:8])).flatten()
    assert torch.allclose(torch.from_numpy(rows["action"][1]), expected, atol=1e-6)
