"""`robopolicy quickstart` end to end at a tiny size: every stage runs, and the table and summary report them."""

import json

from conftest import last_json


def test_quickstart_collects_trains_evaluates_deploys_and_refines(cli, tmp_path):
    store, out = tmp_path / "store", tmp_path / "run"
    proc = cli(
        "quickstart", f"store={store}", f"out={out}", "episodes=4", "train_steps=20", "eval_episodes=2",
        "deploy_episodes=1", "refine.base_demos=2", "refine.base_steps=10", "refine.env_steps=300",
        "refine.eval_every=0", "refine.eval_episodes=2", check=True, timeout=600,
    )
    summary = last_json(proc)
    assert summary["demonstrations"] == 4 and summary["eval_episodes"] == 2
    assert summary["deploy"]["episodes"] == 1
    refine = summary["refine"]
    assert refine["algo"] == "residual" and refine["env_steps"] >= 300
    assert refine["base"]["episodes"] == 2 and refine["refined"]["episodes"] == 2
    # the weak base trained on 2 sloppy demonstrations collected beside the store; the refined checkpoint names it
    weak = json.loads((out / "weak_base" / "summary.json").read_text())
    assert weak["episodes"] == 2 and (tmp_path / "store_sloppy" / "zarr.json").exists()
    finetune = json.loads((out / "refine" / "summary.json").read_text())
    assert "weak_base" in finetune["base"]
    # no overrides: finetune derived the shaped reward and its step penalty from the task and the base
    assert finetune["reward"]["reward"] == "dense" and finetune["reward"]["step_penalty"] == 2.0
    assert set(finetune["derived_defaults"]) >= {"reward", "step_penalty"}
    for row in ("success rate", "deployed", "refinement"):
        assert row in proc.stderr
    assert json.loads((out / "summary.json").read_text())["refine"] == refine
    # the refinement ran in its own process beside the other stages, its output in its log
    assert "background" in proc.stderr and "finetune residual" in (out / "refine.log").read_text()


def test_quickstart_reports_a_failed_background_refinement(cli, tmp_path):
    store, out = tmp_path / "store", tmp_path / "run"
    proc = cli(
        "quickstart", f"store={store}", f"out={out}", "episodes=2", "train_steps=5", "eval_episodes=1",
        "deploy_episodes=0", "refine.base_demos=2", "refine.base_steps=5", "refine.env_steps=300",
        "refine.eval_episodes=1", "refine.finetune=['algo.no_such_setting=1']", timeout=600,
    )
    assert proc.returncode != 0
    assert "refinement stage failed" in proc.stderr and "refine.log" in proc.stderr
    assert (out / "train" / "summary.json").exists()  # the other stages ran to the end
