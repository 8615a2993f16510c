"""`robopolicy finetune`: online refinement of a frozen base checkpoint in simulation, or offline refinement of its
weights from preference and intervention stores (`apo`, `dpo`, `hg_dagger`: robopolicy/preference.py).

    finetune(cfg, make_envs) -> summary
        cfg        configs/finetune.yaml (+ configs/algo/<name>.yaml under `algo`), a mapping or a FinetuneConfig
        make_envs  num_envs -> a gymnasium vector env of the task, built with autoreset disabled

Writes out/checkpoints/refined (a refined checkpoint; out/checkpoints/last points to it, so `robopolicy eval
ckpt=out` and deploy load it like any other), out/curves.json + out/curves.png (success rate against env steps)
and out/summary.json.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robopolicy.checkpoint import (
    CheckpointError,
    base_reference,
    point_last,
    read_checkpoint_info,
    resolve_checkpoint,
    save_checkpoint,
)
from robopolicy.config import config_class, from_mapping, plain, register_config, setting
from robopolicy.evaluate import EVAL_SEED, evaluate
from robopolicy.loading import load_policy
from robopolicy.preference import OFFLINE_ALGOS, refine_offline
from robopolicy.rl import METHODS, MODEL_BASED
from robopolicy.rl.collector import RewardSpec
from robopolicy.rl.online import EvalSchedule, run_online
from robopolicy.rl.refined import save_refined
from robopolicy.rl.steer import SteerConfig
from robopolicy.rl.task_profile import derive_defaults, profile_task
from robopolicy.rollout import RolloutConfig


@dataclass
class FinetuneEvalConfig(EvalSchedule):
    base_episodes: int = setting(20, "episodes evaluating the base alone before refinement (0: skip)")
    final_episodes: int = setting(100, "episodes of the evaluation at the end (0: none)")


@register_config("command", "finetune")
@dataclass(kw_only=True)
class FinetuneConfig:
    """configs/finetune.yaml without its `algo` group (each method's own config)."""

    ckpt: str = setting(doc="the base: a checkpoint folder or a training run folder (its checkpoints/last)")
    task: str | None = setting(None, "null: the task the base was trained for")
    out: str = setting(doc="run folder: checkpoints/refined (+ last), curves.json, curves.png, summary.json")
    overwrite: bool = setting(False, "delete a previous run in out and start over")
    seed: int = setting(0, "training episode k runs with seed seed + k; evaluation uses unseen seeds (100000 + k)")
    env_steps: int = setting(100_000, "budget of training environment steps (evaluation steps not counted)")
    num_envs: int = setting(2, "training envs (subprocesses)")
    reward: str = setting("sparse", "sparse: 1 on success (episodes end there) | dense: the task's shaped reward",
                          choices=("sparse", "dense"))
    reward_scale: float = setting(1.0, "multiplies the dense reward")
    success_bonus: float = setting(0.0, "added to the dense reward on the success step (MetaWorld's shaped reward "
                                   "has none; the built-in tasks already add 10)")
    step_penalty: float = setting(1.0, "subtracted every env step (DSRL's reward offset): sparse becomes -1 per "
                                  "step, 0 on success, so an untrained critic is optimistic")
    threads: int = setting(1, "torch CPU threads (the env workers use the other cores)")
    max_episode_steps: int | None = setting(None, "null: the task's default")
    auto: bool = setting(True, "fill the settings not given (reward, reward_scale, step_penalty; the residual's "
                         "decision rate and TD horizon) from the task and the base, measured on the base's "
                         "evaluation at the start; each choice is printed with its reason (robopolicy/rl/"
                         "task_profile.py)")
    eval: FinetuneEvalConfig = setting(FinetuneEvalConfig(), "evaluation schedule")
    rollout: RolloutConfig = setting(RolloutConfig(), "where the envs step (rollout=ray: Ray actors)")

    @property
    def reward_spec(self) -> RewardSpec:
        return RewardSpec(self.reward, self.reward_scale, self.success_bonus, self.step_penalty)


class FinetuneError(ValueError):
    """A refinement run that cannot start as asked (the message says why and what to do)."""


def finetune(cfg: Mapping[str, Any], make_envs: Callable[[int], Any], *, log: Callable[[str], None] = print,
             progress=None, base_info: Mapping[str, Any] | None = None,
             explicit: set[str] | None = None) -> dict[str, Any]:
    """Refine `cfg["ckpt"]` with `cfg["algo"]`; `base_info` is the base's `read_checkpoint_info` when the caller
    has already read it (the CLI, which checks the task's features against it). `explicit`: the dotted keys the
    user gave (they are never replaced by derived defaults); None: every key present in `cfg`."""
    cfg = plain(cfg)
    if explicit is None:
        explicit = set(_dotted_keys(cfg))
    algo_section = dict(cfg.pop("algo", None) or {})
    run = from_mapping(FinetuneConfig, cfg)
    name = algo_section.get("name")
    if name not in METHODS and name not in OFFLINE_ALGOS:
        raise FinetuneError(f"algo {name!r} is unknown; choose one of {sorted([*METHODS, *OFFLINE_ALGOS])}.")
    algo = from_mapping(config_class("algo", name), algo_section, where="algo")
    base = resolve_checkpoint(run.ckpt)
    info = base_info if base_info is not None else read_checkpoint_info(base)
    if "base" in info["config"]["policy"]:
        raise CheckpointError(f"{base} is already a refined checkpoint ({info['policy']}); refine its base instead.")
    out = Path(run.out)
    if out.exists() and any(out.iterdir()):
        if not run.overwrite:
            raise FinetuneError(f"{out} already holds a run: pass overwrite=true or another out=.")
        shutil.rmtree(out)
    task = run.task or info["config"].get("task")
    if name in OFFLINE_ALGOS:  # preferences and interventions: the base's weights, fine-tuned from stores
        return refine_offline(run, algo, base, info, task, make_envs, log=log, progress=progress)
    torch.set_num_threads(run.threads)
    torch.manual_seed(run.seed)

    started, cpu_started = time.perf_counter(), _cpu_seconds()
    load_started = os.getloadavg()[0]
    ev = run.eval
    base_policy = load_policy(base)
    base_eval = _evaluate(make_envs, base_policy, ev.base_episodes, ev.num_envs)
    if base_eval is not None:
        log(f"base success {base_eval['success_rate']:.2f} over {base_eval['episodes']} episodes")
    profile, derived = None, None
    if run.auto and base_eval is not None:  # defaults from the task and the base (explicit settings win)
        profile = profile_task(base_eval, base_policy, *_probe_envs(make_envs, ev.num_envs))
        # bottleneck steering moves a VIB latent, not the sampler noise: the noise-authority advice is not for it
        method = "steer_bottleneck" if isinstance(algo, SteerConfig) and algo.latent == "bottleneck" else name
        derived = derive_defaults(profile, method, explicit, run.reward)
        run, algo = _apply(derived, run, algo, name)
        for choice in derived.choices:
            log(f"default {choice.key}={choice.value}: {choice.why}")
        for advice in derived.advice:
            log(f"note: {advice}")
    elif run.auto:
        log("eval.base_episodes=0: no base episodes to measure the task on, so the configured defaults stand")
    torch.manual_seed(run.seed)  # the method's initialisation does not depend on the evaluation above
    base_ref = base_reference(base)  # hashed once; loading the refined checkpoint verifies it once more
    method, buffer = METHODS[name].make_method(base_policy, base_ref, algo, run.reward_spec, run.seed)
    n_params = sum(p.numel() for p in method.policy.parameters())
    log(f"finetune {name} on {task}: base {base} ({info['policy']}), {n_params / 1e6:.3f}M refined "
        f"parameters, {algo.real_env_steps if name in MODEL_BASED else run.env_steps} "
        f"{'real ' if name in MODEL_BASED else ''}env steps")
    if name in MODEL_BASED:  # refined in a world model; the real env steps are algo.real_env_steps
        from robopolicy.rl.world_model import run_model_based

        result = run_model_based(method, buffer, make_envs, algo=algo, ev=ev, reward=run.reward_spec,
                                 num_envs=run.num_envs, seed=run.seed, out=out, task=task,
                                 base_data=info["config"].get("data"), log=log, progress=progress)
    else:
        result = run_online(method, buffer, make_envs, algo=algo, ev=ev, reward=run.reward_spec,
                            env_steps=run.env_steps, num_envs=run.num_envs, seed=run.seed, out=out, task=task,
                            log=log, progress=progress)
    curves = result["curves"]
    train_seconds = round(time.perf_counter() - started, 1)
    final = _evaluate(make_envs, method.policy.eval(), ev.final_episodes, ev.num_envs)
    if final is not None:
        curves.add_eval(result["env_steps"], final)
    config = {**plain(run), "ckpt": str(base), "task": task, "algo": plain(algo)}
    extra = {"algo": name, "env_steps": result["env_steps"]}
    standalone = method.policy.standalone()
    if standalone is None:
        checkpoint = save_refined(out / "checkpoints" / "refined", method.policy, config, extra_json=extra)
    else:  # fine-tuned weights: a plain checkpoint of the base's kind that records where it came from
        checkpoint = save_checkpoint(out / "checkpoints" / "refined", standalone, config=config,
                                     extra_json={**extra, "refined_from": base_ref})
    point_last(checkpoint)
    json_path, png_path = curves.write()
    summary = {
        "command": "finetune", "algo": name, "task": task, "base": str(base), "checkpoint": str(checkpoint),
        "env_steps": result["env_steps"], "updates": result["updates"], "wall_seconds": train_seconds,
        **({"imagined_env_steps": result["imagined_env_steps"]} if "imagined_env_steps" in result else {}),
        "reward": {k: getattr(run, k) for k in ("reward", "reward_scale", "step_penalty", "success_bonus")},
        # the machine may be shared: this process's CPU seconds and the 1-minute load at start and end
        "cpu_seconds": round(_cpu_seconds() - cpu_started, 1),
        "load_average_1min": [round(load_started, 2), round(os.getloadavg()[0], 2)],
        "base_eval": _brief(base_eval), "final_eval": _brief(final), "target": ev.target,
        "task_profile": None if profile is None else profile.as_dict(),
        "derived_defaults": None if derived is None else {c.key: {"value": c.value, "why": c.why}
                                                          for c in derived.choices},
        "advice": None if derived is None else derived.advice,
        # only evaluations of the confirming size count (the final one included)
        "steps_to_target": curves.steps_to(ev.target, min_episodes=ev.confirm_episodes),
        "wall_seconds_to_target": next((p["wall_seconds"] for p in curves.eval
                                        if p["success_rate"] >= ev.target and p["episodes"] >= ev.confirm_episodes),
                                       None),
        "train_success_last_50": result["train_success_rate"], "last_metrics": result["metrics"],
        "curves": str(json_path), "curves_png": str(png_path),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["summary"] = str(out / "summary.json")
    return summary


def _dotted_keys(mapping: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in mapping.items():
        keys.append(prefix + key)
        if isinstance(value, Mapping):
            keys += _dotted_keys(value, f"{prefix}{key}.")
    return keys


def _apply(derived, run: FinetuneConfig, algo: Any, name: str) -> tuple[FinetuneConfig, Any]:
    """The run and algo configs with the derived choices set (validated again by their classes)."""
    top = {c.key: c.value for c in derived.choices if not c.key.startswith("algo.")}
    inner = {c.key.removeprefix("algo."): c.value for c in derived.choices if c.key.startswith("algo.")}
    run = from_mapping(FinetuneConfig, {**plain(run), **top})
    algo = from_mapping(config_class("algo", name), {**plain(algo), **inner}, where="algo")
    return run, algo


def _probe_envs(make_envs: Callable[[int], Any], num_envs: int) -> tuple[dict, int | None]:
    """The task's first observations on a few evaluation seeds (for the base's noise authority) and its episode
    limit in env steps (None when the env does not say)."""
    envs = make_envs(num_envs)
    try:
        observations, _ = envs.reset(seed=EVAL_SEED)
        try:
            horizon = int(envs.get_attr("max_episode_steps")[0])
        except Exception:  # an env without the attribute
            horizon = None
        return {k: v for k, v in observations.items() if isinstance(v, np.ndarray) and v.dtype != object}, horizon
    finally:
        envs.close()


def _evaluate(make_envs: Callable[[int], Any], policy, episodes: int, num_envs: int) -> dict | None:
    if not episodes:
        return None
    envs = make_envs(num_envs)
    try:
        return evaluate(envs, policy, episodes, seed=EVAL_SEED)
    finally:
        envs.close()


def _cpu_seconds() -> float:
    """CPU seconds of this process (learner, base sampling, evaluation driver; not the env worker processes)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def _brief(result: dict | None) -> dict | None:
    return None if result is None else {k: v for k, v in result.items() if k != "per_episode"}
