"""`robopolicy collect` killed with SIGKILL at random moments leaves a valid store of finished episodes only."""

import os
import random
import signal
import subprocess
import time

import numpy as np
import pytest
from conftest import ROBOPOLICY, run_cli

from robopolicy.data import DemoStore, validate_store

TASK = "builtin/push"
EPISODES = 40


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted collection: what every killed store's episodes must equal, seed for seed."""
    path = tmp_path_factory.mktemp("ref") / "store"
    run_cli("collect", f"task={TASK}", f"episodes={EPISODES}", f"out={path}", check=True)
    store = DemoStore.open(path)
    return {e["extra"]["seed"]: store.get_episode(e["index"]) for e in store.episodes}


def _committed(path) -> int:
    """Episodes committed to the store at `path` so far (0 while it does not exist or is being created)."""
    try:
        return DemoStore.open(path).num_episodes
    except Exception:  # not there yet, or caught between the writer's first files
        return 0


def test_sigkill_at_random_moments_keeps_finished_episodes(tmp_path, reference):
    rng = random.Random(1234)
    trials, partial_stores = 10, 0
    for trial in range(trials):
        path = tmp_path / f"store{trial}"
        proc = subprocess.Popen([ROBOPOLICY, "collect", f"task={TASK}", f"episodes={EPISODES}", f"out={path}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        if trial % 3 == 0:  # sometimes during start-up, before or while the store is created
            time.sleep(rng.uniform(0.5, 4.0))
        else:  # mostly while episodes are being appended: after the first one (a loaded machine is slow to get
            # there), at a random moment of the appends that follow
            deadline = time.time() + 120
            while _committed(path) < 1 and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 2.0))
        os.killpg(proc.pid, signal.SIGKILL)  # the command and its simulator workers, with no chance to clean up
        proc.wait()
        if not path.exists():
            continue  # killed before the store was created: nothing to check, nothing half-made under the name
        assert validate_store(path) == [], f"trial {trial}: damaged store after SIGKILL"
        store = DemoStore.open(path)
        seeds = [e["extra"]["seed"] for e in store.episodes]
        assert len(seeds) == len(set(seeds))
        for e in store.episodes:
            got, want = store.get_episode(e["index"]), reference[e["extra"]["seed"]]
            assert set(got) == set(want)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"trial {trial}, {key}")
        partial_stores += 0 < store.num_episodes < EPISODES
    assert partial_stores >= 2, "the kills should land mid-collection in several trials"


def test_collect_resumes_a_killed_store(tmp_path, reference):
    path = tmp_path / "store"
    proc = subprocess.Popen([ROBOPOLICY, "collect", f"task={TASK}", f"episodes={EPISODES}", f"out={path}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:  # kill as soon as a few episodes are committed
        if path.exists() and validate_store(path) == [] and DemoStore.open(path).num_episodes >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = DemoStore.open(path).num_episodes
    run_cli("collect", f"task={TASK}", "episodes=3", f"out={path}", check=True)
    store = DemoStore.open(path)
    assert store.num_episodes == before + 3 and validate_store(path) == []
    seeds = [e["extra"]["seed"] for e in store.episodes]
    assert len(seeds) == len(set(seeds)), "appending must not repeat an episode seed"
