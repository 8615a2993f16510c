"""`builtin/so100_pick`: the SO-100 (sim/so100.py, the Feetech twin's arm and servo loop) picks up a cube.

The rehearsal's pick: a 3 cm cube rests at a fixed spot on the table in front of the arm (the policy sees only the
arm's joints, all the LeRobot adapter reports on the twin, which has no camera), each episode starts the arm at a
pose drawn from its seed, and success is the cube lifted `LIFT_M` off the table. The jaws grasp it through MuJoCo's
contacts under the gripper servo's torque limit (LeRobot's SO100Follower runs the gripper at half torque), so a
policy that closes too early, too late or off-centre pushes the cube away. Observations and actions are in the
adapter's units (LeRobot's degrees about the middle of each range, the gripper 0-100), as in `builtin/so100_touch`,
whose env this reuses; the twin (`python -m real.host.feetech_twin --task builtin/so100_pick`) builds the same
table and cube, resets them for a seed as the env does, and reports the same success.

The expert's poses were found offline by a least-squares IK (the fixed jaw's pads 1 cm beside the cube's -y face,
fingers pointing down, the jaws opening along +y), in LeRobot units.
"""

from __future__ import annotations

import mujoco
import numpy as np

from robopolicy.data.spec import STATE_KEY
from sim.builtin.so100_touch import SO100Env, SO100Touch
from sim.so100 import MOTORS, ServoArm

CUBE_POS = np.array([0.16, 0.6, 0.015])  # the cube's centre at rest (m); the arm's base is at (0.36, 0.6, 0)
CUBE_HALF = 0.015
LIFT_M = 0.02  # success: the cube's centre this far above its resting height
# joint poses (LeRobot units: five body joints in degrees, the gripper 0-100)
# open: wide enough around the cube; closed: past where the jaws meet the cube (~18), so the servo squeezes it
GRIPPER_OPEN, GRIPPER_CLOSED = 36.4, 10.0
# the way down: the jaws 7, 5, 3.5, 2 and 1 cm above the grasp, then around the cube (fingertips 6 mm up), on a
# vertical line (a straight line in joint space would sweep the fingers into the cube)
DESCENT = np.array([[4.9, 25.9, 20.9, -94.1, -5.1],
                    [4.9, 25.4, 29.0, -85.5, -5.1],
                    [4.9, 24.1, 34.2, -78.9, -5.1],
                    [4.9, 21.7, 38.7, -72.1, -5.1],
                    [4.9, 19.6, 41.2, -67.5, -5.1],
                    [4.9, 17.1, 43.4, -62.8, -5.1]])
ABOVE_POSE, GRASP_POSE = DESCENT[0], DESCENT[-1]


class SO100Pick(SO100Touch):
    """The scene and its rules, shared by the env below and the twin."""

    name = "so100_pick"
    task_description = "pick up the red cube"
    default_max_episode_steps = 60

    def __init__(self) -> None:  # no button: a table and a cube
        self.objects_xml = (
            '<geom name="table" type="plane" size="0.6 0.6 0.01" pos="0.2 0.6 0" rgba="0.6 0.55 0.5 1"/>'
            f'<body name="cube" pos="{CUBE_POS[0]} {CUBE_POS[1]} {CUBE_POS[2]}"><freejoint name="cube"/>'
            f'<geom name="cube" type="box" size="{CUBE_HALF} {CUBE_HALF} {CUBE_HALF}" mass="0.03" '
            'friction="1.5 0.01 0.001" rgba="0.9 0.15 0.15 1"/></body>')

    def reset(self, arm: ServoArm, rng: np.random.Generator) -> None:
        arm.place(arm.encoders.from_lerobot(self.start_pose(rng)))  # every velocity zero, the cube's too
        cube = arm.model.joint("cube").qposadr[0]
        arm.data.qpos[cube:cube + 7] = [*CUBE_POS, 1.0, 0.0, 0.0, 0.0]
        mujoco.mj_forward(arm.model, arm.data)

    @staticmethod
    def cube_position(arm: ServoArm) -> np.ndarray:
        cube = arm.model.joint("cube").qposadr[0]
        return arm.data.qpos[cube:cube + 3].copy()

    def success(self, arm: ServoArm) -> bool:
        return bool(self.cube_position(arm)[2] >= CUBE_POS[2] + LIFT_M)

    def reward(self, arm: ServoArm) -> float:
        """The cube's lift (m), 0 at rest."""
        return float(self.cube_position(arm)[2] - CUBE_POS[2])


class SO100PickEnv(SO100Env):
    scene_class = SO100Pick


class SO100PickExpert:
    """Joint-space expert over the arm's own joints (the state): above the cube with the jaws open, down around
    it through DESCENT's waypoints, close, lift. The phase follows from the state (where the joints are and whether the gripper is closed), so
    a policy cloned from it can tell the phases apart from what it observes."""

    MAX_STEP_DEG = 6.0
    ARRIVED_DEG = 2.0

    def __init__(self, task: str = "so100_pick", noise: float = 0.0, sloppy: bool = False, seed: int | None = None,
                 control: str | None = None, dart: float | None = None) -> None:
        if sloppy or dart:
            raise ValueError("builtin/so100_pick's expert has no sloppy or DART mode.")
        self.noise = noise
        self.rng = np.random.default_rng(seed)
        self.reset(seed)

    def reset(self, seed: int | None = None) -> None:
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.phase, self.waypoint, self.last_gripper = "down", 0, np.inf

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        state = np.asarray(obs[STATE_KEY], dtype=np.float64)
        body, gripper = state[:5], state[5]
        if self.phase == "down" and np.abs(body - DESCENT[self.waypoint]).max() < self.ARRIVED_DEG:
            if self.waypoint == len(DESCENT) - 1:
                self.phase = "close"
            else:
                self.waypoint += 1
        if self.phase == "close" and gripper < GRIPPER_OPEN - 10.0 and self.last_gripper - gripper < 0.5:
            self.phase = "lift"  # the jaws stopped on the cube
        self.last_gripper = gripper
        target, grip = {"down": (DESCENT[self.waypoint], GRIPPER_OPEN), "close": (GRASP_POSE, GRIPPER_CLOSED),
                        "lift": (ABOVE_POSE, GRIPPER_CLOSED)}[self.phase]
        action = np.empty(len(MOTORS))
        # a straight line in joint space (every joint arrives together), at most MAX_STEP_DEG per step
        delta = target - body
        action[:5] = body + delta * min(1.0, self.MAX_STEP_DEG / max(np.abs(delta).max(), 1e-9))
        action[5] = grip
        if self.noise:
            action[:5] += self.rng.normal(0.0, self.noise, 5)
        return action.astype(np.float32)


__all__ = ["SO100Pick", "SO100PickEnv", "SO100PickExpert"]
