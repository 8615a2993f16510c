"""`robopolicy sweep`: 3 seeds x 2 settings of a tiny training run end in one table (CSV, JSON, plot) whose
per-setting success rates pool the seeds' evaluation episodes with a Wilson interval; a rerun reads finished runs."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
from conftest import ROBOPOLICY, last_json

from robopolicy.metrics import wilson_interval

SETTINGS = '["policy.hidden_dims=[16,16]","policy.hidden_dims=[32,32]"]'
RUN = ["task=builtin/reach", "policy=mlp", "steps=20", "batch_size=16", "eval.episodes=0", "eval.final_episodes=4",
       "eval.num_envs=2", "max_episode_steps=20"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "reach"
    subprocess.run([ROBOPOLICY, "collect", "task=builtin/reach", "episodes=6", "num_envs=2", f"out={path}"],
                   check=True, capture_output=True, timeout=300)
    return path


def test_a_sweep_of_3_seeds_by_2_settings_ends_in_one_table(store, tmp_path, cli):
    out = tmp_path / "sweep"
    args = ["sweep", f"out={out}", "seeds=[0,1,2]", f"settings={SETTINGS}", f"data={store}", *RUN]
    summary = last_json(cli(*args, check=True))
    assert summary["runs"] == 6 and summary["summary"] == str(out / "results.json")
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["setting"], r["seed"]) for r in rows] == [
        (s, str(seed)) for s in ("policy.hidden_dims=[16,16]", "policy.hidden_dims=[32,32]") for seed in (0, 1, 2)]
    assert all(r["episodes"] == "4" for r in rows)
    table = json.loads((out / "results.json").read_text())["settings"]
    assert [t["setting"] for t in table] == ["policy.hidden_dims=[16,16]", "policy.hidden_dims=[32,32]"]
    for entry in table:
        mine = [r for r in rows if r["setting"] == entry["setting"]]
        k = sum(int(r["successes"]) for r in mine)
        assert entry["episodes"] == 12 and entry["successes"] == k
        assert entry["success_ci95"] == pytest.approx(wilson_interval(k, 12), abs=1e-4)
    # each run is its own training run, with its seed and its setting
    sizes = {json.loads((Path(r["run"]) / "summary.json").read_text())["parameters"] for r in rows}
    assert len(sizes) == 2, "the two settings build networks of different sizes"
    assert len({(Path(r["run"]) / "checkpoints" / "last" / "model.safetensors").read_bytes() for r in rows}) == 6
    assert (out / "results.png").stat().st_size > 0

    # A rerun reads the finished runs instead of training them again.
    before = {r["run"]: (Path(r["run"]) / "summary.json").stat().st_mtime_ns for r in rows}
    again = cli(*args, check=True)
    assert again.stderr.count("done before, read") == 6
    assert {r: (Path(r) / "summary.json").stat().st_mtime_ns for r in before} == before


def test_a_sweep_refuses_to_set_a_runs_seed_or_out_itself(tmp_path, cli):
    proc = cli("sweep", f"out={tmp_path / 's'}", "settings=[\"seed=3\"]", "data=x")
    assert proc.returncode == 2 and "seed and out" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "s").exists()
