"""`robopolicy finetune` and `robopolicy eval` of its refined checkpoint, as a user runs them."""

import json
import shutil

from conftest import last_json, run_cli


def test_finetune_steer_then_eval_the_refined_checkpoint(tmp_path):
    store, base, run = tmp_path / "reach", tmp_path / "base", tmp_path / "steer"
    run_cli("collect", "task=builtin/reach", "episodes=6", f"out={store}", check=True)
    run_cli("train", "task=builtin/reach", f"data={store}", f"out={base}", "steps=30", "eval.episodes=0",
            "eval.final_episodes=0", check=True)
    # target 0: every periodic 2-episode evaluation "crosses" it and is confirmed over 3 episodes
    summary = last_json(run_cli("finetune", "algo=steer", f"ckpt={base}", f"out={run}", "env_steps=300",
                                "eval.every=150", "eval.episodes=2", "eval.target=0.0", "eval.confirm_episodes=3",
                                "eval.base_episodes=0", "eval.final_episodes=4", check=True))
    assert summary["command"] == "finetune"
    points = [(p["env_steps"], p["episodes"]) for p in json.loads((run / "curves.json").read_text())["eval"]]
    assert points[0] == (0, 2) and points[-1][1] == 4
    periodic = points[1:-1]
    assert [n for _, n in periodic] == [2, 3] * (len(periodic) // 2) and len(periodic) >= 2
    assert all(a[0] == b[0] for a, b in zip(periodic[::2], periodic[1::2]))  # confirmed at the same step
    assert summary["steps_to_target"] == periodic[1][0]  # the first confirmed one, not the 2-episode one at 0
    evaluated = last_json(run_cli("eval", f"ckpt={run}", "episodes=4", check=True))
    assert evaluated["episodes"] == 4 and evaluated["task"] == "builtin/reach"
    # A refined checkpoint refuses to load once its base is gone.
    shutil.rmtree(base)
    proc = run_cli("eval", f"ckpt={run}", "episodes=2")
    assert proc.returncode != 0 and "base" in proc.stderr and "Traceback" not in proc.stderr
