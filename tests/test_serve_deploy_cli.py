"""`robopolicy serve` and `robopolicy deploy server=...` as a user runs them: two processes on loopback."""

import json
import os
import re
import signal
import subprocess
import time

import numpy as np
from conftest import ROBOPOLICY, last_json, run_cli

import sim
from robopolicy.checkpoint import save_checkpoint
from robopolicy.data import validate_store
from robopolicy.features import features_from_env
from robopolicy.policies import make_policy

TASK = "builtin/reach"


def make_checkpoint(path):
    """A small (untrained) flow policy for the task: the plumbing, not the success rate, is under test."""
    env = sim.make_env(TASK)
    features = features_from_env(env.observation_space, env.action_space)
    env.close()
    stats = {k: {s: np.zeros(f["shape"], np.float32) if s in ("mean", "min", "q01") else
                 np.ones(f["shape"], np.float32) for s in ("mean", "std", "min", "max", "q01", "q99")}
             for k, f in features.items() if k in ("observation.state", "action")}
    cfg = {"name": "mlp", "horizon": 8, "n_obs_steps": 1, "n_action_steps": 4}
    policy = make_policy(cfg, features, stats)
    save_checkpoint(path, policy, config={"policy": cfg, "task": TASK})
    return path


def test_serve_then_deploy_through_the_server(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    server = subprocess.Popen([ROBOPOLICY, "serve", f"ckpt={ckpt}", "port=0", "token=secret"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        address = None
        deadline = time.time() + 120
        while address is None and time.time() < deadline:
            line = server.stderr.readline()
            match = re.search(r"on (127\.0\.0\.1:\d+)", line)
            address = match.group(1) if match else None
            assert server.poll() is None, "the server exited before listening"
        assert address, "the server never announced its address"
        wrong = run_cli("deploy", f"server={address}", "token=nope", f"task={TASK}", "episodes=1",
                        f"out={tmp_path / 'refused'}", "control.max_episode_s=3", timeout=180)
        summary = last_json(run_cli("deploy", f"server={address}", "token=secret", f"task={TASK}", "episodes=1",
                                    f"out={tmp_path / 'deploy'}", "control.max_episode_s=5", check=True,
                                    timeout=180))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert summary["episodes"] == 1 and summary["counts"]["chunks"] > 0
    assert validate_store(tmp_path / "deploy" / "episodes") == []
    # With the wrong token the server answers no chunk: the robot is held, never driven.
    refused = wrong.returncode != 0 or last_json(wrong)["counts"].get("chunks", 0) == 0
    assert refused


def test_deploy_local_checkpoint_and_bad_inputs(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    summary = last_json(run_cli("deploy", f"ckpt={ckpt}", "episodes=1", f"out={tmp_path / 'd'}", "seed=7",
                                "control.max_episode_s=4", check=True, timeout=180))
    assert summary["episodes"] == 1 and (tmp_path / "d" / "summary.json").exists()
    # each episode names its seed (the initial scene `robopolicy eval seed=7` starts from too)
    assert [e["seed"] for e in json.loads((tmp_path / "d" / "summary.json").read_text())["per_episode"]] == [7]
    # The summary is never overwritten silently.
    again = run_cli("deploy", f"ckpt={ckpt}", "episodes=1", f"out={tmp_path / 'd'}", timeout=180)
    assert again.returncode != 0 and "overwrite" in again.stderr
    missing = run_cli("deploy", f"ckpt={tmp_path / 'nothing'}", f"task={TASK}", "episodes=1",
                      f"out={tmp_path / 'e'}", timeout=180)
    assert missing.returncode != 0 and "nothing" in missing.stderr and "Traceback" not in missing.stderr
    # a bad value is refused at the edge, in one sentence naming the key, before anything starts
    bad = run_cli("deploy", f"ckpt={ckpt}", "control.mode=fast", f"out={tmp_path / 'f'}", timeout=180)
    assert bad.returncode != 0 and "control.mode='fast' is unknown" in bad.stderr and "Traceback" not in bad.stderr


def test_robot_side_configs_match_their_yaml_key_for_key():
    """configs/deploy.yaml, serve.yaml and robot/sim.yaml against their typed configs (same keys, same defaults)."""
    import yaml

    from real.host.deploy import ServeConfig
    from real.robot.deployment import DeployConfig
    from real.robot.sim_robot import SimRobotConfig
    from robopolicy.config import config_class, yaml_mismatches

    def load(name):
        with open(f"configs/{name}.yaml") as f:
            return yaml.safe_load(f)

    assert config_class("command", "deploy") is DeployConfig and config_class("command", "serve") is ServeConfig
    assert config_class("robot", "sim") is SimRobotConfig
    assert yaml_mismatches(DeployConfig, load("deploy"), skip=("defaults",)) == []
    assert yaml_mismatches(ServeConfig, load("serve")) == []
    assert yaml_mismatches(SimRobotConfig, load("robot/sim"), skip=("_target_",)) == []
    assert load("robot/sim")["_target_"] == SimRobotConfig.target
