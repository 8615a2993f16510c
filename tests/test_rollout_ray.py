"""The Ray rollout backend (`rollout=ray`): the same episodes as the default subprocess backend for the same seeds,
whatever the worker count; a worker SIGKILLed mid-run is restarted and its episodes rerun (exactly N, none twice,
the same result); a local Ray instance listens on loopback only."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from conftest import last_json  # noqa: E402

import sim  # noqa: E402
from robopolicy.collect import ExpertAgent  # noqa: E402
from robopolicy.evaluate import evaluate  # noqa: E402
from robopolicy.features import features_from_env  # noqa: E402
from robopolicy.policies import make_policy  # noqa: E402
from robopolicy.rollout import run_episodes  # noqa: E402
from sim.ray_vector import RayVectorEnv, init_ray  # noqa: E402
from sim.vector import make_vector_env  # noqa: E402

TASK, N = "builtin/reach", 8
ENV = {"max_episode_steps": 25}


@pytest.fixture(scope="module")
def local_ray():
    """One private Ray instance for the module (starting one takes seconds), always shut down."""
    init_ray("local", num_cpus=2)
    yield
    ray.shutdown()


def expert_episodes(envs, kill_after: int | None = None) -> list[tuple]:
    """The experts' episodes (index, seed, success, return, length); with `kill_after`, SIGKILL the first Ray
    worker once that many episodes have finished (the other episodes of its block are then mid-way)."""
    experts = [sim.make_expert(TASK) for _ in range(envs.num_envs)]
    agent = ExpertAgent(experts, envs.single_action_space.shape[0])
    finished = []

    def on_episode(ep):
        finished.append(ep.index)
        if len(finished) == kill_after:
            os.kill(envs.worker_pids[0], signal.SIGKILL)

    episodes = run_episodes(envs, agent, N, seed=7, on_episode=on_episode)
    assert sorted(finished) == list(range(N)), "every episode finishes exactly once"
    return [(e.index, e.seed, e.success, round(e.ret, 6), e.length) for e in episodes]


@pytest.fixture(scope="module")
def reference():
    envs = make_vector_env(TASK, 4, autoreset="disabled", **ENV)
    try:
        return expert_episodes(envs)
    finally:
        envs.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_ray_workers_give_the_episodes_of_the_subprocess_backend(local_ray, reference, workers):
    envs = RayVectorEnv(TASK, 4, workers=workers, **ENV)
    try:
        assert expert_episodes(envs) == reference
    finally:
        envs.close()
    assert any(success for _, _, success, _, _ in reference), "the expert should succeed: a meaningful comparison"


def test_a_worker_killed_mid_run_is_restarted_and_its_episodes_rerun(local_ray, reference):
    envs = RayVectorEnv(TASK, 4, workers=2, **ENV)
    try:
        before = envs.worker_pids
        assert expert_episodes(envs, kill_after=1) == reference  # exactly N, none twice, the same results
        assert envs.worker_pids[0] != before[0] and envs.worker_pids[1] == before[1]
    finally:
        envs.close()


class KillOnFirstEpisode:
    """A progress bar stand-in: SIGKILLs a Ray worker when the first evaluation episode finishes."""

    def __init__(self, envs):
        self.envs, self.count = envs, 0

    def update(self, n: int) -> None:
        self.count += n
        if self.count == 1:
            os.kill(self.envs.worker_pids[-1], signal.SIGKILL)


def test_eval_of_a_sampling_policy_matches_across_backends_and_survives_a_kill(local_ray):
    env = sim.make_env(TASK, **ENV)
    features = features_from_env(env.observation_space, env.action_space)
    env.close()
    torch.manual_seed(0)
    cfg = {"name": "flow", "horizon": 8, "n_obs_steps": 2, "n_action_steps": 4,
           "mlp": {"hidden_dim": 32, "n_blocks": 1, "step_embed_dim": 16}}
    policy = make_policy(cfg, features).eval()  # random weights; its noise comes from each episode's seed

    def run(envs, progress=None):
        try:
            result = evaluate(envs, policy, N, progress=progress)
        finally:
            envs.close()
        return [(e["seed"], e["success"], e["return"], e["length"]) for e in result["per_episode"]]

    reference = run(make_vector_env(TASK, 4, autoreset="disabled", **ENV))
    assert len({r for _, _, r, _ in reference}) > 1, "episodes should differ: a comparison that can fail"
    assert run(RayVectorEnv(TASK, 4, workers=2, **ENV)) == reference
    killed = RayVectorEnv(TASK, 4, workers=2, **ENV)
    assert run(killed, KillOnFirstEpisode(killed)) == reference


def test_a_local_ray_listens_on_loopback_only(local_ray):
    import psutil

    envs = RayVectorEnv(TASK, 2, workers=2, **ENV)  # actors up too
    try:
        me = psutil.Process()
        listening = []
        for proc in [me, *me.children(recursive=True)]:
            try:
                listening += [(proc.name(), c.laddr.ip) for c in proc.net_connections(kind="inet")
                              if c.status == psutil.CONN_LISTEN]
            except psutil.NoSuchProcess:
                continue
    finally:
        envs.close()
    names = {name for name, _ in listening}
    assert {"gcs_server", "raylet"} <= names, f"Ray's services should be among the listeners: {listening}"
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for _, ip in listening), listening


def test_collect_with_rollout_ray_records_the_same_store_as_the_default(tmp_path, cli):
    from robopolicy.data import DemoStore

    common = ["collect", f"task={TASK}", "episodes=4", "num_envs=2", "max_episode_steps=25"]
    default = last_json(cli(*common, f"out={tmp_path / 'a'}", check=True))
    proc = cli(*common, f"out={tmp_path / 'b'}", "rollout=ray", "rollout.workers=2", check=True, timeout=180)
    with_ray = last_json(proc)
    for key in ("success_rate", "frames", "store_episodes"):
        assert with_ray[key] == default[key]
    a, b = DemoStore.open(tmp_path / "a"), DemoStore.open(tmp_path / "b")
    np.testing.assert_array_equal(a.get_episode(3)["action"], b.get_episode(3)["action"])


def test_online_collector_reruns_the_episode_of_a_killed_worker(local_ray, tmp_path):
    from test_rl_core import CountingMethod, make_base, refined, reward_spec

    from robopolicy.rl.collector import ChunkedCollector
    from robopolicy.rl.steer import SteerPolicy

    base = make_base(tmp_path / "base")

    def episodes(envs, kill: bool) -> dict[int, tuple]:
        method = CountingMethod(refined(SteerPolicy, base, hidden=[16]))
        rows: list[dict] = []
        try:
            collector = ChunkedCollector(envs, method, rows.append, reward_spec(), seed=11)
            collector.collect(12)
            if kill:
                before = envs.worker_pids[0]
                os.kill(before, signal.SIGKILL)
            while len(collector.episodes) < 6:
                collector.collect(8)
            assert not kill or envs.worker_pids[0] != before, "the killed worker should have been restarted"
        finally:
            envs.close()
        seeds = [e["seed"] for e in collector.episodes]
        assert len(seeds) == len(set(seeds)) == len(rows), "each episode is flushed once"
        return {e["seed"]: (e["success"], e["return"], e["length"]) for e in collector.episodes}

    reference = episodes(make_vector_env(TASK, 2, autoreset="disabled", max_episode_steps=10), kill=False)
    killed = episodes(RayVectorEnv(TASK, 2, workers=2, max_episode_steps=10), kill=True)
    common = set(reference) & set(killed)
    assert len(common) >= 4 and all(killed[s] == reference[s] for s in common)


def test_eval_with_rollout_ray_gives_the_success_rate_of_the_default(tmp_path, cli):
    import json

    from test_rl_core import make_base

    ckpt = make_base(tmp_path / "base")  # an untrained flow policy: episodes differ in return and length
    common = ["eval", f"ckpt={ckpt}", "episodes=6", "num_envs=3", "max_episode_steps=15"]
    default = last_json(cli(*common, f"out={tmp_path / 'a'}", check=True))
    with_ray = last_json(cli(*common, f"out={tmp_path / 'b'}", "rollout=ray", "rollout.workers=2", check=True,
                             timeout=180))
    assert with_ray["episodes"] == default["episodes"] == 6
    assert with_ray["success_rate"] == default["success_rate"]
    per_episode = [json.loads((tmp_path / d / "summary.json").read_text())["per_episode"] for d in ("a", "b")]
    assert per_episode[0] == per_episode[1]
