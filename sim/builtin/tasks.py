"""The built-in tasks: reach, push, pick_place, the language tasks push_two_ways and pick_color, and the dynamic
task catch (a moving target: pausing costs success).

Each is the arm scene plus its objects, a seeded reset, its extra state dimensions, a dense shaped reward
and a success test. Positions are in metres in the world frame (table top at z = 0). In a language task the
scene is the same in distribution whatever the goal, and only the instruction (`env.instruction`, drawn with
the goal `env.goal` at reset) says what success requires.
"""

from __future__ import annotations

import mujoco
import numpy as np

from sim.builtin.base import ArmTaskEnv

_TARGET_MARKER = """
<body name="target" mocap="true" pos="0.5 0 0.001">
  <geom class="marker" type="cylinder" size="{radius} 0.001" rgba=".2 .8 .3 1"/>
</body>
"""
BLOCK_HALF = 0.025
CUBE_HALF = 0.02
OBSTACLE_POS = np.array([0.5, 0.0])
OBSTACLE_HALF = np.array([0.03, 0.07, 0.025])  # lower than the hand, so only the fingers go around it


def _object_xml(name: str, half: float, rgba: str, mass: float) -> str:
    return f"""
<body name="{name}" pos="0.5 0 {half}">
  <freejoint name="{name}"/>
  <geom class="object" type="box" size="{half} {half} {half}" mass="{mass}" rgba="{rgba}"/>
</body>
"""


class _ObjectTask(ArmTaskEnv):
    """A task with one free box (`object_name`) and a target marker (mocap body `target`) on the table."""

    object_name = "block"
    object_half = BLOCK_HALF
    task_state_names = (
        "object.x", "object.y", "object.z", "object.qw", "object.qx", "object.qy", "object.qz",
        "target.x", "target.y", "target.z",
    )  # fmt: skip

    def _bind_task(self) -> None:
        joint = self.model.joint(self.object_name)
        self._obj_qpos = slice(joint.qposadr[0], joint.qposadr[0] + 7)
        self._obj_body = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_BODY, self.object_name)
        self._target_mocap = self.model.body("target").mocapid[0]

    def _place(self, xy: np.ndarray, yaw: float, target_xy: np.ndarray) -> None:
        self.data.qpos[self._obj_qpos] = [
            xy[0],
            xy[1],
            self.object_half,
            np.cos(yaw / 2),
            0,
            0,
            np.sin(yaw / 2),
        ]
        self.data.mocap_pos[self._target_mocap] = [target_xy[0], target_xy[1], 0.001]

    def _write_task_state(self, out: np.ndarray) -> None:
        out[0:7] = self.data.qpos[self._obj_qpos]
        out[7:10] = self.data.mocap_pos[self._target_mocap]

    def object_pos(self) -> np.ndarray:
        return self.data.xpos[self._obj_body]

    def target_pos(self) -> np.ndarray:
        return self.data.mocap_pos[self._target_mocap]

    def _push_reward(self, target_sharpness: float) -> tuple[float, bool]:
        """Dense push reward: reach the block, bring it to the target (planar distance), bonus on success."""
        obj, target, ee = self.object_pos(), self.target_pos(), self.data.site_xpos[self._site]
        obj_to_target = float(np.linalg.norm(obj[:2] - target[:2]))
        ee_to_obj = float(np.linalg.norm(obj - ee))
        success = obj_to_target < self.success_radius
        reward = 0.5 * (1 - np.tanh(10 * ee_to_obj)) + (1 - np.tanh(target_sharpness * obj_to_target))
        return reward + 10.0 * success, success


class _PushTask(_ObjectTask):
    """A block pushed on the table. Its state spells out what a push decision depends on, which a cloned
    policy would otherwise have to compute precisely from absolute positions: the block's yaw as cos/sin of
    4 x yaw (a cube looks the same every quarter turn; the quaternion's roll and pitch stay ~0 on the table),
    the vectors block - hand and target - block, and the hand in the push frame (the unit direction block ->
    target, the hand's offset along it and to its left)."""

    task_state_names = (
        "object.x", "object.y", "object.z", "object.yaw4.cos", "object.yaw4.sin",
        "target.x", "target.y", "target.z",
        "object_from_ee.x", "object_from_ee.y", "object_from_ee.z",
        "target_from_object.x", "target_from_object.y",
        "push_dir.x", "push_dir.y", "ee_in_push_frame.along", "ee_in_push_frame.lateral",
    )  # fmt: skip

    def _write_task_state(self, out: np.ndarray) -> None:
        obj, target, ee = self.object_pos(), self.target_pos(), self.data.site_xpos[self._site]
        qw, qx, qy, qz = self.data.qpos[self._obj_qpos][3:7]
        yaw = np.arctan2(2 * (qw * qz + qx * qy), 1 - 2 * (qy * qy + qz * qz))
        out[0:3] = obj
        out[3:5] = np.cos(4 * yaw), np.sin(4 * yaw)
        out[5:8] = target
        out[8:11] = obj - ee
        out[11:13] = target[:2] - obj[:2]
        # the hand in the frame of the push (x: block -> target), where a pusher's decision is simplest
        u = (target[:2] - obj[:2]) / max(float(np.linalg.norm(target[:2] - obj[:2])), 1e-6)
        rel = ee[:2] - obj[:2]
        out[13:15] = u
        out[15:17] = rel @ u, u[0] * rel[1] - u[1] * rel[0]


class ReachTask(ArmTaskEnv):
    name = "reach"
    task_description = "move the gripper to the green sphere"
    objects_xml = """
<body name="target" mocap="true" pos="0.5 0 0.2">
  <geom class="marker" type="sphere" size="0.02" rgba=".2 .8 .3 1"/>
</body>
"""
    task_state_names = ("target.x", "target.y", "target.z")
    default_max_episode_steps = 60
    success_radius = 0.02

    def _bind_task(self) -> None:
        self._target_mocap = self.model.body("target").mocapid[0]

    def _sample_task(self, rng: np.random.Generator) -> None:
        self.data.mocap_pos[self._target_mocap] = rng.uniform([0.35, -0.25, 0.05], [0.65, 0.25, 0.35])

    def _write_task_state(self, out: np.ndarray) -> None:
        out[:] = self.data.mocap_pos[self._target_mocap]

    def _reward_and_success(self) -> tuple[float, bool]:
        dist = float(
            np.linalg.norm(self.data.mocap_pos[self._target_mocap] - self.data.site_xpos[self._site])
        )
        success = dist < self.success_radius
        return 1.0 - np.tanh(10.0 * dist) + 10.0 * success, success


class PushTask(_PushTask):
    name = "push"
    task_description = "push the red block onto the green target"
    objects_xml = _object_xml("block", BLOCK_HALF, ".85 .2 .2 1", 0.2) + _TARGET_MARKER.format(radius=0.04)
    default_max_episode_steps = 150
    success_radius = 0.03

    def _sample_task(self, rng: np.random.Generator) -> None:
        block = rng.uniform([0.4, -0.15], [0.55, 0.15])
        while True:  # a target 12-25 cm away that stays inside the pushable area
            angle, dist = rng.uniform(-np.pi, np.pi), rng.uniform(0.12, 0.25)
            target = block + dist * np.array([np.cos(angle), np.sin(angle)])
            if 0.35 <= target[0] <= 0.65 and abs(target[1]) <= 0.25:
                break
        self._place(block, rng.uniform(-np.pi / 4, np.pi / 4), target)

    def _reward_and_success(self) -> tuple[float, bool]:
        return self._push_reward(target_sharpness=10.0)


class PickPlaceTask(_ObjectTask):
    name = "pick_place"
    task_description = "pick up the red cube and place it on the green marker"
    object_name = "cube"
    object_half = CUBE_HALF
    objects_xml = _object_xml("cube", CUBE_HALF, ".85 .2 .2 1", 0.05) + _TARGET_MARKER.format(radius=0.03)
    default_max_episode_steps = 150
    success_radius = 0.03

    def _sample_task(self, rng: np.random.Generator) -> None:
        cube = rng.uniform([0.38, -0.2], [0.62, 0.2])
        while True:
            target = rng.uniform([0.38, -0.2], [0.62, 0.2])
            if np.linalg.norm(target - cube) > 0.12:
                break
        self._place(cube, rng.uniform(-0.3, 0.3), target)

    def _reward_and_success(self) -> tuple[float, bool]:
        return place_reward(self.object_pos(), self.target_pos(), self.data.site_xpos[self._site], self.success_radius)


def place_reward(obj: np.ndarray, target: np.ndarray, ee: np.ndarray, success_radius: float) -> tuple[float, bool]:
    """Pick-and-place's shaped reward and success: reach the cube, lift it, bring it over the target; success is
    the cube resting on the table (not held in the air) inside the target's radius."""
    ee_to_obj = float(np.linalg.norm(obj - ee))
    obj_to_target = float(np.linalg.norm(obj[:2] - target[:2]))
    lifted = obj[2] > CUBE_HALF + 0.01
    success = obj_to_target < success_radius and obj[2] < CUBE_HALF + 0.005
    reward = 0.5 * (1 - np.tanh(10 * ee_to_obj)) + 0.5 * lifted + (1 - np.tanh(10 * obj_to_target))
    return reward + 10.0 * success, success


# The arm looks along +x from the origin: its left is +y.
SIDES = {"left": 1.0, "right": -1.0}


class PushTwoWaysTask(_PushTask):
    """Push a block past a wall to a target straight behind it, around the side the instruction names.

    Start and target sit on the x axis on either side of the wall, so both detours are equally long and a
    policy that averages them pushes straight into the wall; success requires the block to have passed the wall
    on the instructed side (the side its centre was on when it crossed the wall's middle).
    """

    name = "push_two_ways"
    task_description = "push the red block around the gray wall onto the green target"
    goal_fields = {"side": ("left", "right")}
    instruction_templates = (
        "push the red block around the {side} side of the gray wall onto the green target",
        "go around the {side} of the obstacle",
        "take the {side} way around the wall and push the block to the target",
    )
    objects_xml = (
        _object_xml("block", BLOCK_HALF, ".85 .2 .2 1", 0.2)
        + _TARGET_MARKER.format(radius=0.04)
        + f"""
<geom name="wall" class="object" type="box" size="{OBSTACLE_HALF[0]} {OBSTACLE_HALF[1]} {OBSTACLE_HALF[2]}"
      pos="{OBSTACLE_POS[0]} {OBSTACLE_POS[1]} {OBSTACLE_HALF[2]}" rgba=".5 .5 .55 1"/>
"""
    )
    default_max_episode_steps = 200
    success_radius = 0.03

    def _sample_task(self, rng: np.random.Generator) -> None:
        block = np.array([rng.uniform(0.36, 0.39), rng.uniform(-0.02, 0.02)])
        target = np.array([rng.uniform(0.63, 0.66), rng.uniform(-0.02, 0.02)])
        self._place(block, rng.uniform(-0.2, 0.2), target)
        self.passed_side = 0.0  # +1 / -1 once the block's centre crossed the wall's middle on the left / right

    def _reward_and_success(self) -> tuple[float, bool]:
        reward, at_target = self._push_reward(target_sharpness=5.0)  # a longer push: a gentler slope
        obj = self.object_pos()
        if self.passed_side == 0.0 and obj[0] > OBSTACLE_POS[0]:
            self.passed_side = 1.0 if obj[1] > 0 else -1.0
        success = at_target and self.passed_side == SIDES[self.goal["side"]]
        return reward - 10.0 * (at_target and not success), success


PAD_RADIUS = 0.035


class PickColorTask(ArmTaskEnv):
    """Three coloured cubes and two coloured pads at random places; put the instructed cube on the instructed
    pad (six goals). The state lists every cube and pad in a fixed colour order, so only the instruction tells
    which; beside each one's position it gives its offset from the hand (`cube_red.dx`, ...), the vector a grasp
    or a placement follows, so a policy need not compute that difference for whichever cube the instruction names.
    (With or without the offsets, the chunked policies cloned here so far mostly learn one average approach: see
    README's language section.)"""

    name = "pick_color"
    task_description = "pick up the instructed cube and place it on the instructed pad"
    cube_colors = {"red": ".85 .2 .2 1", "green": ".2 .7 .25 1", "blue": ".2 .35 .9 1"}
    pad_colors = {"yellow": ".95 .85 .15 1", "purple": ".6 .25 .75 1"}
    goal_fields = {"color": tuple(cube_colors), "target": tuple(pad_colors)}
    instruction_templates = (
        "pick up the {color} cube and place it on the {target} pad",
        "put the {color} block on the {target} marker",
        "move the {color} cube onto the {target} target",
        # more phrasings than the goal needs, so that a policy keys on the colour words rather than a sentence
        "take the {color} one and put it down on the {target} one",
        "the {color} cube goes on the {target} pad",
        "carry the {color} block over to the {target} marker",
        "{color} cube to the {target} pad",
        "please move the {color} box onto the {target} disc",
    )
    objects_xml = "".join(_object_xml(f"cube_{c}", CUBE_HALF, rgba, 0.05) for c, rgba in cube_colors.items()) + "".join(
        f'<body name="pad_{p}" mocap="true" pos="0.5 0 0.001"><geom class="marker" type="cylinder" '
        f'size="{PAD_RADIUS} 0.001" rgba="{rgba}"/></body>' for p, rgba in pad_colors.items())
    task_state_names = (tuple(f"cube_{c}.{a}" for c in cube_colors for a in "xyz")
                        + tuple(f"pad_{p}.{a}" for p in pad_colors for a in "xy")
                        + tuple(f"cube_{c}.d{a}" for c in cube_colors for a in "xyz")
                        + tuple(f"pad_{p}.d{a}" for p in pad_colors for a in "xy"))
    default_max_episode_steps = 150
    success_radius = 0.03
    min_separation = 0.09  # between any two objects' centres: grasps and placements never disturb a neighbour

    def _bind_task(self) -> None:
        self._cube_qpos = {}
        self._cube_body = {}
        for c in self.cube_colors:
            adr = self.model.joint(f"cube_{c}").qposadr[0]
            self._cube_qpos[c] = slice(adr, adr + 7)
            self._cube_body[c] = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_BODY, f"cube_{c}")
        self._pad_mocap = {p: self.model.body(f"pad_{p}").mocapid[0] for p in self.pad_colors}

    def _sample_task(self, rng: np.random.Generator) -> None:
        n = len(self.cube_colors) + len(self.pad_colors)
        while True:
            xy = rng.uniform([0.36, -0.22], [0.64, 0.22], size=(n, 2))
            gaps = np.linalg.norm(xy[:, None] - xy[None], axis=-1) + np.eye(n)
            if gaps.min() > self.min_separation:
                break
        for q, p, yaw in zip(self._cube_qpos.values(), xy, rng.uniform(-0.3, 0.3, size=len(xy))):
            self.data.qpos[q] = [p[0], p[1], CUBE_HALF, np.cos(yaw / 2), 0, 0, np.sin(yaw / 2)]
        for mocap, p in zip(self._pad_mocap.values(), xy[len(self.cube_colors):]):
            self.data.mocap_pos[mocap] = [p[0], p[1], 0.001]

    def _write_task_state(self, out: np.ndarray) -> None:
        ee = self.data.site_xpos[self._site]
        cubes = [self.data.xpos[self._cube_body[c]] for c in self.cube_colors]
        pads = [self.data.mocap_pos[m][:2] for m in self._pad_mocap.values()]
        positions = np.concatenate(cubes + pads)  # [3 x 3 + 2 x 2]
        out[:len(positions)] = positions
        out[len(positions):] = np.concatenate([c - ee for c in cubes] + [p - ee[:2] for p in pads])

    def _reward_and_success(self) -> tuple[float, bool]:
        obj = self.data.xpos[self._cube_body[self.goal["color"]]]
        target = self.data.mocap_pos[self._pad_mocap[self.goal["target"]]]
        return place_reward(obj, target, self.data.site_xpos[self._site], self.success_radius)


class CatchTask(ArmTaskEnv):
    """A dynamic task where stopping costs success: a green ball crosses the workspace at constant speed
    (0.16-0.2 m/s, from a random side) and leaves it after ~3.5 s; the gripper must catch up with it and ride along,
    within `success_radius` of its centre for `hold_steps` consecutive control steps. A robot that pauses while
    its policy thinks (sync execution under latency) falls behind by speed x pause at every chunk.

    The ball's position is a function of physics time (`data.time`), so it moves the same whether the env is
    stepped by `step` (gymnasium) or in real time by `real.host.sim_arm`."""

    name = "catch"
    task_description = "catch the moving green ball and follow it with the gripper"
    objects_xml = """
<body name="target" mocap="true" pos="0.5 0 0.1">
  <geom class="marker" type="sphere" size="0.02" rgba=".2 .8 .3 1"/>
</body>
"""
    task_state_names = ("target.x", "target.y", "target.z", "target.vx", "target.vy", "target_from_ee.x", "target_from_ee.y",
                        "target_from_ee.z")
    default_max_episode_steps = 60
    success_radius = 0.025
    hold_steps = 12  # consecutive control steps within the radius
    exit_y = 0.36  # the ball has left the workspace (the episode is lost)

    def _bind_task(self) -> None:
        self._target_mocap = self.model.body("target").mocapid[0]
        self.ball_start, self.ball_velocity = np.array([0.5, 0.0, 0.1]), np.zeros(3)
        self.held = 0

    def _sample_task(self, rng: np.random.Generator) -> None:
        side = 1.0 if rng.random() < 0.5 else -1.0
        self.ball_start = np.array([rng.uniform(0.4, 0.58), side * rng.uniform(0.28, 0.32), rng.uniform(0.06, 0.14)])
        speed, heading = rng.uniform(0.16, 0.2), rng.uniform(-0.25, 0.25)  # heading: off the y axis (rad)
        self.ball_velocity = speed * np.array([np.sin(heading), -side * np.cos(heading), 0.0])
        self.held = 0
        self._advance_ball()

    def _advance_ball(self) -> np.ndarray:
        ball = self.ball_start + self.ball_velocity * self.data.time
        self.data.mocap_pos[self._target_mocap] = ball
        return ball

    def _write_task_state(self, out: np.ndarray) -> None:
        ball = self._advance_ball()
        out[0:3] = ball
        out[3:5] = self.ball_velocity[:2]
        out[5:8] = ball - self.data.site_xpos[self._site]

    def _reward_and_success(self) -> tuple[float, bool]:
        ball = self._advance_ball()
        dist = float(np.linalg.norm(ball - self.data.site_xpos[self._site]))
        self.held = self.held + 1 if dist < self.success_radius else 0
        success = self.held >= self.hold_steps
        return 1.0 - np.tanh(10.0 * dist) + 10.0 * success, success

    def step(self, action: np.ndarray):
        obs, reward, success, truncated, info = super().step(action)
        gone = abs(float(self.data.mocap_pos[self._target_mocap][1])) > self.exit_y
        return obs, reward, success, truncated or (gone and not success), info


TASK_CLASSES: dict[str, type[ArmTaskEnv]] = {
    cls.name: cls for cls in (ReachTask, PushTask, PickPlaceTask, PushTwoWaysTask, PickColorTask, CatchTask)
}
