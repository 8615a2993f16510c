"""SIGKILL a real writer process at random moments: every finished episode stays readable, the store valid."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from robopolicy.data import DemoStore, validate_store

HELPER = Path(__file__).parent / "helpers" / "store_kill_writer.py"
sys.path.insert(0, str(HELPER.parent))
from store_kill_writer import FEATURES, make_episode  # noqa: E402


def run_writer_and_kill(store: Path, side: Path, delay: float, create: bool = False, after_appends: int = 0) -> None:
    """Start the writer, wait until it has the store open (or, when creating, not at all) and has finished
    `after_appends` appends, then SIGKILL it `delay` seconds later. Counting appends rather than seconds keeps the
    kills among the appends on a loaded machine, where the writer may need a second for one append."""
    args = [sys.executable, str(HELPER), str(store), str(side)] + (["--create"] if create else [])
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not create:
        ready = process.stdout.readline()
        assert ready.strip() == "ready", process.stderr.read()
    deadline = time.monotonic() + 60
    while after_appends and len(side.read_text().split()) < after_appends and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    if process.returncode != -signal.SIGKILL:  # it died on its own: show why
        pytest.fail(f"writer exited with {process.returncode}: {process.stderr.read()}")


def check_contents(store_path: Path, first: int = 0) -> int:
    """Episodes from `first` on hold exactly what the writer wrote; returns the committed episode count."""
    store = DemoStore.open(store_path)
    for i in range(first, store.num_episodes):
        got, expected = store.get_episode(i), make_episode(i)
        for key in FEATURES:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=f"episode {i} {key}")
        assert store.episodes[i]["task"] == f"episode {i}"
    return store.num_episodes


def test_sigkill_during_appends_keeps_finished_episodes(tmp_path):
    store_path = tmp_path / "store"
    DemoStore.create(store_path, FEATURES, fps=10).close()
    rng = np.random.default_rng(1234)
    committed, trials_with_progress = 0, 0
    for trial in range(12):
        side = tmp_path / f"finished-{trial}.txt"
        side.touch()
        run_writer_and_kill(store_path, side, delay=float(rng.uniform(0.0, 0.1)), after_appends=int(rng.integers(0, 3)))
        finished = [int(line) for line in side.read_text().split()]
        assert finished == list(range(committed, committed + len(finished)))
        assert validate_store(store_path) == [], f"trial {trial}"
        now = check_contents(store_path, first=max(committed - 1, 0))  # the new ones and their neighbour
        # exactly the finished appends, plus one if the kill fell between its commit and the side-file line
        assert now in (committed + len(finished), committed + len(finished) + 1), f"trial {trial}"
        trials_with_progress += now > committed
        committed = now
    assert trials_with_progress >= 6  # the kills really landed among appends, not all before the first

    # after all those kills, a normal writer appends and everything reads back
    with DemoStore.open(store_path, mode="a") as store:
        store.append_episode(make_episode(committed), task=f"episode {committed}")
    assert check_contents(store_path) == committed + 1  # every episode, start to end
    assert validate_store(store_path) == []


def test_sigkill_during_create_leaves_no_store_or_a_valid_one(tmp_path):
    rng = np.random.default_rng(99)
    for trial in range(4):
        store_path, side = tmp_path / f"store-{trial}", tmp_path / f"finished-{trial}.txt"
        run_writer_and_kill(store_path, side, delay=float(rng.uniform(0.2, 1.0)), create=True)
        if store_path.exists():
            assert validate_store(store_path) == []
            finished = len(side.read_text().split()) if side.exists() else 0
            assert check_contents(store_path) in (finished, finished + 1)
