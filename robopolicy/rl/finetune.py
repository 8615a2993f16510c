"""`robopolicy finetune`: online refinement of a frozen base checkpoint in simulation.

    finetune(cfg, make_envs) -> summary
        cfg        configs/finetune.yaml (+ configs/algo/<name>.yaml under `algo`)
        make_envs  num_envs -> a gymnasium vector env of the task, built with autoreset disabled

Writes out/checkpoints/refined (a refined checkpoint; out/checkpoints/last points to it, so `robopolicy eval
ckpt=out` and deploy load it like any other), out/curves.json + out/curves.png (success rate against env steps) and out/summary.json.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from robopolicy.checkpoint import CheckpointError, read_checkpoint_info
from robopolicy.evaluate import EVAL_SEED, evaluate
from robopolicy.rl import residual, steer, value_guidance
from robopolicy.rl.core import base_reference, run_online, save_refined

# algo.name -> the module that builds its method (make_method) and its refined policy config (policy_config)
ALGOS = {"steer": steer, "steer_na": steer, "residual": residual, "residual_ppo": residual,
         "value_guided": value_guidance}


class FinetuneError(ValueError):
    """A refinement run that cannot start as asked (the message says why and what to do)."""


def resolve_base(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or a training run folder (its checkpoints/last)."""
    p = Path(path)
    if (p / "checkpoints" / "last").exists():
        p = p / "checkpoints" / "last"
    if not p.exists():
        raise FinetuneError(f"no base checkpoint at {path}: pass a checkpoint folder or a training run folder.")
    return p.resolve()


def finetune(cfg: DictConfig | dict, make_envs: Callable[[int], Any], *, log: Callable[[str], None] = print,
             progress=None) -> dict[str, Any]:
    cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    name = cfg["algo"]["name"]
    if name not in ALGOS:
        raise FinetuneError(f"algo {name!r} is unknown; choose one of {sorted(ALGOS)}.")
    out = Path(cfg["out"])
    if out.exists() and any(out.iterdir()):
        if not cfg.get("overwrite"):
            raise FinetuneError(f"{out} already holds a run: pass overwrite=true or another out=.")
        shutil.rmtree(out)
    base = resolve_base(cfg["ckpt"])
    info = read_checkpoint_info(base)
    if "base" in info["config"]["policy"]:
        raise CheckpointError(f"{base} is already a refined checkpoint ({info['policy']}); refine its base instead.")
    cfg["task"] = cfg.get("task") or info["config"].get("task")
    cfg["ckpt"] = str(base)
    torch.set_num_threads(int(cfg.get("threads") or 1))
    torch.manual_seed(int(cfg["seed"]))

    module = ALGOS[name]
    method, buffer = module.make_method(module.policy_config(base_reference(base), cfg["algo"]), cfg)
    n_params = sum(p.numel() for p in method.policy.parameters())
    log(f"finetune {name} on {cfg['task']}: base {base} ({info['policy']}), {n_params / 1e6:.3f}M refined "
        f"parameters, {cfg['env_steps']} env steps")
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    load_started = os.getloadavg()[0]
    ev = cfg["eval"]
    base_eval = None
    if int(ev.get("base_episodes", 0)):
        envs = make_envs(int(ev["num_envs"]))
        try:
            base_eval = evaluate(envs, method.policy.base, int(ev["base_episodes"]), seed=EVAL_SEED)
        finally:
            envs.close()
        log(f"base success {base_eval['success_rate']:.2f} over {base_eval['episodes']} episodes")
    result = run_online(method, buffer, make_envs, cfg, out, log=log, progress=progress)
    curves = result["curves"]
    train_seconds = round(time.perf_counter() - started, 1)
    final = None
    if int(ev.get("final_episodes", 0)):
        envs = make_envs(int(ev["num_envs"]))
        try:
            final = evaluate(envs, method.policy.eval(), int(ev["final_episodes"]), seed=EVAL_SEED)
        finally:
            envs.close()
        curves.add_eval(result["env_steps"], final)
    checkpoint = save_refined(out / "checkpoints" / "refined", method.policy, cfg,
                              extra_json={"algo": name, "env_steps": result["env_steps"]})
    _point_last(checkpoint)
    json_path, png_path = curves.write()
    target = float(ev.get("target", 0.9))
    confirm = int(ev.get("confirm_episodes", 0))
    summary = {
        "command": "finetune", "algo": name, "task": cfg["task"], "base": str(base), "checkpoint": str(checkpoint),
        "env_steps": result["env_steps"], "updates": result["updates"], "wall_seconds": train_seconds,
        "reward": {k: cfg.get(k) for k in ("reward", "reward_scale", "step_penalty", "success_bonus")},
        # the machine may be shared: this process's CPU seconds and the 1-minute load at start and end
        "cpu_seconds": round(_cpu_seconds() - cpu_started, 1),
        "load_average_1min": [round(load_started, 2), round(os.getloadavg()[0], 2)],
        "base_eval": _brief(base_eval), "final_eval": _brief(final), "target": target,
        # only evaluations of the confirming size count (the final one included)
        "steps_to_target": curves.steps_to(target, min_episodes=confirm),
        "wall_seconds_to_target": next((p["wall_seconds"] for p in curves.eval
                                        if p["success_rate"] >= target and p["episodes"] >= confirm), None),
        "train_success_last_50": result["train_success_rate"], "last_metrics": result["metrics"],
        "curves": str(json_path), "curves_png": str(png_path),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["summary"] = str(out / "summary.json")
    return summary


def _cpu_seconds() -> float:
    """CPU seconds of this process (learner, base sampling, evaluation driver; not the env worker processes)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def _point_last(checkpoint: Path) -> None:
    """checkpoints/last -> the refined checkpoint, so `robopolicy eval ckpt=RUN` finds it like a training run's."""
    tmp = checkpoint.parent / ".last.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(checkpoint.name)
    os.replace(tmp, checkpoint.parent / "last")


def _brief(result: dict | None) -> dict | None:
    return None if result is None else {k: v for k, v in result.items() if k != "per_episode"}
