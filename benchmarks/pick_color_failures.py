"""Where a pick_color policy fails: each failed episode classified from its states.

    .venv/bin/python benchmarks/pick_color_failures.py --ckpt runs/pick_color_vla --episodes 100

Evaluates the checkpoint on builtin/pick_color (seeds 100000 + k, as `eval`; an optional `--instruction-template`
for an unseen phrasing) and sorts every failure by the first thing that went wrong, read from the recorded states:
  never_grasped           no cube ever rose off the table
  grasped_wrong_cube      another cube rose, the instructed one never did
  right_cube_wrong_pad    the instructed cube rose and ended on the other pad
  right_cube_missed_pad   the instructed cube rose and ended on neither pad
  on_the_named_pad        the instructed cube ended on the instructed pad, yet not within the success radius or
                          not let go (what the scripted expert's demonstrations all end as)
A selection problem (the policy acted on the wrong object) shows in the second and third; a motor one in the first
and fourth. Prints one JSON object as the last line and writes benchmarks/results/pick_color_failures.json.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TASK = "builtin/pick_color"
LIFT = 0.02  # m above the cube's starting height: it is in the gripper, not pushed along the table
FAILURES = ("never_grasped", "grasped_wrong_cube", "right_cube_wrong_pad", "right_cube_missed_pad",
            "on_the_named_pad")


def classify(states: np.ndarray, names: Sequence[str], goal: dict, pad_radius: float) -> str:
    """states [T, D] of one failed episode (named by `names`), goal {"color", "target"} -> one of FAILURES."""
    column = {name: i for i, name in enumerate(names)}

    def lifted(colour: str) -> bool:
        z = states[:, column[f"cube_{colour}.z"]]
        return bool(z.max() - z[0] > LIFT)

    colours = sorted({n.split(".")[0].removeprefix("cube_") for n in names if n.startswith("cube_")})
    if not lifted(goal["color"]):
        return "grasped_wrong_cube" if any(lifted(c) for c in colours if c != goal["color"]) else "never_grasped"
    cube = states[-1, [column[f"cube_{goal['color']}.x"], column[f"cube_{goal['color']}.y"]]]
    pads = sorted({n.split(".")[0].removeprefix("pad_") for n in names if n.startswith("pad_")})
    on = [p for p in pads if np.linalg.norm(cube - states[-1, [column[f"pad_{p}.x"], column[f"pad_{p}.y"]]])
          <= pad_radius]
    if goal["target"] in on:
        return "on_the_named_pad"
    return "right_cube_wrong_pad" if on else "right_cube_missed_pad"


def main() -> None:
    import torch

    import sim
    from robopolicy.checkpoint import resolve_checkpoint
    from robopolicy.cli import env_kwargs_for_features, make_vector_env
    from robopolicy.data.spec import STATE_KEY
    from robopolicy.evaluate import EVAL_SEED, PolicyAgent
    from robopolicy.loading import load_policy
    from robopolicy.metrics import success_summary
    from robopolicy.rollout import run_episodes
    from sim.builtin.tasks import PAD_RADIUS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--num-envs", type=int, default=2)
    parser.add_argument("--instruction-template", default=None, help="e.g. 'grab the {color} block and set it on "
                                                                      "the {target} pad' (default: the task's own)")
    parser.add_argument("--max-episode-steps", type=int, default=None)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "pick_color_failures.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    policy = load_policy(resolve_checkpoint(args.ckpt)).eval()  # a run folder: its last checkpoint
    kwargs = env_kwargs_for_features(policy.features, args.max_episode_steps)
    if args.instruction_template:
        kwargs["instruction_template"] = args.instruction_template
    sim.make_env(TASK, **kwargs).close()  # an unknown template or task fails here, in one sentence
    names = policy.features[STATE_KEY]["names"]
    envs = make_vector_env(TASK, args.num_envs, kwargs)
    started = time.perf_counter()
    try:
        episodes = run_episodes(envs, PolicyAgent(policy, envs.num_envs), args.episodes, seed=EVAL_SEED,
                                record=True, instructions=True)
    finally:
        envs.close()
    failures = [{"seed": ep.seed, "instruction": ep.instruction, "goal": ep.goal,
                 "failure": classify(ep.stacked()[STATE_KEY], names, ep.goal, PAD_RADIUS)}
                for ep in episodes if not ep.success]
    counts = Counter(f["failure"] for f in failures)
    result = {"ckpt": str(args.ckpt), "instruction_template": args.instruction_template,
              **success_summary([ep.success for ep in episodes]),
              "failures": {kind: counts.get(kind, 0) for kind in FAILURES}, "per_failure": failures,
              "seconds": round(time.perf_counter() - started, 1)}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
