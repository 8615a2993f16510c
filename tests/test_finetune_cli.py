"""`robopolicy finetune` and `robopolicy eval` of its refined checkpoint, as a user runs them."""

import shutil

from conftest import last_json, run_cli


def test_finetune_steer_then_eval_the_refined_checkpoint(tmp_path):
    store, base, run = tmp_path / "reach", tmp_path / "base", tmp_path / "steer"
    run_cli("collect", "task=builtin/reach", "episodes=6", f"out={store}", check=True)
    run_cli("train", "task=builtin/reach", f"data={store}", f"out={base}", "steps=30", "eval.episodes=0",
            "eval.final_episodes=0", check=True)
    summary = last_json(run_cli("finetune", "algo=steer", f"ckpt={base}", f"out={run}", "env_steps=300",
                                "eval.every=0", "eval.base_episodes=0", "eval.final_episodes=4", check=True))
    assert summary["command"] == "finetune" and (run / "curves.json").exists()
    evaluated = last_json(run_cli("eval", f"ckpt={run}", "episodes=4", check=True))
    assert evaluated["episodes"] == 4 and evaluated["task"] == "builtin/reach"
    # A refined checkpoint refuses to load once its base is gone.
    shutil.rmtree(base)
    proc = run_cli("eval", f"ckpt={run}", "episodes=2")
    assert proc.returncode != 0 and "base" in proc.stderr and "Traceback" not in proc.stderr
