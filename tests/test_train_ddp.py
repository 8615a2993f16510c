"""`robopolicy train launcher=ddp nproc=2` on CPU (gloo on loopback): 2 ranks x batch B give the gradients of
1 rank x batch 2B; a short run ends near the single-process weights; a killed rank ends the run with one sentence
and `resume=true` continues it to the weights of an uninterrupted run; the ranks listen on loopback only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from conftest import ROBOPOLICY, last_json
from safetensors.torch import load_file
from test_policies import make_batch, make_features, make_stats, small_config

from robopolicy.policies import make_policy
from robopolicy.train import LossModule, TrainConfig, batch_indices

B = 8
HELPER = Path(__file__).resolve().parent / "helpers" / "ddp_gradients.py"


def policy_and_batch():
    features = make_features()
    torch.manual_seed(0)
    policy = make_policy(small_config("mlp"), features, make_stats(features))  # a deterministic loss
    return policy, make_batch(features, 2 * B, seed=3)


def rank_processes(root) -> list:
    """The live DDP ranks (multiprocessing spawn children) under `root`; a zombie or vanished process is dead
    already (one left unreaped by another test once made psutil raise here)."""
    found = []
    for p in root.children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(p.cmdline()):
                found.append(p)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            pass
    return found


def test_two_ranks_of_batch_b_give_the_gradients_of_one_rank_of_batch_2b(tmp_path):
    store, out = str(tmp_path / "rendezvous"), str(tmp_path / "grads.safetensors")
    ranks = [subprocess.Popen([sys.executable, str(HELPER), str(rank), "2", store, out], stderr=subprocess.PIPE,
                              text=True) for rank in range(2)]
    errors = [proc.communicate(timeout=120)[1] for proc in ranks]  # both reaped before any assertion
    for proc, err in zip(ranks, errors):
        assert proc.returncode == 0, err[-2000:]
    distributed = load_file(out)
    policy, batch = policy_and_batch()
    loss, _ = LossModule(policy)(batch)
    loss.backward()
    worst = max((p.grad - distributed[n]).abs().max().item() for n, p in policy.named_parameters())
    assert worst <= 1e-6, worst
    assert max(p.grad.abs().max().item() for p in policy.parameters()) > 1e-3, "gradients should not be all zero"


def test_the_ranks_shards_are_the_single_process_batch():
    cfg = TrainConfig(data="d", out="o", batch_size=12, seed=4)
    for step in (0, 7):
        whole = batch_indices(cfg, step, 1000, None)
        shards = [batch_indices(cfg, step, 1000, None, rank, 3) for rank in range(3)]
        assert [len(s) for s in shards] == [4, 4, 4] and np.array_equal(np.concatenate(shards), whole)


# ---- through the console script ------------------------------------------------------------------------------
TINY = ["task=builtin/reach", "policy=mlp", "policy.hidden_dims=[32,32]", "batch_size=16", "threads=1",
        "log_every=5", "eval.episodes=0", "eval.final_episodes=0"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "reach"
    subprocess.run([ROBOPOLICY, "collect", "task=builtin/reach", "episodes=6", "num_envs=2", f"out={path}"],
                   check=True, capture_output=True, timeout=300)
    return path


def train(store: Path, out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([ROBOPOLICY, "train", f"data={store}", f"out={out}", *TINY, *extra], check=check,
                          capture_output=True, text=True, timeout=300)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / "last" / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_a_short_ddp_run_ends_near_the_single_process_weights(store, tmp_path):
    summary = last_json(train(store, tmp_path / "ddp", "steps=40", "launcher=ddp", "nproc=2"))
    assert summary["ranks"] == 2 and summary["steps"] == 40
    ddp, single = weights(tmp_path / "ddp"), weights(train(store, tmp_path / "one", "steps=40") and tmp_path / "one")
    other_seed = weights(train(store, tmp_path / "seed1", "steps=40", "seed=1") and tmp_path / "seed1")
    # Not bitwise: DDP averages each rank's masked mean, and windows padded at episode ends weigh differently
    # within a shard than within the whole batch. Far closer than another seed, though.
    assert max_diff(ddp, single) < 0.1 * max_diff(single, other_seed), (max_diff(ddp, single),
                                                                         max_diff(single, other_seed))


def test_a_killed_rank_ends_the_run_cleanly_and_resume_finishes_it_exactly(store, tmp_path):
    args = ["steps=300", "checkpoint_every=5", "launcher=ddp", "nproc=2"]
    train(store, tmp_path / "full", *args)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([ROBOPOLICY, "train", f"data={store}", f"out={killed}", *TINY, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((killed / "checkpoints").glob("step_*/train_state.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before its first checkpoint"
        time.sleep(0.01)
    ranks = rank_processes(psutil.Process(proc.pid))
    assert len(ranks) == 2, [p.cmdline() for p in ranks]
    listening = [c.laddr.ip for p in ranks for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening and all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for ip in listening), listening
    os.kill(ranks[1].pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "resume=true" in err and "Traceback" not in err, err[-2000:]
    assert not (killed / "summary.json").exists(), "the run finished before the kill: nothing was interrupted"
    assert not rank_processes(psutil.Process()), "a rank outlived the run"

    resumed = last_json(train(store, killed, *args, "resume=true"))
    assert 0 < resumed["resumed_from_step"] < 300
    assert max_diff(weights(killed), weights(tmp_path / "full")) <= 1e-6
