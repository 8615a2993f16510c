"""Online refinement core: replay buffer, chunked rollout step counting, curves files, refined checkpoints that
load through `load_policy` and refuse a missing or changed base."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import load_benchmark
from test_policies import make_stats, small_config

import sim
from robopolicy.checkpoint import CheckpointError, base_reference, read_checkpoint_info, save_checkpoint
from robopolicy.features import features_from_env
from robopolicy.finetune import finetune
from robopolicy.loading import load_policy
from robopolicy.policies import make_policy
from robopolicy.rl.buffer import ReplayBuffer
from robopolicy.rl.collector import ChunkedCollector, RewardSpec, n_step_rows
from robopolicy.rl.online import Curves
from robopolicy.rl.refined import save_refined
from sim.vector import make_vector_env

TASK = "builtin/reach"
MAX_STEPS = 10  # short episodes so a few dozen steps cross episode ends


def make_base(folder, task: str = TASK):
    """A small (untrained) flow policy for `task`, saved as a real checkpoint; returns its folder."""
    env = sim.make_env(task)
    features = features_from_env(env.observation_space, env.action_space)
    env.close()
    torch.manual_seed(0)
    cfg = small_config("flow", num_inference_steps=2)
    policy = make_policy(cfg, features, make_stats(features, -1.0, 1.0)).eval()
    return save_checkpoint(folder, policy, config={"policy": cfg, "task": task})


def refined(cls, base_ckpt, **settings):
    """A refined policy of `cls` on the checkpoint `base_ckpt` (loaded here: constructors take a loaded base)."""
    return cls(cls.config_from(settings), load_policy(base_ckpt), base_reference(base_ckpt))


def reward_spec(kind: str = "dense", step_penalty: float = 0.0, success_bonus: float = 0.0) -> RewardSpec:
    return RewardSpec(kind, 1.0, success_bonus, step_penalty)


def make_envs(num_envs: int, task: str = TASK):
    return make_vector_env(task, num_envs, autoreset="disabled", max_episode_steps=MAX_STEPS)


def finetune_cfg(algo: dict, ckpt, out, **overrides) -> dict:
    """A finetune config (configs/finetune.yaml + configs/algo/<name>.yaml) shrunk to a few updates."""
    from pathlib import Path

    configs = Path(__file__).resolve().parent.parent / "configs"
    cfg = yaml.safe_load((configs / "finetune.yaml").read_text())
    cfg.pop("defaults")
    algo_cfg = yaml.safe_load((configs / "algo" / f"{algo['name']}.yaml").read_text())
    if "defaults" in algo_cfg:  # steer_na builds on steer
        parent = yaml.safe_load((configs / "algo" / f"{algo_cfg.pop('defaults')[0]}.yaml").read_text())
        algo_cfg = {**parent, **algo_cfg}
    cfg["algo"] = {**algo_cfg, "hidden": [32, 32], "batch_size": 16, "learning_starts": 16, "collect_steps": 8,
                   "updates_per_step": 0.5, **algo}
    cfg.update(ckpt=str(ckpt), out=str(out), task=TASK, env_steps=64, num_envs=1)
    cfg["eval"].update(every=32, episodes=2, base_episodes=0, final_episodes=2, num_envs=1)
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("rl") / "base")


def test_replay_buffer_wraps_around_and_samples_rows_together():
    buffer = ReplayBuffer(5, {"obs": (2,), "reward": ()})
    for i in range(3):
        buffer.add({"obs": np.full((3, 2), i, np.float32), "reward": np.full(3, i, np.float32)})
    assert len(buffer) == 5 and buffer.cursor == 4
    assert buffer.data["reward"].tolist() == [1, 2, 2, 2, 1]  # rows 0..2, 3 4 0, 1 2 3: oldest overwritten
    batch = buffer.sample(64, np.random.default_rng(0))
    assert batch["obs"].shape == (64, 2) and batch["obs"].dtype == torch.float32
    assert torch.equal(batch["obs"][:, 0], batch["reward"])  # fields of one row stay together
    with pytest.raises(KeyError, match="differ"):
        buffer.add({"obs": np.zeros((1, 2), np.float32)})


class CountingMethod:
    """A minimal method on a real base: zero noise, records what the collector asked for."""

    keep_raw_obs = False
    on_policy = False
    gamma = 0.5
    n_step = 1

    def __init__(self, policy):
        self.policy = policy
        self.decisions = 0
        self.started: list[tuple[int, int]] = []

    def observe(self, obs):
        return self.policy.encode(obs)

    def act(self, obs, inputs, workers, explore):
        self.decisions += len(workers)
        chunk = self.policy.base.sample_chunk(obs, torch.zeros(len(workers), *self.policy.noise_shape))
        return torch.zeros(len(workers), 3), chunk[:, self.policy.exec_slice], {}

    def start_episode(self, worker, env_steps):
        self.started.append((worker, env_steps))


def test_chunked_rollout_counts_env_steps_and_chunk_transitions(base_ckpt):
    from robopolicy.rl.steer import SteerPolicy

    policy = refined(SteerPolicy, base_ckpt, hidden=[16])
    method = CountingMethod(policy)
    rows: list[dict] = []
    envs = make_envs(2)
    try:
        collector = ChunkedCollector(envs, method, rows.append, reward_spec(), seed=7)
        ran = collector.collect(45)
    finally:
        envs.close()
    n_exec = policy.n_action_steps  # 4 env steps per decision; episodes of 10 steps: chunks of 4, 4, 2
    assert ran == 46 and collector.env_steps == 46  # whole vector steps of 2 envs
    assert len(collector.episodes) == 4 and all(e["length"] == MAX_STEPS for e in collector.episodes)
    assert sorted(e["seed"] for e in collector.episodes) == [7, 8, 9, 10]
    transitions = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    assert transitions["steps"].tolist() == [n_exec, n_exec, 2] * 4
    assert not transitions["done"].any()  # truncated, not terminated: the critic bootstraps
    # rewards are the env's summed over the executed steps, and returns-to-go discount by gamma ** steps
    assert np.isclose(sum(e["return"] for e in collector.episodes), transitions["reward"].sum(), atol=1e-3)
    r, s, g = transitions["reward"][:3], transitions["steps"][:3], transitions["mc_return"][:3]
    assert np.isclose(g[2], r[2]) and np.isclose(g[1], r[1] + 0.5 ** s[1] * g[2], atol=1e-5)
    # the next input of a transition is the input of the following decision in its episode
    assert np.allclose(transitions["next_obs"][0], transitions["obs"][1])
    assert method.decisions == 12 + 2  # 3 per finished episode, plus the first chunk of the running ones
    assert method.started[:2] == [(0, 0), (1, 0)] and len(method.started) == 6


class ExpertChunkMethod(CountingMethod):
    """Executes the task's scripted expert: its action at the decision's observation, spread over the chunk (reach's
    expert is a proportional move, so a quarter of it four times covers the same distance)."""

    def __init__(self, policy, seed: int):
        super().__init__(policy)
        self.expert = sim.make_expert(TASK, seed=seed)

    def start_episode(self, worker, env_steps):
        self.expert.reset(None)  # reach's expert keeps no per-episode state that matters here

    def act(self, obs, inputs, workers, explore):
        state = obs["observation.state"][:, -1].numpy()
        action = torch.as_tensor(np.stack([self.expert.act({"observation.state": s}) for s in state]))
        n = self.policy.n_action_steps
        chunk = (action[:, None] / n).expand(-1, n, -1).float()
        return torch.zeros(len(workers), 1), chunk, {}


@pytest.mark.parametrize("bonus", [0.0, 5.0])
def test_success_bonus_is_added_on_the_success_step_of_dense_rewards(base_ckpt, bonus):
    from robopolicy.rl.steer import SteerPolicy

    policy = refined(SteerPolicy, base_ckpt, hidden=[16])
    method = ExpertChunkMethod(policy, seed=3)
    rows: list[dict] = []
    envs = make_vector_env(TASK, 1, autoreset="disabled", max_episode_steps=80)
    try:
        collector = ChunkedCollector(envs, method, rows.append, reward_spec(step_penalty=0.5, success_bonus=bonus),
                                     seed=3)
        while not collector.episodes:
            collector.collect(8)
    finally:
        envs.close()
    episode = collector.episodes[0]
    assert episode["success"], "reach's expert should succeed within 80 steps"
    rewards = rows[0]["reward"]  # the env's return, minus the penalty per step, plus the bonus once
    assert np.isclose(rewards.sum(), episode["return"] - 0.5 * episode["length"] + bonus, atol=1e-3)
    assert rows[0]["done"][-1] == 1 and rows[0]["done"][:-1].sum() == 0  # terminated on success


def test_n_step_rows_sum_discounted_rewards_and_bootstrap_from_n_decisions_ahead():
    # an episode of 3 decisions (4, 4 and 2 env steps) that terminates on the last one
    rows = [{"obs": np.float32([t]), "reward": np.float32(r), "steps": np.float32(s), "done": np.float32(t == 2),
             "next_obs": np.float32([t + 1]), "next_raw.x": np.float32([10 * (t + 1)])}
            for t, (r, s) in enumerate([(-4.0, 4), (-4.0, 4), (-1.0, 2)])]
    out = n_step_rows(rows, 2, gamma=0.5)
    assert [float(r["obs"][0]) for r in out] == [0, 1, 2]  # each keeps its own decision
    assert np.isclose(out[0]["reward"], -4 + 0.5 ** 4 * -4) and out[0]["steps"] == 8 and out[0]["done"] == 0
    assert out[0]["next_obs"][0] == 2 and out[0]["next_raw.x"][0] == 20  # bootstrap at decision 2
    assert np.isclose(out[1]["reward"], -4 + 0.5 ** 4 * -1) and out[1]["steps"] == 6 and out[1]["done"] == 1
    assert out[2]["reward"] == -1 and out[2]["steps"] == 2 and out[2]["next_obs"][0] == 3  # cut by the end
    assert n_step_rows(rows, 1, gamma=0.5) == rows


def test_curves_written_as_json_and_png(tmp_path):
    curves = Curves(tmp_path, "steer", TASK)
    curves.add_eval(0, {"success_rate": 0.3, "success_ci95": [0.1, 0.5], "episodes": 20, "mean_return": 1.0})
    curves.add_eval(500, {"success_rate": 0.95, "success_ci95": [0.8, 1.0], "episodes": 20, "mean_return": 2.0})
    curves.train_episodes = [{"env_steps": 10 * i, "success": i % 2 == 0, "return": 0.0, "length": 10, "seed": i}
                             for i in range(30)]
    json_path, png_path = curves.write()
    data = json.loads(json_path.read_text())
    assert [p["env_steps"] for p in data["eval"]] == [0, 500] and len(data["train_episodes"]) == 30
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert curves.steps_to(0.9) == 500 and curves.steps_to(0.99) is None
    assert curves.steps_to(0.9, min_episodes=100) is None  # a 20-episode crossing is not a confirmed one
    curves.add_eval(600, {"success_rate": 0.91, "success_ci95": [0.84, 0.95], "episodes": 100, "mean_return": 2.0})
    assert curves.steps_to(0.9, min_episodes=100) == 600


def test_refined_checkpoint_round_trip_and_refusals(tmp_path):
    from robopolicy.rl.steer import SteerPolicy

    base = make_base(tmp_path / "base")
    steered = refined(SteerPolicy, base, noise_scale=1.5, hidden=[16])
    with torch.no_grad():
        for p in steered.actor.parameters():
            p.normal_()
    assert set(steered.state_dict()) == {k for k in steered.state_dict() if k.startswith("actor.")}  # base kept out
    path = save_refined(tmp_path / "refined", steered, {"task": TASK})
    info = read_checkpoint_info(path)
    assert info["config"]["policy"]["base"]["path"] == str(base.resolve()) and info["config"]["task"] == TASK
    assert info["extra"]["base"]["sha256"] == base_reference(base)["sha256"]

    loaded = load_policy(path)
    obs = {"observation.state": torch.randn(3, 2, *steered.features["observation.state"]["shape"])}
    noise = torch.randn(3, *steered.noise_shape)
    assert torch.equal(loaded.sample_chunk(obs, noise), steered.sample_chunk(obs, noise))
    assert not torch.equal(loaded.sample_chunk(obs, noise), loaded.base.sample_chunk(obs, noise))

    # the base changed (other weights under the same path): refused with the reason
    other = make_policy(read_checkpoint_info(base)["config"]["policy"], info["features"])
    save_checkpoint(base, other, config={"policy": other.config, "task": TASK})
    with pytest.raises(CheckpointError, match="has changed since refinement"):
        load_policy(path)
    shutil.rmtree(base)
    with pytest.raises(CheckpointError, match="base .* is missing"):
        load_policy(path)


def test_finetune_refuses_existing_run_and_refined_base(tmp_path, base_ckpt):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds a run"):
        finetune(finetune_cfg({"name": "steer"}, base_ckpt, out), make_envs)
    from robopolicy.rl.steer import SteerPolicy

    saved = save_refined(tmp_path / "refined", refined(SteerPolicy, base_ckpt), {"task": TASK})
    with pytest.raises(CheckpointError, match="already a refined checkpoint"):
        finetune(finetune_cfg({"name": "steer"}, saved, tmp_path / "run2"), make_envs)


def test_refine_benchmark_sets_the_reward_per_method():
    """`--set residual.reward=dense` trains that method on the shaped reward; the other methods keep the run's."""
    import argparse
    from pathlib import Path

    bench = load_benchmark("refine_sample_efficiency")
    args = argparse.Namespace(reward="sparse", reward_scale=1.0, step_penalty=1.0, success_bonus=0.0, base="b",
                              task="builtin/reach", seed=0, env_steps=100, num_envs=1, threads=1, eval_every=0,
                              eval_episodes=0, final_episodes=0, target=0.9, stop_at_target=False)
    reward = bench.reward_settings(args, {"reward": "dense", "step_penalty": 2.0, "scale": 0.3})
    assert reward == {"reward": "dense", "reward_scale": 1.0, "step_penalty": 2.0, "success_bonus": 0.0}
    cfg = bench.common_cfg(args, {"name": "residual", "scale": 0.3}, Path("out"), reward)
    assert cfg["reward"] == "dense" and cfg["step_penalty"] == 2.0 and cfg["algo"] == {"name": "residual", "scale": 0.3}
    assert bench.reward_settings(args, {})["reward"] == "sparse"
