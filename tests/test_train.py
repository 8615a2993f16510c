"""`robopolicy train` end to end through the console script, and exact resume after a SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import ROBOPOLICY, last_json
from safetensors.torch import load_file

# A small flow policy and batch so a step takes milliseconds; one thread so runs are bitwise reproducible.
TINY = ["policy=flow", "policy.mlp.hidden_dim=32", "policy.mlp.n_blocks=1", "batch_size=16", "threads=1",
        "log_every=5"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "mw_push"
    subprocess.run([ROBOPOLICY, "collect", "task=metaworld/push-v3", "episodes=3", "num_envs=1", f"out={path}"],
                   check=True, capture_output=True, timeout=300)
    return path


def train_args(store: Path, out: Path, *extra: str) -> list[str]:
    return [ROBOPOLICY, "train", "task=metaworld/push-v3", f"data={store}", f"out={out}", *TINY, *extra]


def test_train_writes_checkpoint_summary_and_curves(store, tmp_path, cli):
    out = tmp_path / "run"
    proc = cli(*train_args(store, out, "steps=20", "eval.every=10", "eval.episodes=2", "eval.final_episodes=2",
                           "max_episode_steps=20", "checkpoint_every=5", "keep_checkpoints=null")[1:], check=True)
    summary = last_json(proc)
    assert summary["summary"] == str(out / "summary.json")
    assert json.loads((out / "summary.json").read_text())["steps"] == 20
    assert summary["policy"] == "flow" and summary["episodes"] == 3 and summary["resumed_from_step"] == 0
    assert summary["eval"]["episodes"] == 2 and 0.0 <= summary["eval"]["success_rate"] <= 1.0
    assert summary["train_seconds"] > 0 and summary["final_loss"] > 0
    assert (out / "curves.png").stat().st_size > 0
    last = out / "checkpoints" / "last"
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [f"step_{s:07d}" for s in (5, 10, 15, 20)]
    assert {"model.safetensors", "config.yaml", "features.json"} <= {p.name for p in last.iterdir()}
    # The checkpoint is usable on its own.
    evaluation = last_json(cli("eval", f"ckpt={out}", "episodes=2", "max_episode_steps=20", f"out={tmp_path / 'ev'}",
                               check=True))
    assert evaluation["episodes"] == 2

    # A second run into the same folder is refused without resume/overwrite, and changes nothing.
    before = (out / "summary.json").read_text()
    proc = cli(*train_args(store, out, "steps=20")[1:])
    assert proc.returncode != 0 and "resume=true" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "summary.json").read_text() == before


def test_resume_after_sigkill_gives_the_weights_of_an_uninterrupted_run(store, tmp_path):
    no_eval = ["steps=200", "checkpoint_every=5", "eval.episodes=0", "eval.final_episodes=0"]
    full = tmp_path / "full"
    subprocess.run(train_args(store, full, *no_eval), check=True, capture_output=True, timeout=300)
    assert len(list((full / "checkpoints").glob("step_*"))) == 2  # keep_checkpoints: the newest two by default

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_args(store, killed, *no_eval), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((killed / "checkpoints").glob("step_*/train_state.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before its first checkpoint"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists(), "the run finished before the kill: nothing was interrupted"

    resumed = subprocess.run(train_args(store, killed, *no_eval, "resume=true"), check=True, capture_output=True,
                             text=True, timeout=300)
    assert 0 < last_json(resumed)["resumed_from_step"] < 200
    expected = load_file(str(full / "checkpoints" / "last" / "model.safetensors"))
    actual = load_file(str(killed / "checkpoints" / "last" / "model.safetensors"))
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), f"{name} differs after resume"
