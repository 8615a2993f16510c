"""Sample efficiency of online refinement on one task and budget, side by side in one run: steer (DSRL-SAC),
steer_na (DSRL-NA), residual, value-guided selection (all on the same frozen base), bottleneck steering
(`steer_bottleneck`: steer with latent=bottleneck, on a base trained with policy.encoder.bottleneck=vib;
`steer_bottleneck_through_base`: steer_na with latent=bottleneck and actor_gradient=through_base), PPO
through the sampling chain (`reinflow` on a flow base, `dppo` on a diffusion base), refinement inside a learned
world model (`world_model`: its real env steps are the budget, one round per --eval-every real steps; its imagined
steps are reported apart, as `imagined_env_steps`; `world_model_visited`: imagined rollouts of 10 chunk steps
branched from every recorded frame, start_states=visited) and SAC from scratch.

    .venv/bin/python benchmarks/refine_sample_efficiency.py --base /tmp/h8/base --task metaworld/push-v3 \
        --env-steps 20000 --eval-every 2500 --eval-episodes 20 --final-episodes 100 \
        --algos steer,steer_bottleneck,residual --base-for steer_bottleneck=/tmp/h8/vib_base

A method runs on --base unless `--base-for NAME=CKPT` gives it its own; one whose base is of the wrong kind (dppo
on a flow base, steer_bottleneck on a base without a VIB encoder) is reported as skipped, with the reason.

Each method gets the same training env-step budget and the same evaluation seeds; we report the env steps (and
wall-clock seconds) of the first evaluation at or above --target, and the final success rate. From-scratch SAC
acts once per env step on the raw state (no chunks, no base). Prints one JSON object as the last line and writes
benchmarks/results/refine_sample_efficiency.json plus a PNG of all learning curves.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from robopolicy.checkpoint import resolve_checkpoint
from robopolicy.config import from_mapping
from robopolicy.finetune import finetune
from robopolicy.rl.buffer import ReplayBuffer
from robopolicy.rl.collector import RewardSpec, transition_shapes
from robopolicy.rl.online import Curves, EvalSchedule, plot_curves, run_online
from robopolicy.rl.sac import SAC
from robopolicy.rl.steer import SteerConfig
from sim.vector import make_vector_env

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def load_algo(name: str) -> dict:
    """configs/algo/<name>.yaml, with the config it builds on (its `defaults`) merged under it."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "algo" / f"{name}.yaml").read_text())
    parents = cfg.pop("defaults", [])
    merged: dict = {}
    for parent in parents:
        if parent != "_self_":
            merged.update(load_algo(parent))
    return {**merged, **cfg}


class ScratchPolicy(nn.Module):
    """A per-step SAC actor on the raw state behind the chunk runtime (horizon 1), so the same collector and
    `evaluate` drive it."""

    name = "sac_scratch"

    def __init__(self, features: dict, low: np.ndarray, high: np.ndarray, hidden: list[int]):
        super().__init__()
        from robopolicy.rl.sac import TanhGaussianActor

        self.features = {k: v for k, v in features.items() if k == "observation.state" or k == "action"}
        self.obs_keys = ["observation.state"]
        self.n_obs_steps = self.horizon = self.n_action_steps = self.n_exec = 1
        self.exec_slice = slice(0, 1)
        self.action_dim = int(self.features["action"]["shape"][0])
        self.feature_dim = int(self.features["observation.state"]["shape"][0])
        self.register_buffer("low", torch.as_tensor(low, dtype=torch.float32))
        self.register_buffer("high", torch.as_tensor(high, dtype=torch.float32))
        self.actor = TanhGaussianActor(self.feature_dim, self.action_dim, hidden)

    @property
    def noise_shape(self) -> tuple[int, int]:
        return (1, self.action_dim)

    def encode(self, obs) -> torch.Tensor:
        return torch.as_tensor(obs["observation.state"])[:, -1].float()

    def to_env(self, latent: torch.Tensor) -> torch.Tensor:
        return (self.low + (latent + 1) * 0.5 * (self.high - self.low))[:, None]  # [b, 1, A]

    @torch.no_grad()
    def sample_chunk(self, obs, noise=None, prefix_actions=None) -> torch.Tensor:
        return self.to_env(self.actor.deterministic(self.encode(obs)))


class ScratchSAC:
    keep_raw_obs = False
    on_policy = False

    def __init__(self, policy: ScratchPolicy, cfg: SteerConfig, seed: int):
        self.policy, self.gamma, self.n_step = policy, cfg.gamma, cfg.n_step
        self.sac = SAC(policy.feature_dim, policy.action_dim, cfg, actor=policy.actor)
        self.generator = torch.Generator().manual_seed(seed)

    def observe(self, obs):
        return self.policy.encode(obs)

    def act(self, obs, inputs, workers, explore):
        latent = self.sac.act(inputs, explore, self.generator)
        return latent, self.policy.to_env(latent), {}

    def start_episode(self, worker: int, env_steps: int) -> None:
        pass

    def update(self, batch):
        return self.sac.update(batch)


def run_scratch(args, make_envs, out: Path, reward: dict) -> dict:
    envs = make_envs(1)
    space, obs_space = envs.single_action_space, envs.single_observation_space
    envs.close()
    state_dim = obs_space["observation.state"].shape[0]
    features = {"observation.state": {"dtype": "float32", "shape": [state_dim]},
                "action": {"dtype": "float32", "shape": list(space.shape)}}
    # steer's SAC settings (its n-decision TD targets included) with SAC's own target entropy
    algo = from_mapping(SteerConfig, {**load_algo("steer"), "name": "sac_scratch", "target_entropy": None,
                                      "updates_per_step": args.scratch_updates_per_step, "collect_steps": 16})
    policy = ScratchPolicy(features, space.low, space.high, list(algo.hidden))
    method = ScratchSAC(policy, algo, args.seed)
    buffer = ReplayBuffer(args.env_steps + 10, transition_shapes(method, policy.feature_dim, policy.action_dim))
    cfg = common_cfg(args, {}, out, reward)
    ev = from_mapping(EvalSchedule, {k: v for k, v in cfg["eval"].items() if k != "base_episodes"
                                     and k != "final_episodes"})
    spec = RewardSpec(reward["reward"], reward["reward_scale"], reward["success_bonus"], reward["step_penalty"])
    started = time.perf_counter()
    result = run_online(method, buffer, make_envs, algo=algo, ev=ev, reward=spec, env_steps=args.env_steps,
                        num_envs=args.num_envs, seed=args.seed, out=out, task=args.task,
                        log=lambda m: print(f"[scratch] {m}", file=sys.stderr))
    curves: Curves = result["curves"]
    from robopolicy.evaluate import evaluate

    envs = make_envs(args.num_envs)
    try:
        final = evaluate(envs, policy.eval(), args.final_episodes)
    finally:
        envs.close()
    curves.add_eval(result["env_steps"], final)
    curves.write()
    return {"algo": "sac_scratch", "env_steps": result["env_steps"], "wall_seconds": round(time.perf_counter() - started, 1),
            "steps_to_target": curves.steps_to(args.target, min_episodes=args.final_episodes), "curves": curves,
            "final_success_rate": final["success_rate"], "final_ci95": final["success_ci95"], "reward": reward}


# The training reward is part of a method's recipe (the README's residual recipe uses the shaped reward, steer the
# sparse one): `--set ALGO.reward=dense` etc. set it per method. Every method is scored on task success alike.
REWARD_KEYS = ("reward", "reward_scale", "step_penalty", "success_bonus")


def reward_settings(args, overrides: dict) -> dict:
    """The run-wide reward settings, with this method's `--set` overrides of them."""
    return {"reward": args.reward, "reward_scale": args.reward_scale, "step_penalty": args.step_penalty,
            "success_bonus": args.success_bonus, **{k: v for k, v in overrides.items() if k in REWARD_KEYS}}


# benchmark names that are a method with settings of its own
VARIANTS = {"steer_bottleneck": ("steer", {"latent": "bottleneck"}),
            # the actor climbs the executed-action critic through the flow base's sampler (steer_na's critic, no
            # distillation), at the residual's update rate and SAC's -(latent dimension) entropy target
            "steer_bottleneck_through_base": ("steer_na", {"latent": "bottleneck", "actor_gradient": "through_base",
                                                            "target_entropy": None, "updates_per_step": 0.5}),
            "world_model_visited": ("world_model", {"start_states": "visited", "horizon_chunks": 10})}


def common_cfg(args, algo: dict, out: Path, reward: dict, base: Path | None = None) -> dict:
    return {"algo": algo, "ckpt": str(base or args.base), "task": args.task, "out": str(out), "overwrite": True,
            "seed": args.seed, "env_steps": args.env_steps, "num_envs": args.num_envs, **reward,
            "threads": args.threads,
            "eval": {"every": args.eval_every, "episodes": args.eval_episodes, "base_episodes": 0,
                     "final_episodes": args.final_episodes, "num_envs": args.num_envs, "target": args.target,
                     "confirm_episodes": args.final_episodes, "stop_at_target": args.stop_at_target}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="base checkpoint (or training run folder)")
    parser.add_argument("--task", default=None, help="task; default: the base's")
    parser.add_argument("--algos", default="steer,steer_na,residual,value_guided,sac_scratch",
                        help="also: steer_bottleneck, reinflow, dppo (each on a base of its kind: --base-for)")
    parser.add_argument("--base-for", action="append", default=[], metavar="NAME=CKPT",
                        help="this method's own base, e.g. dppo=runs/diffusion_base (repeatable)")
    parser.add_argument("--env-steps", type=int, default=20_000)
    parser.add_argument("--eval-every", type=int, default=2_500)
    parser.add_argument("--eval-episodes", type=int, default=20)
    parser.add_argument("--final-episodes", type=int, default=100)
    parser.add_argument("--base-episodes", type=int, default=100)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--stop-at-target", action="store_true")
    parser.add_argument("--num-envs", type=int, default=2)
    parser.add_argument("--reward", default="sparse")
    parser.add_argument("--reward-scale", type=float, default=1.0)
    parser.add_argument("--step-penalty", type=float, default=1.0, help="subtracted every env step (DSRL offset)")
    parser.add_argument("--success-bonus", type=float, default=0.0, help="added to a dense reward on success")
    parser.add_argument("--scratch-updates-per-step", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/refine_sample_efficiency")
    parser.add_argument("--set", action="append", default=[], metavar="ALGO.KEY=VALUE",
                        help="override an algo setting, e.g. steer.noise_scale=2.0, or a method's reward setting "
                             "(reward, reward_scale, step_penalty, success_bonus), e.g. residual.reward=dense "
                             "(repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.base = resolve_checkpoint(args.base)
    if args.task is None:
        from robopolicy.checkpoint import read_checkpoint_info

        args.task = read_checkpoint_info(args.base)["config"]["task"]

    def make_envs(n: int):
        return make_vector_env(args.task, n, autoreset="disabled")

    import yaml

    overrides: dict[str, dict] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        algo, _, field = key.partition(".")
        overrides.setdefault(algo, {})[field] = yaml.safe_load(value)

    from robopolicy.policies.base import PolicyConfigError

    bases = {}
    for item in args.base_for:
        name, _, path = item.partition("=")
        bases[name] = resolve_checkpoint(path)
    out_root = Path(args.out)
    results, runs = {}, {}
    base_evals: dict[str, dict] = {}
    for name in args.algos.split(","):
        print(f"== {name}", file=sys.stderr)
        reward = reward_settings(args, overrides.get(name, {}))
        if name == "sac_scratch":
            r = run_scratch(args, make_envs, out_root / name, reward)
            runs[name] = r.pop("curves")
            results[name] = r
            continue
        algo_name, variant = VARIANTS.get(name, (name, {}))
        algo = {**load_algo(algo_name), **variant,
                **{k: v for k, v in overrides.get(name, {}).items() if k not in REWARD_KEYS}}
        if algo_name == "world_model":  # the x-axis is REAL env steps: the budget, one round per evaluation
            algo = {**algo, "real_env_steps": args.env_steps, "round_env_steps": args.eval_every,
                    **{k: v for k, v in overrides.get(name, {}).items() if k not in REWARD_KEYS}}
        base = bases.get(name, args.base)
        cfg = common_cfg(args, algo, out_root / name, reward, base)
        if str(base) not in base_evals:
            cfg["eval"]["base_episodes"] = args.base_episodes
        try:
            summary = finetune(cfg, make_envs, log=lambda m, n=name: print(f"[{n}] {m}", file=sys.stderr))
        except PolicyConfigError as e:  # a base of another kind than the method refines
            print(f"[{name}] skipped: {e}", file=sys.stderr)
            results[name] = {"algo": name, "base": str(base), "skipped": str(e)}
            continue
        base_evals.setdefault(str(base), summary["base_eval"])
        runs[name] = Curves(out_root / name, name, args.task)
        runs[name].eval = json.loads(Path(summary["curves"]).read_text())["eval"]
        runs[name].train_episodes = json.loads(Path(summary["curves"]).read_text())["train_episodes"]
        results[name] = {"algo": name, "base": str(base), "env_steps": summary["env_steps"],
                         "wall_seconds": summary["wall_seconds"],
                         **({"imagined_env_steps": summary["imagined_env_steps"]}
                            if "imagined_env_steps" in summary else {}),
                         "steps_to_target": summary["steps_to_target"],
                         "wall_seconds_to_target": summary["wall_seconds_to_target"],
                         "final_success_rate": summary["final_eval"]["success_rate"],
                         "final_ci95": summary["final_eval"]["success_ci95"], "cpu_seconds": summary["cpu_seconds"],
                         "load_average_1min": summary["load_average_1min"], "settings": algo, "reward": reward}
    scratch = results.get("sac_scratch", {}).get("steps_to_target")
    for r in results.values():
        if r["algo"] != "sac_scratch" and r.get("steps_to_target"):
            # from-scratch never reaching the target within the budget: the ratio is at least budget / steps
            r["fewer_steps_than_scratch"] = (round(scratch / r["steps_to_target"], 2) if scratch
                                             else f">= {round(args.env_steps / r['steps_to_target'], 2)}")
    base_eval = base_evals.get(str(args.base))
    report = {
        "benchmark": "refine_sample_efficiency", "task": args.task, "base": str(args.base),
        "base_evals": {path: None if ev is None else {"success_rate": ev["success_rate"], "ci95": ev["success_ci95"]}
                       for path, ev in base_evals.items()},
        "base_success_rate": None if base_eval is None else base_eval["success_rate"],
        "base_ci95": None if base_eval is None else base_eval["success_ci95"],
        "env_step_budget": args.env_steps, "target": args.target, "reward": args.reward,
        "reward_scale": args.reward_scale, "step_penalty": args.step_penalty, "success_bonus": args.success_bonus,
        "eval": {"every": args.eval_every, "episodes": args.eval_episodes, "final_episodes": args.final_episodes},
        "results": results,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "threads": args.threads, "num_envs": args.num_envs},
    }
    results_dir = RESULTS
    results_dir.mkdir(parents=True, exist_ok=True)
    plot_curves(runs, results_dir / "refine_sample_efficiency.png", title=f"{args.task}: success vs env steps")
    (results_dir / "refine_sample_efficiency.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
