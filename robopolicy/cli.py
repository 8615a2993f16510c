"""The `robopolicy` console script: one command word, then Hydra overrides (`key=value`).

Configs live in `configs/<command>.yaml` (groups: task/, policy/, algo/, robot/). We compose them with Hydra's
compose API rather than `@hydra.main`, so commands neither change the working directory nor write `outputs/`
folders, and so that each command prints one JSON object as the last line of standard output (logs and progress
bars go to standard error). Each command's own settings are then validated once, here, against its registered
dataclass (robopolicy/commands.py, TrainConfig in robopolicy/train.py): an unknown key or a wrong type is one
sentence naming the key. A group's section (train's `policy:`) goes on as a mapping to the code that builds it.

This is the one module of `robopolicy` that imports the simulators (`sim`) and the robot side (`real`); the rest
takes environments through the gymnasium API.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import sys
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from robopolicy.commands import CollectConfig, DataConfig, EvalConfig, ObsConfig, QuickstartConfig
from robopolicy.config import CONFIGS, ConfigError, describe, from_mapping, to_dict
from robopolicy.data.spec import (
    camera_name,
    feature_mismatch,
    image_key,
    is_image_key,
    policy_features,
    renamed_features,
)
from robopolicy.rollout import RolloutConfig

if TYPE_CHECKING:
    from robopolicy.finetune import FinetuneConfig
    from robopolicy.train import TrainConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

COMMANDS = {
    "collect": "roll out a task's scripted expert (or a checkpoint: ckpt=) into a demonstration store",
    "data": "inspect, check, convert and curate stores: data info|validate|stats|export|import|quality|filter|label|view",
    "train": "offline training of a policy on a store, with periodic evaluation in simulation",
    "eval": "success rate (95% Wilson interval), returns and videos of a checkpoint in simulation",
    "finetune": "refinement of a base checkpoint: online in simulation (algo=steer|steer_na|residual|value_guided|"
                "reinflow|dppo), inside a learned world model (algo=world_model) or "
                "offline from preference stores (algo=apo|dpo|hg_dagger)",
    "serve": "a policy server for remote robots (msgpack protocol, loopback by default)",
    "deploy": "a control node driving a robot (robot=sim: a MuJoCo task in real time) with a local or remote policy",
    "quickstart": "the embedded default: collect, train, evaluate, deploy and refine on a built-in task",
    "sweep": "train or finetune over seeds x settings, gathered into one table (CSV, JSON, plot) with intervals",
    "world-model": "world-model train: a latent world model learned from stores, with its held-out report",
}
DATA_COMMANDS = ("info", "validate", "stats", "export", "import", "quality", "filter", "label", "view")
SUBCOMMANDS = {"data": DATA_COMMANDS, "world-model": ("train",)}


# The module that registers each command's typed config ("command", <command>) and each group's configs
# ("policy", <name>) ...; imported on demand (train's and the groups' pull in torch).
CONFIG_MODULES = {"collect": "robopolicy.commands", "data": "robopolicy.commands", "eval": "robopolicy.commands",
                  "quickstart": "robopolicy.commands", "train": "robopolicy.train",
                  "finetune": "robopolicy.finetune", "serve": "real.host.deploy", "deploy": "real.robot.deployment",
                  "sweep": "robopolicy.sweep", "world_model": "robopolicy.world_model.train"}
GROUP_MODULES = {"policy": "robopolicy.policies", "algo": "robopolicy.rl", "robot": "real.robot.robots"}


class UserError(Exception):
    """A problem with the user's input: reported as one sentence and a non-zero exit, never a traceback."""


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [UserError, FileNotFoundError, FileExistsError, ValueError]
    try:
        from real.robot.control_node import ControlNodeError
        from real.robot.robots import ROBOT_ERRORS

        errors += [ControlNodeError, *ROBOT_ERRORS]
    except ImportError:
        pass
    try:
        from robopolicy.data import StoreError

        errors.append(StoreError)
    except ImportError:
        pass
    return tuple(errors)


# Settings whose values are plain text (an instruction, a template with {fields}): written unquoted on the command
# line, they are quoted here for Hydra, whose grammar refuses spaces and braces in a bare value.
FREE_TEXT_KEYS = ("instruction_template", "instruction")


def quote_free_text(override: str) -> str:
    key, sep, value = override.partition("=")
    if not sep or key.lstrip("+~") not in FREE_TEXT_KEYS or value[:1] in ("'", '"') or value == "null":
        return override
    return key + "='" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def rollout_shorthand(override: str) -> str:
    """`rollout=ray` (a backend's name) stands for `rollout.backend=ray`."""
    key, sep, value = override.partition("=")
    return f"rollout.backend={value}" if sep and key == "rollout" else override


def list_of_paths(override: str) -> str:
    """`data=A` and `data=A,B` (world-model train) as the lists `data=[A]`, `data=[A,B]` (Hydra would read a bare
    comma as a sweep)."""
    key, sep, value = override.partition("=")
    return f"{key}=[{value}]" if key == "data" and sep and value[:1] != "[" else override


def compose(command: str, overrides: list[str]) -> DictConfig:
    overrides = [rollout_shorthand(quote_free_text(o)) for o in overrides]
    if command == "world_model":
        overrides = [list_of_paths(o) for o in overrides]
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return hydra_compose(config_name=command, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        message = str(e).strip().splitlines()[0]
        raise UserError(f"Bad setting for `robopolicy {command}`: {message} (see `robopolicy {command} --help`).") from e


def command_groups(command: str) -> dict[str, str]:
    """The config groups a command's YAML picks in its `defaults:` list, group -> option (train: policy -> flow).
    Their sections are validated by the group's own registered config, not by the command's."""
    import yaml

    entries = yaml.safe_load((CONFIG_DIR / f"{command}.yaml").read_text()).get("defaults") or []
    return {group.removeprefix("override ").strip("/"): option for entry in entries if isinstance(entry, dict)
            for group, option in entry.items()}


def group_config_name(group: str, option: str, section: Mapping[str, Any]) -> str:
    """The registry name of a group file's config: its file stem where a config is registered under it (robots,
    presets such as policy/flow_image), else its `name:` (the class it configures)."""
    importlib.import_module(GROUP_MODULES[group])
    return option if group == "robot" or (group, option) in CONFIGS else str(section.get("name", option))


def command_config_class(command: str) -> type | None:
    """The registered dataclass of a command's own settings (None while its module registers none)."""
    importlib.import_module(CONFIG_MODULES[command])
    return CONFIGS.get(("command", command))


def group_config_class(group: str, name: str) -> type | None:
    importlib.import_module(GROUP_MODULES[group])
    return CONFIGS.get((group, name))


def configure(command: str, overrides: list[str]) -> tuple[Any, DictConfig]:
    """Compose configs/<command>.yaml with the overrides, then validate the command's own settings (every section
    but its groups') once: (the typed config, or None where none is registered yet; the composed config)."""
    cfg = compose(command, overrides)
    groups = command_groups(command)
    cls = command_config_class(command)
    settings = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False).items()
                if k not in groups}
    for key, value in settings.items():
        if value == "???":
            doc = _field_doc(cls, key)
            raise UserError(f"`robopolicy {command}` needs {key}=...{f' ({doc})' if doc else ''}; "
                            f"see `robopolicy {command} --help`.")
    try:
        for group in ("policy", "algo"):  # a group section is checked by its own class, named by its `name:`
            if group in groups:
                section = OmegaConf.to_container(cfg[group], resolve=True)
                from_mapping(group_config_class(group, str(section.get("name"))) or _unknown(group, section),
                             section, where=group)
        return (None if cls is None else from_mapping(cls, settings)), cfg
    except ConfigError as e:
        raise UserError(f"Bad setting for `robopolicy {command}`: {str(e).rstrip('.')} "
                        f"(see `robopolicy {command} --help`).") from e


def _unknown(group: str, section: Mapping[str, Any]) -> type:
    known = sorted(name for g, name in CONFIGS if g == group)
    raise ConfigError(f"{group}.name={section.get('name')!r} is unknown; choose one of {', '.join(known)}.")


def _field_doc(cls: type | None, name: str) -> str:
    fields = dataclasses.fields(cls) if cls is not None else ()
    return next((f.metadata.get("doc", "") for f in fields if f.name == name), "")


def run(command: str, overrides: list[str], sub: str | None = None) -> dict:
    """Configure and run one command (`sub`: the `data` subcommand); returns its summary."""
    if command == "sweep":  # its own settings; every other override goes to each run
        from robopolicy.sweep import split_overrides, sweep

        own, base = split_overrides(overrides)
        config, _ = configure(command, own)
        return sweep(config, run, base=base, log=lambda m: print(m, file=sys.stderr))
    config, cfg = configure(command, overrides)
    if command == "data":
        return cmd_data(config, sub)
    if command == "train":
        return cmd_train(config, OmegaConf.to_container(cfg.policy, resolve=True))
    if command == "finetune":  # the keys given here are never replaced by defaults derived from the task
        explicit = {o.partition("=")[0].lstrip("+~") for o in overrides if "=" in o} - {"algo"}
        return cmd_finetune(config, OmegaConf.to_container(cfg.algo, resolve=True), explicit)
    if command == "world_model":
        return cmd_world_model(config)
    if command in ("collect", "eval", "quickstart"):
        return {"collect": cmd_collect, "eval": cmd_eval, "quickstart": cmd_quickstart}[command](config)
    # serve and deploy (typed by the robot side) still read the composed config.
    return {"serve": cmd_serve, "deploy": cmd_deploy}[command](cfg)


def emit(summary: dict) -> None:
    """The command's figures: one JSON object, the last line of standard output."""
    sys.stdout.write(json.dumps(summary, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, disable=None)


# --------------------------------------------------------------------------------------------- simulation glue


def env_kwargs(obs: ObsConfig, max_episode_steps: int | None) -> dict:
    """Keyword arguments for `sim.make_env` from collect's `obs:` section."""
    kwargs: dict[str, Any] = {"images": list(obs.cameras) if obs.images and obs.cameras else obs.images,
                              "image_size": obs.image_size}
    if max_episode_steps:
        kwargs["max_episode_steps"] = max_episode_steps
    return kwargs


def env_kwargs_for_features(features: Mapping[str, Mapping], max_episode_steps: int | None) -> dict:
    """Env options that produce the observation keys a store or a checkpoint was made with."""
    cams = [camera_name(k) for k in features if is_image_key(k)]
    kwargs: dict[str, Any] = {"images": cams or False}
    if cams:
        kwargs["image_size"] = int(features[image_key(cams[0])]["shape"][0])
    if max_episode_steps:
        kwargs["max_episode_steps"] = max_episode_steps
    return kwargs


def make_vector_env(task: str, num_envs: int, kwargs: dict, rollout: RolloutConfig | None = None):
    """The rollout backend's vector env (robopolicy/rollout.py): workers in subprocesses (shared-memory
    observations) or Ray actors; either way we reset finished workers ourselves.

    Callers have already built one env of `task` in this process (to read or check its features), so an unknown
    task or a bad option fails there, with its own message, before any worker starts.
    """
    if rollout is not None and rollout.backend == "ray":
        try:
            from sim.ray_vector import RayVectorEnv
        except ImportError as e:
            raise UserError(f"rollout=ray needs Ray ({e}): pip install 'robopolicy[scale]'.") from e
        return RayVectorEnv(task, num_envs, workers=rollout.workers, address=rollout.address,
                            max_restarts=rollout.max_restarts, **kwargs)
    from sim.vector import make_vector_env as make

    return make(task, num_envs, autoreset="disabled", **kwargs)


def _check_env_matches(task: str, kwargs: dict, features: Mapping[str, Mapping], what: str) -> None:
    import sim
    from robopolicy.features import features_from_env

    env = sim.make_env(task, **kwargs)
    env_features = features_from_env(env.observation_space, env.action_space,
                                     getattr(env.unwrapped, "feature_names", None))
    env.close()
    mismatch = feature_mismatch(policy_features(features), env_features, f"features of {what} and of task {task}")
    if mismatch:
        raise UserError(mismatch)
    _note_renamed(policy_features(features), env_features, what, task)


def _note_renamed(features: Mapping[str, Mapping], env_features: Mapping[str, Mapping], what: str, task: str) -> None:
    """Says on stderr when `what` names dimensions otherwise than the task does now; the data still fit."""
    for key, (old, new) in renamed_features(features, env_features).items():
        print(f"note: {what} names {key}'s dimensions otherwise than {task} does now ({old!r} where it has {new!r}); "
              "it keeps its own names, which a policy that reads them (the vla's state tokens) uses; collect anew "
              "(and retrain) for the task's.", file=sys.stderr)


# -------------------------------------------------------------------------------------------------- commands


def cmd_collect(cfg: CollectConfig) -> dict:
    import sim
    from robopolicy.collect import collect
    from robopolicy.data import DemoStore
    from robopolicy.features import features_from_env

    task, out = cfg.task, cfg.out
    if cfg.episodes < 1:
        raise UserError(f"episodes must be at least 1, got {cfg.episodes}.")
    kwargs = env_kwargs(cfg.obs, cfg.max_episode_steps)
    probe = sim.make_env(task, **kwargs)
    features = features_from_env(probe.observation_space, probe.action_space,
                                 getattr(probe.unwrapped, "feature_names", None))
    fps, description = probe.unwrapped.fps, probe.unwrapped.task_description
    instructed = bool(getattr(probe.unwrapped, "goal_fields", None))  # a language task: per-episode instructions
    probe.close()
    num_envs = min(cfg.num_envs, cfg.episodes)
    extra = {} if cfg.expert.dart is None else {"dart": cfg.expert.dart}
    if extra and not task.startswith("builtin/"):
        raise UserError(f"expert.dart (DART exploration) is available for the built-in tasks only, not {task}.")
    agent, source = None, cfg.source
    if cfg.ckpt is not None:  # a policy's rollouts
        from robopolicy.checkpoint import read_checkpoint_info, resolve_checkpoint
        from robopolicy.evaluate import PolicyAgent
        from robopolicy.loading import load_policy

        ckpt = resolve_checkpoint(cfg.ckpt)
        _check_env_matches(task, kwargs, read_checkpoint_info(ckpt)["features"], f"the checkpoint {ckpt}")
        agent, source = PolicyAgent(load_policy(ckpt).eval(), num_envs), "policy" if source == "expert" else source
        experts = []
    else:
        experts = [sim.make_expert(task, noise=cfg.expert.noise, sloppy=cfg.expert.sloppy, **extra)
                   for _ in range(num_envs)]
    if Path(out).exists() and not cfg.overwrite:
        store = DemoStore.open(out, mode="a")
        mismatch = feature_mismatch(features, store.features, "store features")
        if mismatch:
            raise UserError(f"{out} already holds a store with other features ({mismatch}); "
                            "pick another out= or pass overwrite=true.")
        _note_renamed(store.features, features, f"the store {out}", task)
    else:
        store = DemoStore.create(out, features=features, fps=fps, overwrite=cfg.overwrite,
                                 info={"task": task, "robot": task.split("/")[0]})
    first = store.num_episodes
    # Appending continues after the seeds already recorded, so a store never holds the same episode twice.
    seeds = [e.get("extra", {}).get("seed") for e in store.episodes]
    seed = max([cfg.seed - 1] + [s for s in seeds if s is not None]) + 1
    envs = make_vector_env(task, num_envs, kwargs, cfg.rollout)
    try:
        with progress(cfg.episodes, f"collect {task}") as bar:
            summary = collect(envs, experts, store, cfg.episodes, seed=seed, task=description, source=source,
                              progress=bar, instructions=instructed, agent=agent)
    finally:
        envs.close()
    return {"command": "collect", "task": task, "store": str(out), "first_episode": first, "first_seed": seed,
            "store_episodes": store.num_episodes, **summary}


def _needs(command: str, key: str, value: Any) -> Any:
    if value is None:
        raise UserError(f"`robopolicy {command}` needs {key}=... (see `robopolicy data --help`).")
    return value


def cmd_data(cfg: DataConfig, sub: str) -> dict:
    from robopolicy.data import DemoStore, validate_store

    command = f"data {sub}"
    if sub == "import":
        return _data_import(cfg)
    path = _needs(command, "store", cfg.store)
    if not Path(path).exists():
        raise UserError(f"No store at {path}: check the path (stores are made by `robopolicy collect`).")
    if sub == "validate":
        problems = validate_store(path)
        summary = {"command": command, "store": str(path), "valid": not problems, "problems": problems}
        if problems:
            emit(summary)
            raise UserError(f"The store is damaged: {problems[0]}" + (f" (and {len(problems) - 1} more problems)"
                                                                   if len(problems) > 1 else ""))
        return summary
    if sub == "export":
        from robopolicy.data.lerobot import export_lerobot

        if cfg.format != "lerobot":
            raise UserError(f"data export writes format=lerobot only, not {cfg.format!r}.")
        out = _needs(command, "out", cfg.out)
        return {"command": command, **export_lerobot(path, out, repo_id=cfg.repo_id, video=cfg.video)}
    if sub == "quality":
        from robopolicy.data.quality import quality_report

        out = cfg.out or str(Path(path).with_name(Path(path).name + "_quality"))
        return {"command": command, **quality_report(path, out)}
    if sub == "filter":
        from robopolicy.data.quality import filter_store

        out = _needs(command, "out", cfg.out)
        return {"command": command, **filter_store(path, out, min_quality=cfg.min_quality, overwrite=cfg.overwrite)}
    if sub == "label":  # preference labels written into the metadata of episodes recorded without them
        from robopolicy.data.preferences import label_store

        with DemoStore.open(path, mode="a") as store:
            label_store(store)
            return {"command": command, "store": str(path), "preference_labels": _preference_counts(store)}
    store = DemoStore.open(path)
    if sub == "view":  # the recorded episodes in rerun, as `deploy view=true` shows them live
        from real.robot.live_view import LiveView, LiveViewError

        target = cfg.view_address or cfg.out or str(Path(path).with_name(Path(path).name + "_view.rrd"))
        try:
            view = LiveView(None if cfg.view_address else target, cfg.view_address, application_id="robopolicy data")
        except LiveViewError as exc:
            raise UserError(str(exc)) from None
        try:
            logged = view.log_store(store, cfg.episodes)
        finally:
            view.close()
        return {"command": command, "store": str(path), "view": target, **logged}
    if sub == "info":
        successes = [e.get("success") for e in store.episodes]
        sources: dict[str, int] = {}
        for e in store.episodes:
            sources[e["source"]] = sources.get(e["source"], 0) + 1
        return {
            "command": "data info", "store": str(path), "episodes": store.num_episodes,
            "frames": store.num_frames, "fps": store.fps, "features": store.features,
            "tasks": sorted({e["task"] for e in store.episodes}), "sources": sources,
            "success_rate": (sum(bool(s) for s in successes) / len(successes)) if successes else None,
            "preference_labels": _preference_counts(store),
        }
    stats = store.compute_stats()
    return {"command": "data stats", "store": str(path),
            "stats": {k: {s: v.tolist() for s, v in d.items()} for k, d in stats.items()}}


def _preference_counts(store) -> dict:
    """Desirable / undesirable segments and pairs (robopolicy/data/preferences.py); `stored`: all from metadata."""
    from robopolicy.data.preferences import label_counts, store_labels

    labels, stored = store_labels(store)
    return {**label_counts(labels), "stored": stored}


def _data_import(cfg: DataConfig) -> dict:
    src, out = _needs("data import", "src", cfg.src), _needs("data import", "out", cfg.out)
    if not Path(src).exists():
        raise UserError(f"No dataset at {src}: pass src= a LeRobot dataset folder or a robomimic .hdf5 file.")
    if cfg.format == "lerobot":
        from robopolicy.data.lerobot import import_lerobot

        summary = import_lerobot(src, out, overwrite=cfg.overwrite)
    else:
        from robopolicy.data.robomimic import import_robomimic

        summary = import_robomimic(src, out, overwrite=cfg.overwrite, filter_key=cfg.filter_key)
    return {"command": "data import", **summary}


def cmd_train(cfg: TrainConfig, policy: dict) -> dict:
    from robopolicy.data import DemoStore
    from robopolicy.train import select_features, train

    if not Path(cfg.data).exists():
        raise UserError(f"No store at {cfg.data}: make one with `robopolicy collect task={cfg.task} out={cfg.data}`.")
    features = select_features(DemoStore.open(cfg.data).features, cfg.use_images)
    kwargs = env_kwargs_for_features(features, cfg.max_episode_steps)
    _check_env_matches(cfg.task, kwargs, features, f"the store {cfg.data}")
    with progress(cfg.steps, f"train {policy.get('name')}") if cfg.launcher == "none" else nullcontext() as bar:
        # a partial, not a lambda: with launcher=ddp it travels to rank 0's process
        return train(cfg, policy, make_envs=functools.partial(make_vector_env, cfg.task, cfg.eval.num_envs, kwargs),
                     progress=bar, log=lambda m: print(m, file=sys.stderr))


def cmd_eval(cfg: EvalConfig) -> dict:
    from robopolicy.checkpoint import read_checkpoint_info, resolve_checkpoint
    from robopolicy.loading import load_policy

    ckpt = resolve_checkpoint(cfg.ckpt)
    info = read_checkpoint_info(ckpt)
    tasks = list(cfg.tasks or [cfg.task or info["config"].get("task")])
    if not all(tasks):
        raise UserError(f"The checkpoint {ckpt} names no task: pass task=...")
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    features = info["features"]
    kwargs = env_kwargs_for_features(features, cfg.max_episode_steps)
    if cfg.instruction_template is not None:
        kwargs["instruction_template"] = cfg.instruction_template
    if cfg.misinstruct:
        kwargs["misinstruct"] = True
    for task in tasks:
        _check_env_matches(task, kwargs, features, f"the checkpoint {ckpt}")
    policy = load_policy(ckpt, num_inference_steps=cfg.num_inference_steps)
    if cfg.wm is not None:
        return _eval_in_world_model(cfg, policy, ckpt, tasks, kwargs)
    if cfg.guidance is not None:  # value-guided selection (guidance=value n_samples=N) or none (the base alone)
        from robopolicy.rl.value_guidance import apply_guidance

        policy = apply_guidance(policy, cfg.guidance, cfg.n_samples, ckpt=str(ckpt))
    name = "_".join(t.replace("/", "_") for t in tasks)
    out = Path(cfg.out) if cfg.out else ckpt / f"eval_{name}"
    out.mkdir(parents=True, exist_ok=True)
    results = {task: _eval_task(cfg, policy, task, kwargs, out / task.replace("/", "_") if len(tasks) > 1 else out)
               for task in tasks}
    if len(tasks) == 1:
        summary = {"command": "eval", "checkpoint": str(ckpt), "task": tasks[0], **results[tasks[0]]}
    else:
        from robopolicy.metrics import mean_success_summary, success_summary

        pooled = success_summary([e["success"] for r in results.values() for e in r["per_episode"]])
        mean = mean_success_summary(list(results.values()))
        summary = {"command": "eval", "checkpoint": str(ckpt), "tasks": tasks, **pooled,
                   "mean_success_rate": mean["success_rate"], "mean_success_ci95": mean["success_ci95"],
                   "per_task": results}
    for key in ("instruction_template", "misinstruct"):
        if kwargs.get(key):
            summary[key] = kwargs[key]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    brief = {k: v for k, v in summary.items() if k != "per_episode"}
    if "per_task" in brief:
        brief["per_task"] = {t: {k: v for k, v in r.items() if k != "per_episode"} for t, r in results.items()}
    brief["summary"] = str(out / "summary.json")
    return brief


def _eval_in_world_model(cfg: EvalConfig, policy, ckpt: Path, tasks: list[str], kwargs: dict) -> dict:
    """`eval wm=WM`: the success rate the world model predicts, from the evaluation's own start states (env
    resets with its seeds; no simulator step) or the model's training episodes' first states."""
    import numpy as np

    import sim
    from robopolicy.data.spec import STATE_KEY
    from robopolicy.world_model import load_episodes, load_world_model, predict_success

    if len(tasks) > 1:
        raise UserError("eval wm=... predicts one task at a time: pass task=... rather than tasks=[...].")
    model, info = load_world_model(cfg.wm)
    env = sim.make_env(tasks[0], **kwargs)
    try:
        max_steps = cfg.max_episode_steps or env.unwrapped.max_episode_steps
        if cfg.wm_starts == "env":
            starts = np.stack([env.reset(seed=cfg.seed + k)[0][STATE_KEY] for k in range(cfg.episodes)])
        else:
            starts = load_episodes(info["data"])[0].first_states()
    finally:
        env.close()
    result = predict_success(model, policy, starts, int(max_steps), seed=cfg.seed)
    out = Path(cfg.out) if cfg.out else ckpt / f"eval_world_model_{tasks[0].replace('/', '_')}"
    out.mkdir(parents=True, exist_ok=True)
    summary = {"command": "eval", "in": "world_model", "world_model": str(cfg.wm), "checkpoint": str(ckpt),
               "task": tasks[0], "starts_from": cfg.wm_starts, **result}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["summary"] = str(out / "summary.json")
    return summary


def cmd_world_model(cfg) -> dict:
    from robopolicy.world_model.train import train_world_model

    with progress(cfg.steps, "world-model train") as bar:
        return train_world_model(cfg, log=lambda m: print(m, file=sys.stderr), progress=bar)


def _eval_task(cfg: EvalConfig, policy, task: str, kwargs: dict, out: Path) -> dict:
    from robopolicy.evaluate import evaluate

    envs = make_vector_env(task, min(cfg.num_envs, cfg.episodes), kwargs, cfg.rollout)
    try:
        with progress(cfg.episodes, f"eval {task}") as bar:
            return evaluate(envs, policy, cfg.episodes, seed=cfg.seed, video_dir=out / "videos",
                            n_videos=cfg.videos, progress=bar)
    finally:
        envs.close()


def cmd_quickstart(cfg: QuickstartConfig) -> dict:
    """collect -> train -> eval -> deploy on the embedded default, then a small table on standard error."""
    import shutil

    store, out, task, refine = Path(cfg.store), Path(cfg.out), cfg.task, cfg.refine
    stages: dict[str, dict] = {}
    if _reusable(store, cfg.episodes):
        print(f"reusing the demonstrations in {store}", file=sys.stderr)
        stages["collect"] = {k: v for k, v in run("data", [f"store={store}"], "info").items()
                             if k in ("episodes", "frames", "success_rate")}
    else:
        stages["collect"] = run("collect", [
            f"task={task}", f"episodes={cfg.episodes}", f"out={store}", f"seed={cfg.seed}", "overwrite=true"])
    if out.exists():
        shutil.rmtree(out)
    background = _start_background_refine(cfg) if refine.env_steps > 0 and refine.background else None
    try:
        _quickstart_main_stages(cfg, stages)
        if refine.env_steps > 0:
            stages["refine"] = _finish_background_refine(*background, out / "refine") if background else \
                _quickstart_refine(cfg, store, out)
    finally:
        if background is not None and background[0].poll() is None:  # the main stages failed: stop it too
            background[0].terminate()
            background[0].wait()
    ev = stages["eval"]
    rows = [
        ("task", task),
        ("demonstrations", f"{stages['collect']['episodes']} (expert success {stages['collect']['success_rate']:.2f})"),
        ("policy", f"{cfg.policy}, {stages['train']['parameters'] / 1e6:.2f}M parameters"),
        ("training time", f"{stages['train']['train_seconds']:.0f} s for {stages['train']['steps']} steps"),
        ("success rate", f"{_rate(ev)} over {ev['episodes']} episodes"),
    ]
    if "deploy" in stages:
        dep = stages["deploy"]
        rows.append(("deployed", f"{_rate(dep)} over {dep['episodes']} episodes on the simulated robot at {dep['control_hz']:g} Hz "
                                 f"({dep['mode']}), policy served on loopback"))
    if "refine" in stages:
        ref = stages["refine"]
        rows.append(("refinement", f"{ref['algo']} on a weak base ({refine.base_demos} {refine.base_data} demonstrations, "
                                   f"{refine.base_steps} steps), {ref['env_steps']} env steps in "
                                   f"{ref['wall_seconds']:.0f} s: {_rate(ref['base_eval'])} -> {_rate(ref['final_eval'])}"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(["", "robopolicy quickstart", *[f"  {k:<{width}}  {v}" for k, v in rows], ""]),
          file=sys.stderr)
    summary = {"command": "quickstart", "task": task, "store": str(store), "run": str(out),
               "demonstrations": stages["collect"]["episodes"], "policy": cfg.policy,
               "train_seconds": stages["train"]["train_seconds"], "checkpoint": stages["train"]["checkpoint"],
               "success_rate": ev["success_rate"], "success_ci95": ev["success_ci95"],
               "eval_episodes": ev["episodes"]}
    if "deploy" in stages:
        summary["deploy"] = {k: stages["deploy"][k] for k in ("success_rate", "success_ci95", "episodes", "control_hz",
                                                              "mode", "summary_path")}
    if "refine" in stages:
        ref = stages["refine"]
        summary["refine"] = {"algo": ref["algo"], "env_steps": ref["env_steps"], "wall_seconds": ref["wall_seconds"],
                             "base": ref["base_eval"], "refined": ref["final_eval"], "checkpoint": ref["checkpoint"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["summary"] = str(out / "summary.json")
    return summary


def _quickstart_main_stages(cfg: QuickstartConfig, stages: dict[str, dict]) -> None:
    """train -> eval -> deploy of the default policy on the collected store."""
    store, out, task = Path(cfg.store), Path(cfg.out), cfg.task
    stages["train"] = run("train", [
        f"task={task}", f"data={store}", f"out={out / 'train'}", f"policy={cfg.policy}",
        f"steps={cfg.train_steps}", "eval.episodes=0", "eval.final_episodes=0", f"seed={cfg.seed}"])
    stages["eval"] = run("eval", [f"ckpt={out / 'train'}", f"episodes={cfg.eval_episodes}", f"out={out / 'eval'}"])
    if cfg.deploy_episodes > 0:  # the simulated robot in real time, the policy behind a server on loopback
        stages["deploy"] = run("deploy", [
            f"ckpt={out / 'train'}", f"episodes={cfg.deploy_episodes}", f"out={out / 'deploy'}"])


def _start_background_refine(cfg: QuickstartConfig):
    """The refinement stage in a second Python process (`quickstart_refine_main` on the config written beside it),
    its output in <out>/refine.log: it shares nothing with the other stages but the task and the store. Returns
    (process, log)."""
    import subprocess

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    config, log = out / "refine_stage.json", out / "refine.log"
    config.write_text(json.dumps(to_dict(cfg), indent=2))
    print(f"refining a weak base in the background (progress: {log})", file=sys.stderr)
    with open(log, "w") as stream:  # the child keeps its own handle
        entry = "import sys; from robopolicy.cli import quickstart_refine_main; quickstart_refine_main(sys.argv[1])"
        process = subprocess.Popen([sys.executable, "-c", entry, str(config)], stdout=stream,
                                   stderr=subprocess.STDOUT)
    return process, log


def _finish_background_refine(process, log: Path, run_dir: Path) -> dict:
    """Wait for the background refinement; its finetune summary (run_dir/summary.json), or its log's last lines as
    the error."""
    print(f"waiting for the background refinement (progress: {log})", file=sys.stderr)
    summary = run_dir / "summary.json"
    if process.wait() != 0 or not summary.exists():
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-20:])
        raise UserError(f"the quickstart's refinement stage failed (exit {process.returncode}; {log}):\n{tail}")
    return json.loads(summary.read_text())


def quickstart_refine_main(config_path: str) -> None:
    """The background refinement's entry point: the stage of `cmd_quickstart` for the config it wrote (its finetune
    writes <out>/refine/summary.json, which the quickstart reads)."""
    cfg = from_mapping(QuickstartConfig, json.loads(Path(config_path).read_text()))
    _quickstart_refine(cfg, Path(cfg.store), Path(cfg.out))


def _rate(ev: dict) -> str:
    """A success rate with its 95% interval, for the quickstart's table."""
    return f"{ev['success_rate']:.2f} [{ev['success_ci95'][0]:.2f}, {ev['success_ci95'][1]:.2f}]"


def _quickstart_refine(cfg: QuickstartConfig, store: Path, out: Path) -> dict:
    """The quickstart's refinement stage: a deliberately weak base (few sloppy demonstrations, few steps), refined
    online without touching its weights, evaluated before and after on the same unseen seeds."""
    refine = cfg.refine
    if refine.base_data == "sloppy":  # the README's weak bases: the expert's imprecise grasps and placements
        store = store.with_name(f"{store.name}_sloppy")
        if not _reusable(store, refine.base_demos):
            run("collect", [f"task={cfg.task}", f"episodes={refine.base_demos}", f"out={store}", f"seed={cfg.seed}",
                            "expert.sloppy=true", "overwrite=true"])
    weak = run("train", [
        f"task={cfg.task}", f"data={store}", f"out={out / 'weak_base'}", f"policy={cfg.policy}",
        f"max_episodes={refine.base_demos}", f"steps={refine.base_steps}", "eval.episodes=0",
        "eval.final_episodes=0", f"seed={cfg.seed}"])
    return run("finetune", [
        f"algo={refine.algo}", f"ckpt={weak['run']}", f"out={out / 'refine'}", f"env_steps={refine.env_steps}",
        f"seed={cfg.seed}", f"eval.base_episodes={refine.eval_episodes}",
        f"eval.final_episodes={refine.eval_episodes}", f"eval.every={refine.eval_every}", *refine.finetune])


def _reusable(store: Path, episodes: int) -> bool:
    """A valid store with at least `episodes` episodes: the quickstart collects it again otherwise."""
    from robopolicy.data import DemoStore, validate_store

    return store.exists() and not validate_store(store) and DemoStore.open(store).num_episodes >= episodes


def cmd_finetune(cfg: FinetuneConfig, algo: Mapping[str, Any], explicit: set[str] | None = None) -> dict:
    from robopolicy.checkpoint import read_checkpoint_info, resolve_checkpoint
    from robopolicy.finetune import finetune

    base = resolve_checkpoint(cfg.ckpt)
    info = read_checkpoint_info(base)  # read once, here, and handed to finetune
    task = cfg.task or info["config"].get("task")
    if not task:
        raise UserError(f"The checkpoint {base} names no task: pass task=...")
    kwargs = env_kwargs_for_features(info["features"], cfg.max_episode_steps)
    _check_env_matches(task, kwargs, info["features"], f"the checkpoint {base}")
    run_cfg = {**to_dict(cfg), "task": task, "ckpt": str(base), "algo": dict(algo)}
    total = algo["steps"] if "steps" in algo else cfg.env_steps  # offline methods count gradient steps
    if algo.get("name") == "world_model":  # its bar counts imagined env steps
        from robopolicy.rl.world_model import WorldModelAlgoConfig, expected_imagined_steps

        total = expected_imagined_steps(from_mapping(WorldModelAlgoConfig, algo, where="algo"))
    with progress(total, f"finetune {algo.get('name')}") as bar:
        return {"command": "finetune", **finetune(run_cfg, lambda n: make_vector_env(task, n, kwargs, cfg.rollout),
                                                  log=lambda m: print(m, file=sys.stderr), progress=bar,
                                                  base_info=info, explicit=explicit or set())}


def cmd_serve(cfg: DictConfig) -> dict:
    from real.host.deploy import serve
    from robopolicy.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(cfg.ckpt)

    def ready(address: tuple) -> None:
        print(f"serving {ckpt} on {address[0]}:{address[1]} (Ctrl-C to stop)", file=sys.stderr, flush=True)

    serve(ckpt, str(cfg.host), int(cfg.port), cfg.token, fps=cfg.fps, threads=cfg.threads, on_ready=ready)
    return {"command": "serve", "checkpoint": str(ckpt), "stopped": True}


def cmd_deploy(cfg: DictConfig) -> dict:
    from real.host.deploy import deploy

    simulated = cfg.robot.get("_target_") == group_config_class("robot", "sim").target
    if cfg.task is None and simulated:  # the simulated robot runs the checkpoint's task
        if not cfg.ckpt:
            raise UserError("Pass task=... for the simulated robot (with server=, the checkpoint is not local).")
        from robopolicy.checkpoint import read_checkpoint_info, resolve_checkpoint

        cfg.task = read_checkpoint_info(resolve_checkpoint(cfg.ckpt))["config"].get("task")
    return {"command": "deploy", **deploy(cfg)}


# ------------------------------------------------------------------------------------------------------ main


def _print_help(command: str | None) -> None:
    if command is None:
        lines = ["usage: robopolicy COMMAND [key=value ...]", "", "commands:"]
        lines += [f"  {name:<11} {doc}" for name, doc in COMMANDS.items()]
        lines += ["", "`robopolicy COMMAND --help` shows that command's configuration and how to override it."]
        print("\n".join(lines))
        return
    cfg = compose(command, [])
    groups = command_groups(command)
    cls = command_config_class(command)
    word = command.replace("_", "-")
    print(f"usage: robopolicy {word}{' ' + '|'.join(SUBCOMMANDS[word]) if word in SUBCOMMANDS else ''} [key=value ...]")
    print(f"\n{COMMANDS[word]}.\n\nconfiguration (configs/{command}.yaml; override any key as key=value,"
          " e.g. task=builtin/push episodes=10, nested keys as expert.noise=0.1):\n")
    if cls is not None:
        lines = describe(cls)
    else:  # not registered yet: the YAML itself
        own = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in groups])
        lines = OmegaConf.to_yaml(own, resolve=False).splitlines()
    for group, option in groups.items():
        section = cfg[group]
        group_cls = group_config_class(group, group_config_name(group, option, section))
        lines.append(f"{group}: {option}  # configs/{group}/{option}.yaml; pick another with {group}=NAME, "
                     f"set a key with {group}.KEY=VALUE")
        lines += ["  " + line for line in (describe(group_cls) if group_cls is not None
                                           else OmegaConf.to_yaml(section, resolve=False).splitlines())]
    print("\n".join(_aligned(lines)))


def _aligned(lines: list[str]) -> list[str]:
    """`key: value  # doc` lines with their docs in one column."""
    split = [line.split("  # ", 1) if "  # " in line else [line] for line in lines]
    width = min(max(len(parts[0]) for parts in split), 40)
    return [f"{parts[0]:<{width}}  # {parts[1]}" if len(parts) == 2 else parts[0] for parts in split]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        _print_help(None)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; commands are {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:
        _print_help(command.replace("-", "_"))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if command in SUBCOMMANDS:
            if not rest or rest[0] not in SUBCOMMANDS[command]:
                raise UserError(f"`robopolicy {command}` needs a subcommand: {', '.join(SUBCOMMANDS[command])}.")
            summary = run(command.replace("-", "_"), rest[1:], sub=rest[0])
        else:
            summary = run(command, rest)
    except KeyboardInterrupt:
        print("error: interrupted.", file=sys.stderr)
        return 130
    except _user_errors() as e:
        if os.environ.get("ROBOPOLICY_DEBUG"):
            raise
        message = str(e).strip().strip("'\"") or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    emit(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
