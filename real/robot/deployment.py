"""A deployment run, as both entry points drive it: N episodes of the control node on a robot, recorded into
<out>/episodes, summarized into <out>/summary.json.

`robopolicy deploy` (real.host.deploy, on the workstation: hydra, local checkpoints) and `python -m real.robot`
(the robot computer: argparse, a remote policy server) both validate their settings into `DeployConfig` once,
build the robot from its config section with `make_robot`, and call `run_episodes`. numpy + standard library
(+ the store writer `robopolicy.data` when recording); no torch, no MuJoCo, no hydra.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from real.robot.control_node import ControlConfig, ControlNode, EpisodeResult, InferenceBackend
from real.robot.hal import Robot, Teleoperator
from real.robot.lerobot_teleop import LeaderConfig
from real.robot.watchdog import Watchdog
from robopolicy.config import CONFIGS, ConfigError, from_mapping, register_config, setting, to_dict
from robopolicy.data.spec import camera_name, is_image_key


class DeployError(ValueError):
    """A deployment setting that cannot work (one sentence naming it)."""


@dataclass
class InterventionConfig:
    """The `intervention:` section of configs/deploy.yaml."""

    enabled: bool = setting(False, "record interventions from `device`")
    device: str = setting("scripted", "scripted: the task's expert takes over when the policy stalls (sim robot) | "
                          "keyboard: a person at the terminal (space take over/release, w/s a/d r/f move, g/h "
                          "gripper, y/n success/failure) | leader: a LeRobot leader arm (intervention.leader) drives "
                          "a LeRobot follower while space is down at the terminal (y/n mark the outcome)",
                          choices=("scripted", "keyboard", "leader"))
    stall_s: float = setting(2.0, "seconds without end-effector motion that count as a stall")
    stall_distance: float = setting(0.01, "end-effector motion (m) within stall_s that still counts as a stall")
    patience_s: float | None = setting(None, "also take over after this many seconds without success since the "
                                             "episode began or the last takeover ended (null: only on stalls)")
    takeover_s: float = setting(3.0, "seconds the expert acts once it took over")
    leader: LeaderConfig = setting(LeaderConfig(), "device=leader: LeRobot's leader arm (robot=so100/so101/koch)")


@register_config("command", "deploy")
@dataclass(kw_only=True)  # `out` / `ckpt` have no default and may come in any order
class DeployConfig:
    """configs/deploy.yaml without its `robot:` group (validated against the robot's own config class)."""

    task: str | None = setting(None, "the simulated robot's task; null: the one the checkpoint was trained on")
    instruction: str | None = setting(None, "the task in words for every episode (a language policy reads it, the "
                                            "store records it); null: the robot's own (a language task's sim draws "
                                            "one per episode)")
    ckpt: str | None = setting(None, "a checkpoint folder (or a training run folder), served from a child process")
    server: str | None = setting(None, "or HOST:PORT of `robopolicy serve`")
    token: str | None = setting(None, "the server's token")
    inference: str = setting("process", "process (local ckpt off the control loop's GIL) | thread",
                             choices=("process", "thread"))
    policy_threads: int = setting(1, "torch threads of a local policy")
    inference_timeout_s: float = setting(1.0, "a request with no reply by then counts as failed")
    inject_latency_s: float = setting(0.0, "extra inference delay (to study latency handling)")
    episodes: int = setting(10, "episodes to run")
    seed: int = setting(100000, "episode k uses seed+k for the robot's reset and its chunks' noise")
    out: str = setting(doc="<out>/episodes (the recorded store) and <out>/summary.json")
    overwrite: bool = setting(False, "replace an existing summary and store")
    record: bool = setting(True, "record every episode into <out>/episodes")
    view: bool = setting(False, "log the run to rerun (images, state, requested vs sent actions, chunks, holds, "
                                "safety events): to view_address, else to view_path")
    view_path: str | None = setting(None, "the .rrd file of view=true; null: <out>/view.rrd")
    view_address: str | None = setting(None, "a rerun viewer's gRPC URL to stream to instead of a file, e.g. "
                                              "rerun+http://127.0.0.1:9876/proxy")
    control: ControlConfig = setting(ControlConfig(), "the control node")
    intervention: InterventionConfig = setting(InterventionConfig(), "scripted takeovers (sim robot)")

    def __post_init__(self) -> None:
        if self.server and self.ckpt:
            raise DeployError("Pass either ckpt=... (a local policy) or server=HOST:PORT, not both.")
        if self.episodes < 1:
            raise DeployError(f"episodes={self.episodes} runs nothing; pass episodes=1 or more.")

    @property
    def summary_path(self) -> Path:
        return Path(self.out) / "summary.json"

    def check_out(self) -> None:
        """Refuse to overwrite a finished run (before anything is started)."""
        if self.summary_path.exists() and not self.overwrite:
            raise DeployError(f"{self.summary_path} exists; choose another out=... or pass overwrite=true.")


def parse_value(text: str) -> Any:
    """`3` -> 3, `0.5` -> 0.5, `true` / `null` / `[a, b]` as JSON would; anything else is the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def deploy_config(settings: Mapping[str, Any]) -> tuple[DeployConfig, dict[str, Any]]:
    """The validated deploy settings and the robot's section (`robot:`), from plain data (no OmegaConf)."""
    settings = dict(settings)
    robot_section = settings.pop("robot", None) or {}
    if settings.get("out") in (None, "???"):
        raise ConfigError("deploy needs out=... (the folder for the recorded episodes and summary.json).")
    return from_mapping(DeployConfig, settings), dict(robot_section)


# ============================================================================================ the robot


def robot_config_class(target: str) -> type | None:
    """The registered ("robot", name) config whose `target` is this class path (None: an unregistered robot).
    A robot config declares `target` (a class attribute, not a setting): the robot class it configures."""
    return next((cls for (group, _), cls in CONFIGS.items() if group == "robot" and cls.target == target), None)


def make_robot(section: Mapping[str, Any], policy_features: Mapping[str, Any], control_hz: float) -> Robot:
    """The robot a config section describes: `_target_` (its class) and its keyword arguments, validated by the
    robot's registered config class. `images: auto` takes the cameras the policy uses; `control_hz: null` the
    node's rate."""
    kwargs = dict(section)
    target = kwargs.pop("_target_", None)
    if not target:
        raise DeployError("The robot config has no _target_ (the robot class, e.g. real.robot.sim_robot.SimRobot).")
    if kwargs.get("images") == "auto":
        kwargs["images"] = sorted(camera_name(k) for k in policy_features if is_image_key(k)) or False
    if "control_hz" in kwargs and kwargs["control_hz"] is None:
        kwargs["control_hz"] = control_hz
    config_cls = robot_config_class(target)
    if config_cls is not None:
        kwargs = to_dict(from_mapping(config_cls, kwargs, where="robot"))
    module_name, _, class_name = target.rpartition(".")
    try:
        robot_cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise DeployError(f"robot._target_={target!r} cannot be imported ({exc}).") from None
    return robot_cls(**kwargs)


def human_teleop(intervention: InterventionConfig, robot: Robot) -> Teleoperator | None:
    """The person's device for `intervention.device` keyboard or leader (not connected); None for the others."""
    if not intervention.enabled or intervention.device not in ("keyboard", "leader"):
        return None
    if intervention.device == "leader":
        from real.robot.lerobot_teleop import LeaderArm

        return LeaderArm(robot, intervention.leader)
    from real.robot.keyboard import KeyboardTeleop

    return KeyboardTeleop(int(robot.action_features["action"]["shape"][0]), robot=robot)


# ========================================================================================== the episodes


def run_episodes(config: DeployConfig, robot: Robot, backend: InferenceBackend,
                 teleop: Teleoperator | None = None) -> dict:
    """`config.episodes` episodes on a connected robot (episode k seeded seed + k), recorded when
    `config.record`; writes and returns the summary. The robot is stopped after every episode."""
    from real.robot.recording import EpisodeRecorder

    control, out = config.control, Path(config.out)
    closers: list = []
    results: list[EpisodeResult] = []
    try:
        recorder = None
        if config.record:
            recorder = EpisodeRecorder(out / "episodes", robot.observation_features, robot.action_features["action"],
                                       max(1, round(control.control_hz)), overwrite=config.overwrite,
                                       info={"robot": type(robot).__name__, "mode": control.mode})
            closers.append(recorder.close)
        if config.view:
            from real.robot.live_view import FrameSinks, LiveView, LiveViewError

            try:
                view = LiveView(config.view_path or out / "view.rrd", config.view_address,
                                application_id="robopolicy deploy")
            except LiveViewError as exc:
                raise DeployError(str(exc)) from None
            closers.append(view.close)
            recorder = FrameSinks(recorder, view)
        watchdog = Watchdog(1.0 / control.control_hz, control.hold_after, control.stop_after)
        node = ControlNode(robot, backend, control, recorder=recorder, teleop=teleop, watchdog=watchdog,
                           task=config.instruction or "")
        if config.instruction:
            robot.set_instruction(config.instruction)
        closers.insert(0, node.close)
        in_main = threading.current_thread() is threading.main_thread()
        with watchdog.signal_estop() if in_main else contextlib.nullcontext():
            for i in range(config.episodes):
                result = node.run_episode(seed=config.seed + i)
                results.append(result)
                print(f"episode {i}: success={result.success} ticks={result.ticks} "
                      f"chunks={result.counts['chunks']} clamped={result.counts['clamped_ticks']}", file=sys.stderr)
                if result.aborted:
                    break
    finally:
        for close in closers:
            try:
                close()
            except Exception as exc:  # keep closing the rest
                print(f"warning: cleanup step failed: {exc}", file=sys.stderr)
    summary = summarize(results, control)
    summary["mode"] = node.mode  # what `auto` resolved to
    if config.record:
        from robopolicy.data import validate_store

        summary["store"] = str(out / "episodes")
        summary["store_problems"] = validate_store(out / "episodes")
    if config.view:
        summary["view"] = config.view_address or str(config.view_path or out / "view.rrd")
    summary["summary_path"] = str(config.summary_path)
    out.mkdir(parents=True, exist_ok=True)
    config.summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def summarize(results: list[EpisodeResult], control: ControlConfig) -> dict:
    """Success rate with its Wilson interval, timing percentiles (ms) and safety / fault counts over episodes."""
    from robopolicy.metrics import success_summary

    summary: dict[str, Any] = success_summary([r.success for r in results])
    totals: dict[str, int] = {}
    for r in results:
        for key, value in r.counts.items():
            totals[key] = totals.get(key, 0) + value
    summary.update(
        mode=control.mode,
        control_hz=control.control_hz,
        aborted=next((r.aborted for r in results if r.aborted), None),
        interventions=sum(r.intervention for r in results),
        tick_lateness_ms=_percentiles([x for r in results for x in r.tick_lateness_s]),
        obs_to_command_ms=_percentiles([x for r in results for x in r.obs_to_command_s]),
        inference_latency_ms=_percentiles([x for r in results for x in r.inference_latency_s]),
        counts=totals,
        prefix_slots=_prefix_slots([x for r in results for x in r.prefix_slots]),
        per_episode=[{"seed": r.seed, "success": r.success, "ticks": r.ticks, "seconds": round(r.duration_s, 2),
                      "intervention": r.intervention, "aborted": r.aborted} for r in results],
    )
    return summary


def _prefix_slots(pairs: list[tuple[int, int]]) -> dict | None:
    """How the prefixes rtc froze fit the delay each chunk met: `matched` chunks froze exactly the slots that began
    before their first command, `short` ones fewer (a slot the chunk generated was already executed from the old
    one), `long` ones more; `delay_slots`: chunks per number of slots that began meanwhile. None without prefixes."""
    if not pairs:
        return None
    delays: dict[str, int] = {}
    for _, actual in pairs:
        delays[str(actual)] = delays.get(str(actual), 0) + 1
    return {"chunks": len(pairs), "matched": sum(sent == actual for sent, actual in pairs),
            "short": sum(sent < actual for sent, actual in pairs), "long": sum(sent > actual for sent, actual in pairs),
            "delay_slots": dict(sorted(delays.items()))}


def _percentiles(values: list[float], scale: float = 1e3) -> dict[str, float] | None:
    if not values:
        return None
    v = np.asarray(values) * scale
    return {"p50": round(float(np.percentile(v, 50)), 3), "p99": round(float(np.percentile(v, 99)), 3),
            "max": round(float(v.max()), 3), "n": int(v.size)}

