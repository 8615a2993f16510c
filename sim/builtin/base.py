"""The shared body of every built-in task: the arm scene, its controller, observations and stepping.

A task subclass adds its objects (MJCF), samples them at reset, names its extra state dimensions and
computes reward and success. Control runs at `fps` Hz with `substeps` physics steps of 2 ms in between;
the per-step Python work is kept to a Jacobian, a 6x6 solve and writing preallocated arrays.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any, ClassVar

import gymnasium as gym
import mujoco
import numpy as np

from robopolicy.data.spec import ACTION_KEY, STATE_KEY, image_key
from sim.builtin.controller import DiffIKController
from sim.builtin.scene import ARM_JOINTS, CAMERAS, FINGER_JOINTS, FINGER_MAX_OPENING, scene_xml

HOME_SITE_POS = np.array([0.45, 0.0, 0.25])
# Gripper pointing down, fingers opening along world y: the site frame's axes as columns.
DOWN_ROT = np.diag([-1.0, 1.0, -1.0])
# Rough elbow-up posture for HOME_SITE_POS; refined by IK once per model.
_HOME_GUESS = np.array([0.0, 0.36, 0.0, 1.83, 0.0, 0.96, 0.0])
WORKSPACE_LOW = np.array([0.25, -0.4, 0.012])
WORKSPACE_HIGH = np.array([0.75, 0.4, 0.45])
MAX_DELTA = 0.04  # metres per control step at action 1.0 (0.4 m/s at 10 Hz)
ROBOT_STATE_NAMES = (
    [f"{j}.pos" for j in ARM_JOINTS]
    + [f"{j}.vel" for j in ARM_JOINTS]
    + ["ee.x", "ee.y", "ee.z", "gripper.opening"]
)
CONTROL_MODES = ("ee_delta", "joint_pos")


def arm_controller(model: mujoco.MjModel) -> DiffIKController:
    """The IK controller of the arm in `model`, with its home posture (site at HOME_SITE_POS, pointing down)."""
    data = mujoco.MjData(model)
    finder = DiffIKController(model, nullspace_gain=0.0)
    data.qpos[finder.qpos_adr] = _HOME_GUESS
    finder.set_home(_HOME_GUESS, DOWN_ROT)
    ik = DiffIKController(model)
    ik.set_home(finder.solve(data, HOME_SITE_POS), DOWN_ROT)
    return ik


def ee_delta_joint_targets(ik: DiffIKController, data: mujoco.MjData, ee_action: np.ndarray) -> np.ndarray:
    """Joint targets [7] for an ee_delta action's first three entries (in [-1, 1], scaled by MAX_DELTA),
    the commanded point kept inside the workspace (fingertips above the table)."""
    site_pos = data.site_xpos[ik.site_id]
    target = np.clip(site_pos + np.clip(ee_action[:3], -1.0, 1.0) * MAX_DELTA, WORKSPACE_LOW, WORKSPACE_HIGH)
    return ik.joint_targets(data, target - site_pos)


def check_template(template: str, fields: dict[str, tuple[str, ...]], task: str) -> None:
    """Refuses an instruction template naming a field the task does not define, in one sentence."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise ValueError(f"instruction_template {template!r} is not a valid template ({err}).") from None
    unknown = sorted(names - set(fields))
    if unknown:
        defined = ", ".join("{" + f + "}" for f in fields) or "no fields"
        raise ValueError(f"instruction_template {template!r} names {', '.join('{' + u + '}' for u in unknown)}, "
                         f"but {task} defines {defined}.")


def all_goals(fields: dict[str, tuple[str, ...]]) -> list[dict[str, str]]:
    """Every combination of goal field values, in a fixed order."""
    goals: list[dict[str, str]] = [{}]
    for field, values in fields.items():
        goals = [{**g, field: v} for g in goals for v in values]
    return goals


class ArmTaskEnv(gym.Env):
    """Base class of the built-in tasks; subclasses set the class attributes and the four task hooks."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}
    name: str = ""
    task_description: str = ""
    objects_xml: str = ""
    task_state_names: tuple[str, ...] = ()
    default_max_episode_steps: int = 100
    default_cameras: tuple[str, ...] = ("front",)
    fps: int = 10
    substeps: int = 50  # 50 x 2 ms = one 10 Hz control step
    # Language: the goal fields an instruction names (field -> its values, drawn uniformly at every reset after
    # the scene, so scenes do not reveal the goal) and the training phrasings, templates over those fields.
    # A task without goal fields is instructed with its task_description.
    goal_fields: ClassVar[dict[str, tuple[str, ...]]] = {}
    instruction_templates: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        images: bool | Sequence[str] = False,
        image_size: int = 96,
        control: str = "ee_delta",
        max_episode_steps: int | None = None,
        render_mode: str | None = None,
        instruction_template: str | None = None,
        misinstruct: bool = False,
    ):
        if control not in CONTROL_MODES:
            raise ValueError(
                f"Unknown control {control!r} for builtin/{self.name}: use one of {CONTROL_MODES}."
            )
        if render_mode not in (None, "rgb_array"):
            raise ValueError(
                f"Unsupported render_mode {render_mode!r} for builtin/{self.name}: use 'rgb_array'."
            )
        self.cameras: tuple[str, ...] = (
            self.default_cameras if images is True else () if images is False else tuple(images)
        )
        for cam in self.cameras:
            if cam not in CAMERAS:
                raise ValueError(f"Unknown camera {cam!r} for builtin/{self.name}: available are {CAMERAS}.")
        self.control, self.image_size, self.render_mode = control, image_size, render_mode
        if instruction_template is not None:
            check_template(instruction_template, self.goal_fields, f"builtin/{self.name}")
        if misinstruct and not self.goal_fields:
            raise ValueError(f"misinstruct needs a task whose instruction names a goal; builtin/{self.name} has none.")
        self.instruction_template, self.misinstruct = instruction_template, misinstruct
        self.goal: dict[str, str] = {}
        self.instruction: str = instruction_template or self.task_description
        self.max_episode_steps = max_episode_steps or self.default_max_episode_steps

        self.model = mujoco.MjModel.from_xml_string(scene_xml(self.name, self.objects_xml))
        self.data = mujoco.MjData(self.model)
        self.ik = arm_controller(self.model)
        self.home_qpos = self.ik.home_qpos
        self._arm_qpos = self.ik.qpos_adr
        self._arm_qvel = self.ik.dof_adr
        self._finger_qpos = np.array([self.model.joint(j).qposadr[0] for j in FINGER_JOINTS])
        self._site = self.ik.site_id
        self._bind_task()

        n_state = len(ROBOT_STATE_NAMES) + len(self.task_state_names)
        self._state = np.zeros(n_state, dtype=np.float32)
        obs_spaces: dict[str, gym.Space] = {
            STATE_KEY: gym.spaces.Box(-np.inf, np.inf, (n_state,), np.float32)
        }
        for cam in self.cameras:
            obs_spaces[image_key(cam)] = gym.spaces.Box(
                0, 255, (image_size, image_size, 3), np.uint8
            )
        self.observation_space = gym.spaces.Dict(obs_spaces)
        if control == "ee_delta":
            self.action_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
            action_names = ["ee.dx", "ee.dy", "ee.dz", "gripper"]
        else:
            low = np.append(self.ik.joint_low, -1.0).astype(np.float32)
            high = np.append(self.ik.joint_high, 1.0).astype(np.float32)
            self.action_space = gym.spaces.Box(low, high, dtype=np.float32)
            action_names = [f"{j}.target" for j in ARM_JOINTS] + ["gripper"]
        self.feature_names = {
            STATE_KEY: list(ROBOT_STATE_NAMES) + list(self.task_state_names),
            ACTION_KEY: action_names,
        }
        self._renderer = None
        self._camera_ids: list[int] = []
        self._video_renderer = None
        self._steps = 0

    # ---- task hooks ---------------------------------------------------------------------------------
    def _bind_task(self) -> None:
        """Cache ids/addresses of the task's objects."""

    def _sample_task(self, rng: np.random.Generator) -> None:
        """Place objects and target for a new episode (write data.qpos / data.mocap_pos)."""
        raise NotImplementedError

    def _write_task_state(self, out: np.ndarray) -> None:
        """Write the task's state dimensions (named by task_state_names) into `out`."""
        raise NotImplementedError

    def _reward_and_success(self) -> tuple[float, bool]:
        raise NotImplementedError

    # ---- gymnasium API ------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """`options={"instruction": text}` makes the goal the one `text` names (see `goal_from_instruction`)."""
        super().reset(seed=seed)
        rng = self.np_random
        mujoco.mj_resetData(self.model, self.data)
        q0 = self.home_qpos + rng.uniform(-0.03, 0.03, size=7)
        self.data.qpos[self._arm_qpos] = q0
        self.data.ctrl[:7] = q0
        self.data.qpos[self._finger_qpos] = FINGER_MAX_OPENING
        self.data.ctrl[7:9] = FINGER_MAX_OPENING
        self._sample_task(rng)
        given = (options or {}).get("instruction")
        if self.goal_fields:  # drawn after the scene, which therefore does not depend on the goal
            self.goal = {f: values[int(rng.integers(len(values)))] for f, values in self.goal_fields.items()}
            self.instruction = self._phrase(rng)
            if given:
                self.goal, self.instruction = self.goal_from_instruction(given), given
        elif given:
            self.instruction = given
        mujoco.mj_forward(self.model, self.data)
        self._steps = 0
        return self._observation(), {"success": False}

    def step(self, action: np.ndarray):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != self.action_space.shape:
            raise ValueError(
                f"Action of shape {action.shape} for builtin/{self.name} ({self.control}): expected {self.action_space.shape}."
            )
        if self.control == "ee_delta":
            self.data.ctrl[:7] = ee_delta_joint_targets(self.ik, self.data, action)
        else:
            self.data.ctrl[:7] = np.clip(action[:7], self.ik.joint_low, self.ik.joint_high)
        # gripper: -1 open .. +1 closed
        self.data.ctrl[7:9] = FINGER_MAX_OPENING * 0.5 * (1.0 - np.clip(action[-1], -1.0, 1.0))
        mujoco.mj_step(self.model, self.data, nstep=self.substeps)
        # mj_step leaves kinematics one substep stale; the next IK step and the observation need them current.
        mujoco.mj_kinematics(self.model, self.data)
        mujoco.mj_comPos(self.model, self.data)
        self._steps += 1
        reward, success = self._reward_and_success()
        truncated = self._steps >= self.max_episode_steps and not success
        return self._observation(), reward, success, truncated, {"success": success}

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        if self._video_renderer is None:
            from sim.rendering import OffscreenRenderer

            self._video_renderer = OffscreenRenderer(self.model, 240, 320)
        return self._video_renderer.render(self.data, self._video_renderer.camera_id("front"))

    def close(self) -> None:
        for renderer in (self._renderer, self._video_renderer):
            if renderer is not None:
                renderer.close()
        self._renderer = self._video_renderer = None

    def observation(self) -> dict[str, np.ndarray]:
        """The current observation, as reset and step return it (for a real-time driver stepping physics itself)."""
        return self._observation()

    def goal_from_instruction(self, text: str) -> dict[str, str]:
        """The goal an instruction written by a person names: for every goal field, the one value whose word
        appears in it ("put the red cube on the yellow pad" -> color red, target yellow)."""
        words = set(text.lower().replace(",", " ").replace(".", " ").split())
        goal = {}
        for field, values in self.goal_fields.items():
            named = [v for v in values if v in words]
            if len(named) != 1:
                raise ValueError(f"The instruction {text!r} must name exactly one {field} of builtin/{self.name} "
                                 f"({', '.join(values)}); it names {', '.join(named) or 'none'}.")
            goal[field] = named[0]
        return goal

    # ---- helpers ------------------------------------------------------------------------------------
    def _phrase(self, rng: np.random.Generator) -> str:
        """The episode's instruction: a training phrasing (or the user's template) over the goal; with
        `misinstruct`, over another valid goal, while success still checks the true one."""
        named = self.goal
        if self.misinstruct:
            others = [g for g in all_goals(self.goal_fields) if g != self.goal]
            named = others[int(rng.integers(len(others)))]
        templates = self.instruction_templates
        template = self.instruction_template or templates[int(rng.integers(len(templates)))]
        return template.format(**named)

    def _observation(self) -> dict[str, np.ndarray]:
        s, d = self._state, self.data
        s[0:7] = d.qpos[self._arm_qpos]
        s[7:14] = d.qvel[self._arm_qvel]
        s[14:17] = d.site_xpos[self._site]
        s[17] = d.qpos[self._finger_qpos].sum()
        self._write_task_state(s[18:])
        obs = {STATE_KEY: s.copy()}
        if self.cameras:
            if self._renderer is None:
                from sim.rendering import OffscreenRenderer

                self._renderer = OffscreenRenderer(self.model, self.image_size, self.image_size)
                self._camera_ids = [self._renderer.camera_id(c) for c in self.cameras]
            for cam, cam_id in zip(self.cameras, self._camera_ids):
                obs[image_key(cam)] = self._renderer.render(self.data, cam_id)
        return obs
