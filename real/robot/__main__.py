"""The robot computer's deploy command: `python -m real.robot --server HOST:PORT --out DIR [key=value ...]`.

The same run as `robopolicy deploy server=HOST:PORT` (the same `DeployConfig`, keys and defaults as
configs/deploy.yaml, dotted overrides such as `control.mode=rtc robot.task=builtin/reach episodes=3`), without
hydra, torch or MuJoCo: the policy runs behind `robopolicy serve` on the workstation. `--robot NAME` picks a
registered robot config (default: sim, whose `robot.address=HOST:PORT` points at a `python -m real.host.sim_arm`).
Prints the summary as one JSON line last; a bad setting is one sentence on standard error and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any

from real.robot.client import PolicyClientError
from real.robot.control_node import ControlNodeError, RemoteInference
from real.robot.deployment import (
    DeployError,
    deploy_config,
    human_teleop,
    make_robot,
    parse_value,
    run_episodes,
)
from real.robot.robots import ROBOT_ERRORS
from robopolicy.config import ConfigError, config_class, defaults


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    """Plain deploy settings: the robot config's defaults, then --flags, then the key=value overrides."""
    robot_cls = config_class("robot", args.robot)
    robot = {"_target_": robot_cls.target, **defaults(robot_cls)}
    if "control_hz" in robot:
        robot["control_hz"] = None  # the node's control rate, as ${control.control_hz} in the YAML
    settings: dict[str, Any] = {"server": args.server, "token": args.token, "out": args.out, "robot": robot}
    for item in args.overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{item!r} is not a key=value setting (e.g. control.mode=rtc).")
        *parents, leaf = key.split(".")
        section = settings
        for name in parents:
            section = section.setdefault(name, {})
            if not isinstance(section, dict):
                raise ConfigError(f"{key} names a setting inside {name}, which is not a section.")
        section[leaf] = parse_value(text)
    given = {item.partition("=")[0] for item in args.overrides}
    if settings.get("task") and "task" in robot and "robot.task" not in given:
        robot["task"] = settings["task"]  # as ${task} in configs/robot/sim.yaml
    if settings.get("ckpt"):
        raise ConfigError("The robot side runs no policy: serve the checkpoint with `robopolicy serve` on the "
                          "workstation and pass --server HOST:PORT.")
    return settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m real.robot", description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="HOST:PORT of `robopolicy serve`")
    parser.add_argument("--token", default=os.environ.get("ROBOPOLICY_SERVE_TOKEN"),
                        help="the server's token (default: $ROBOPOLICY_SERVE_TOKEN)")
    parser.add_argument("--out", required=True, help="<out>/episodes and <out>/summary.json")
    parser.add_argument("--robot", default="sim", help="a registered robot config (default: sim)")
    parser.add_argument("overrides", nargs="*", help="key=value settings of configs/deploy.yaml")
    args = parser.parse_args(argv)
    try:
        config, robot_section = deploy_config(settings_from(args))
        config.check_out()
        backend = RemoteInference(config.server, token=config.token, timeout_s=config.inference_timeout_s,
                                  extra_latency_s=config.inject_latency_s)
        try:
            with make_robot(robot_section, backend.features, config.control.control_hz) as robot:
                iv = config.intervention
                if iv.enabled and iv.device == "scripted":
                    raise DeployError("On the robot computer interventions come from intervention.device=keyboard "
                                      "or leader (the scripted intervener needs the simulator: use `robopolicy "
                                      "deploy`).")
                teleop = human_teleop(iv, robot)  # a person at this terminal (and a leader arm) takes over
                with teleop if teleop is not None else contextlib.nullcontext():
                    summary = run_episodes(config, robot, backend, teleop)
        finally:
            backend.close()
    except (ConfigError, DeployError, ControlNodeError, PolicyClientError, *ROBOT_ERRORS) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps({"command": "deploy", **summary}))


if __name__ == "__main__":
    main()
