"""Scripted experts for the built-in tasks, acting from `observation.state` alone.

Each expert is a small phase machine in end-effector space producing `ee_delta` actions
(dx, dy, dz in [-1, 1] scaled by MAX_DELTA, gripper -1 open .. +1 closed). `noise` adds Gaussian action
noise to the action it returns (noisy labels); `dart` is DART exploration (Laskey et al. 2017): `explore`
returns the clean label together with an executed action that adds Gaussian noise of that std, so that
collected demonstrations visit perturbed states labelled with the expert's correction. `sloppy=True` imitates a poor teleoperator: slower and uneven speed, pauses, jerks, detours and
imprecise grasp/placement points, drawn anew each episode. With `control="joint_pos"` the expert turns
its end-effector decision into absolute joint targets with the env's own IK on a private copy of the arm
(the joint positions are in the state), so joint-space demonstrations replay the same behaviour.

In a language task the goal is not in the state: the expert reads it from `obs["goal"]` (the env's `goal`
dict, which `robopolicy.rollout` adds to the observations it hands to experts); without it, an expert
draws a goal of its own at reset.
"""

from __future__ import annotations

import mujoco
import numpy as np

from robopolicy.data.spec import STATE_KEY
from sim.builtin.base import (
    MAX_DELTA,
    ROBOT_STATE_NAMES,
    WORKSPACE_HIGH,
    WORKSPACE_LOW,
    arm_controller,
    ee_delta_joint_targets,
)
from sim.builtin.scene import scene_xml
from sim.builtin.tasks import BLOCK_HALF, CUBE_HALF, OBSTACLE_HALF, OBSTACLE_POS, SIDES, TASK_CLASSES

OPEN, CLOSED = -1.0, 1.0
TRAVEL_Z = 0.08  # clear of the blocks when moving over them
PUSH_Z = 0.02
PUSH_OFFSET = BLOCK_HALF * np.sqrt(2) + 0.02  # behind the block's farthest corner plus finger half-width


class Expert:
    """Base: state parsing, the sloppy/noise layer, DART exploration and a proportional move towards a point."""

    # DART exploration std (action units) when none is given: where cloned policies drift into states the
    # clean demonstrations never visit, the task's expert explores by default.
    default_dart = 0.0

    def __init__(
        self,
        task: str,
        noise: float = 0.0,
        sloppy: bool = False,
        seed: int | None = None,
        control: str = "ee_delta",
        dart: float | None = None,
    ):
        task_cls = TASK_CLASSES[task]
        self.goal_fields = task_cls.goal_fields
        names = list(ROBOT_STATE_NAMES) + list(task_cls.task_state_names)
        self._index = {n: i for i, n in enumerate(names)}
        self.noise, self.sloppy, self.control = noise, sloppy, control
        self.dart = self.default_dart if dart is None else float(dart)
        if self.dart < 0:
            raise ValueError(f"dart must be a non-negative std (action units), got {dart!r}.")
        if control == "joint_pos":
            self._model = mujoco.MjModel.from_xml_string(scene_xml(task, task_cls.objects_xml))
            self._data = mujoco.MjData(self._model)
            self._ik = arm_controller(self._model)
        elif control != "ee_delta":
            raise ValueError(
                f"Unknown control {control!r} for the builtin/{task} expert: use ee_delta or joint_pos."
            )
        self._rng = np.random.default_rng(seed)
        self.reset(seed)

    def reset(self, seed: int | None = None) -> None:
        """Start a new episode; a seed makes its random choices (mode, sloppiness, noise) reproducible."""
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        rng = self._rng
        self.phase = "start"
        self._timer = 0
        self._pause = 0
        self._jerk = np.zeros(3)
        # sloppy teleoperator traits of this episode
        self.speed = rng.uniform(0.5, 0.85) if self.sloppy else 1.0
        self.aim_error = rng.normal(0.0, 0.006, size=2) if self.sloppy else np.zeros(2)
        wanders = self.sloppy and rng.random() < 0.4  # sets off towards a wrong spot first
        self._detour = rng.uniform([0.35, -0.2, 0.1], [0.6, 0.2, 0.2]) if wanders else None
        self._reset_task(rng)
        # a goal of its own until the env's is given (the draw comes last: the other choices keep their seeds)
        self.goal: dict[str, str] = {}
        if self.goal_fields:
            self.set_goal({f: v[int(rng.integers(len(v)))] for f, v in self.goal_fields.items()})

    def _reset_task(self, rng: np.random.Generator) -> None:
        pass

    def restart(self) -> None:
        """Forget the phase (not the episode's traits): the next action is planned from the state alone, as a person
        taking over judges the scene afresh. A scripted intervener calls it at each takeover: the phase left from
        an earlier takeover is stale after the policy has moved things."""
        self.phase, self._timer, self._pause = "start", 0, 0
        self._jerk = np.zeros(3)
        self._detour = None

    def predict(self, state: np.ndarray, action: np.ndarray) -> np.ndarray:
        """The state one control step after `action` (ee_delta), approximately: the hand moved by the commanded
        delta, what it holds (`_carried`) with it, the `*_from_ee` offsets by minus the delta. A controller whose
        command meets the robot one step after the frame it read (any real-time loop: the servo samples the
        command as the next frame is captured) plans from this prediction: the expert's full-gain moves
        (each step aims at the goal) oscillate around the goal when they act on the frame before.
        joint_pos control: the state unchanged."""
        state = np.array(state, dtype=np.float32, copy=True)
        if self.control != "ee_delta":
            return state
        ee = self._get(state, "ee.x", "ee.y", "ee.z")
        moved = np.clip(ee + np.clip(np.asarray(action, np.float64)[:3], -1.0, 1.0) * MAX_DELTA,
                        WORKSPACE_LOW, WORKSPACE_HIGH)
        delta = moved - ee
        carried = self._carried(state, ee)
        for name, i in self._index.items():
            if name.endswith((".x", ".y", ".z")):
                base, axis = name[:-2], "xyz".index(name[-1])
                if base == "ee" or base in carried:
                    state[i] += delta[axis]
                elif base.endswith("_from_ee"):
                    state[i] -= delta[axis]
        return state

    def _carried(self, state: np.ndarray, ee: np.ndarray) -> tuple[str, ...]:
        """Names of the objects the hand holds (they move with it)."""
        return ()

    def set_goal(self, goal: dict[str, str]) -> None:
        """The goal of this episode (a language task's `env.goal`)."""
        self.goal = dict(goal)

    def _get(self, state: np.ndarray, *names: str) -> np.ndarray:
        return state[[self._index[n] for n in names]].astype(np.float64)

    def _move(self, ee: np.ndarray, goal: np.ndarray, gain: float = 1.0) -> np.ndarray:
        """Proportional step towards `goal` [3], at most full speed per axis."""
        return np.clip(gain * (goal - ee) / MAX_DELTA, -1.0, 1.0) * self.speed

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """The expert's action for `obs` (with its noise and sloppiness, if any): the label to record."""
        state = np.asarray(obs[STATE_KEY])
        goal = obs.get("goal")
        if goal and goal != self.goal:
            self.set_goal(goal)
        self._ee_action = self._ee_act(state)
        return self._to_control(state, self._ee_action)

    def explore(self, obs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(label, executed): the action to record and the one to send to the env, which adds DART noise
        to the motion (the gripper command is kept: a flipped grasp is not a small perturbation)."""
        label = self.act(obs)
        if self.dart == 0:
            return label, label
        executed = self._ee_action.copy()
        executed[:3] = np.clip(executed[:3] + self._rng.normal(0.0, self.dart, size=3), -1.0, 1.0)
        return label, self._to_control(np.asarray(obs[STATE_KEY]), executed)

    def _to_control(self, state: np.ndarray, action: np.ndarray) -> np.ndarray:
        """An ee_delta action [4] in the env's control mode (joint_pos: IK on the private arm copy)."""
        if self.control == "joint_pos":
            self._data.qpos[self._ik.qpos_adr] = self._get(state, *ROBOT_STATE_NAMES[:7])
            mujoco.mj_kinematics(self._model, self._data)
            mujoco.mj_comPos(self._model, self._data)
            action = np.append(ee_delta_joint_targets(self._ik, self._data, action), action[3])
        return action.astype(np.float32)

    def _ee_act(self, state: np.ndarray) -> np.ndarray:
        ee = self._get(state, "ee.x", "ee.y", "ee.z")
        if self._detour is not None and np.linalg.norm(self._detour - ee) < 0.03:
            self._detour = None
        if self._detour is not None:
            action = np.append(self._move(ee, self._detour), OPEN)
        else:
            action = np.asarray(self._plan(state, ee), dtype=np.float64)
        if self.sloppy:
            action = self._sloppify(action)
        if self.noise > 0:
            action[:3] += self._rng.normal(0.0, self.noise, size=3)
        return np.clip(action, -1.0, 1.0)

    def _plan(self, state: np.ndarray, ee: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _sloppify(self, action: np.ndarray) -> np.ndarray:
        rng = self._rng
        if self._pause > 0:  # hesitation: the arm stops, the gripper keeps its command
            self._pause -= 1
            action[:3] = 0.0
        elif rng.random() < 0.04:
            self._pause = int(rng.integers(1, 5))
        if rng.random() < 0.06:  # a jerk that decays over the next steps
            self._jerk = rng.normal(0.0, 0.6, size=3)
            self._jerk[2] *= 0.3
        action[:3] += self._jerk
        self._jerk *= 0.5
        action[:3] *= rng.uniform(0.6, 1.4)  # uneven speed
        return action


class ReachExpert(Expert):
    def _plan(self, state: np.ndarray, ee: np.ndarray) -> np.ndarray:
        target = self._get(state, "target.x", "target.y", "target.z")
        target[:2] += self.aim_error * 0.5
        return np.append(self._move(ee, target), OPEN)


class PushExpert(Expert):
    """Pushes the block through a list of waypoints, re-approaching from behind whenever alignment is lost."""

    waypoint_tolerance = 0.025
    # Action units while pushing (the last leg slows down near its goal). Slow enough that a cloned policy's
    # lateral corrections keep up with the block's drift (compare with benchmarks/train_targets.py).
    push_speed = 0.35

    def _waypoints(self, block: np.ndarray, target: np.ndarray) -> list[np.ndarray]:
        return [target]

    def _reset_task(self, rng: np.random.Generator) -> None:
        self._route: list[np.ndarray] | None = None

    def _passed(self, block: np.ndarray, waypoint: np.ndarray, next_waypoint: np.ndarray) -> bool:
        """Close enough to a via point, or already beyond it and on the next leg's line (pushing back
        would cost a detour, but cutting the corner could hit the wall)."""
        leg = (next_waypoint - waypoint) / np.linalg.norm(next_waypoint - waypoint)
        rel = block - waypoint
        off_line = abs(rel[0] * leg[1] - rel[1] * leg[0])
        return np.linalg.norm(rel) < self.waypoint_tolerance or (
            rel @ leg > 0 and off_line < self.waypoint_tolerance
        )

    def _plan(self, state: np.ndarray, ee: np.ndarray) -> np.ndarray:
        block = self._get(state, "object.x", "object.y")
        target = self._get(state, "target.x", "target.y")
        if self._route is None:
            self._route = self._waypoints(block, target)
        while len(self._route) > 1 and self._passed(block, self._route[0], self._route[1]):
            self._route.pop(0)
        goal = self._route[0]
        to_goal = goal - block
        dist = np.linalg.norm(to_goal)
        u = to_goal / max(dist, 1e-6)
        perp = np.array([-u[1], u[0]])
        rel = ee[:2] - (block + self.aim_error)
        along, lateral = rel @ u, rel @ perp
        behind = block + self.aim_error - u * PUSH_OFFSET
        # A feedback law of the current state alone (no remembered phase) that changes smoothly where
        # cloned policies end up, so that a perturbed arm, or a policy cloned from it, is told how to
        # recover from wherever it is: behind the block it pushes when on the block's centre line and
        # backs off to re-align as it slides off it; only an arm beside or in front of the block lifts.
        low = ee[2] < TRAVEL_Z - 0.015
        if low and along < -BLOCK_HALF and abs(lateral) < 0.04 and ee[2] < PUSH_Z + 0.02:
            self.phase = "push"
            aligned = np.clip((0.025 - abs(lateral)) / 0.015, 0.0, 1.0)  # 1 within 1 cm of the line, 0 past 2.5
            speed = np.clip(dist / MAX_DELTA, 0.25, self.push_speed) if len(self._route) == 1 else self.push_speed
            back_off = np.clip((-PUSH_OFFSET - along) / MAX_DELTA, -1.0, 1.0)
            forward = aligned * speed + (1.0 - aligned) * back_off
            xy = u * forward - perp * np.clip(lateral / MAX_DELTA, -1.0, 1.0) * (1.0 - 0.5 * aligned)
            z = (PUSH_Z - ee[2]) / MAX_DELTA
            return np.array([xy[0] * self.speed, xy[1] * self.speed, z, CLOSED])
        if low and along < -PUSH_OFFSET + 0.01:
            self.phase = "align"  # clear of the block's back corners: slide behind it at push height
            goal3 = np.array([*behind, PUSH_Z])
        elif low:
            self.phase = "lift"  # beside or in front of the block: up before travelling over it
            goal3 = np.array([ee[0], ee[1], TRAVEL_Z])
        elif np.linalg.norm(ee[:2] - behind) < 0.02:
            self.phase = "descend"
            goal3 = np.array([*behind, PUSH_Z])
        else:
            self.phase = "approach"
            goal3 = np.array([*behind, TRAVEL_Z])
        return np.append(self._move(ee, goal3), CLOSED)


class PushTwoWaysExpert(PushExpert):
    """Goes around the wall on the instructed side (drawn 50/50 per episode: the demonstrations are bimodal)."""

    # The detour is long and a cloned policy drifts off it: its demonstrations explore by default (DART).
    # Plain pushes do better without it. Compare values with `robopolicy collect ... expert.dart=X` and
    # benchmarks/train_targets.py.
    default_dart = 0.15

    def _reset_task(self, rng: np.random.Generator) -> None:
        super()._reset_task(rng)
        self.lane = OBSTACLE_HALF[1] + BLOCK_HALF + (rng.uniform(0.045, 0.06) if self.sloppy else 0.05)

    def set_goal(self, goal: dict[str, str]) -> None:
        super().set_goal(goal)
        self.side = SIDES[goal["side"]]
        self._route = None  # planned again on the next step, on this side

    def _waypoints(self, block: np.ndarray, target: np.ndarray) -> list[np.ndarray]:
        y = self.side * self.lane
        x0 = OBSTACLE_POS[0] - OBSTACLE_HALF[0]
        x1 = OBSTACLE_POS[0] + OBSTACLE_HALF[0]
        return [np.array([x0 - 0.05, y]), np.array([x1 + 0.03, y]), target]


class PickPlaceExpert(Expert):
    """Above the cube, down, close, lift, carry above the marker, lower, open; regrasps after a drop.

    `funnel_slope` > 0 replaces "above, then down" by one closed-loop approach: the hand heads for the cube at half
    gain while descending a cone over it (height above the cube = slope x horizontal error), and closes once at the
    bottom. Every approach action is then a smooth function of the hand's offset from the cube, not of how long
    the hand has travelled, which a cloned policy executing open-loop chunks can follow."""

    cube_names = ("object.x", "object.y", "object.z")
    target_names = ("target.x", "target.y")
    funnel_slope = 0.0
    _open_gripper = 0.06  # gripper.opening (m) below this: closed (0.08 open, about 0.034 on the cube)

    @staticmethod
    def _holds(cube: np.ndarray, ee: np.ndarray) -> bool:
        return bool(np.linalg.norm(cube - ee) < 0.03 and cube[2] > CUBE_HALF - 0.005)

    def _carried(self, state: np.ndarray, ee: np.ndarray) -> tuple[str, ...]:
        cube = self._get(state, *self.cube_names)
        return (self.cube_names[0][:-2],) if self._holds(cube, ee) else ()

    def _plan(self, state: np.ndarray, ee: np.ndarray) -> np.ndarray:
        cube = self._get(state, *self.cube_names)
        target = self._get(state, *self.target_names)
        grasp_xy = cube[:2] + self.aim_error
        place_xy = target + self.aim_error
        held = self._holds(cube, ee)
        if self.phase in ("lift", "carry", "lower") and not held:
            self.phase = "start"  # dropped: start over
        if self.phase == "start":  # (re)started with the cube in hand (a takeover mid-carry): carry on
            self.phase = "lift" if held and state[self._index["gripper.opening"]] < self._open_gripper else "above"
        if self.phase == "above" and self.funnel_slope:
            xy_error = float(np.linalg.norm(ee[:2] - grasp_xy))
            if xy_error < 0.01 and ee[2] < CUBE_HALF + 0.006:
                self.phase, self._timer = "close", 0
            else:  # down a cone over the cube: the lower the hand, the better aligned it must be
                cone_z = CUBE_HALF - 0.004 + self.funnel_slope * xy_error
                goal = np.array([*grasp_xy, min(cone_z, max(ee[2], TRAVEL_Z))])
                step = np.clip(np.array([0.5, 0.5, 1.0]) * (goal - ee) / MAX_DELTA, -1.0, 1.0) * self.speed
                return np.append(step, OPEN)
        if self.phase == "above":
            if np.linalg.norm(ee[:2] - grasp_xy) < 0.01:
                self.phase = "down"
            else:
                goal = np.array(
                    [
                        *grasp_xy,
                        max(TRAVEL_Z, ee[2]) if np.linalg.norm(ee[:2] - grasp_xy) > 0.03 else TRAVEL_Z,
                    ]
                )
                return np.append(self._move(ee, goal), OPEN)
        if self.phase == "down":
            if ee[2] < CUBE_HALF + 0.006:
                self.phase, self._timer = "close", 0
            else:
                return np.append(self._move(ee, np.array([*grasp_xy, CUBE_HALF])), OPEN)
        if self.phase == "close":
            self._timer += 1
            if self._timer > 3:
                self.phase = "lift"
            return np.array([0.0, 0.0, 0.0, CLOSED])
        if self.phase == "lift":
            if ee[2] > TRAVEL_Z + 0.02:
                self.phase = "carry"
            else:
                return np.append(self._move(ee, np.array([ee[0], ee[1], TRAVEL_Z + 0.04])), CLOSED)
        if self.phase == "carry":
            if np.linalg.norm(ee[:2] - place_xy) < 0.01:
                self.phase = "lower"
            else:
                return np.append(self._move(ee, np.array([*place_xy, TRAVEL_Z + 0.03])), CLOSED)
        if self.phase == "lower":
            if cube[2] < CUBE_HALF + 0.004:
                self.phase, self._timer = "release", 0
            else:
                return np.append(self._move(ee, np.array([*place_xy, CUBE_HALF + 0.002]), gain=0.6), CLOSED)
        if self.phase == "release":
            self._timer += 1
            if self._timer > 2:
                self.phase = "retreat"
            return np.array([0.0, 0.0, 0.0, OPEN])
        # retreat; if the episode is still running the cube missed the marker: pick it up again
        if ee[2] > TRAVEL_Z + 0.03:
            self.phase = "above"
        return np.append(self._move(ee, np.array([ee[0], ee[1], TRAVEL_Z + 0.05])), OPEN)


class PickColorExpert(PickPlaceExpert):
    """The pick-and-place expert on the instructed cube and pad, approaching down a cone: its phased approach
    (a saturated dash above the cube, then straight down) was cloned as a dash of the usual length followed by a
    descent wherever the hand was, beside the cube (README's language section)."""

    funnel_slope = 1.5
    default_dart = 0.2  # demonstrations that also show the hand brought back over the cube from beside it

    def set_goal(self, goal: dict[str, str]) -> None:
        super().set_goal(goal)
        self.cube_names = tuple(f"cube_{goal['color']}.{a}" for a in "xyz")
        self.target_names = tuple(f"pad_{goal['target']}.{a}" for a in "xy")


class CatchExpert(Expert):
    """Moves with the ball (its velocity as feed-forward) and closes the gap proportionally, aiming where the ball
    will be when the step's motion is done."""

    lead_s = 0.1  # one control step ahead: the move commanded now completes by the next step

    def _plan(self, state: np.ndarray, ee: np.ndarray) -> np.ndarray:
        ball = self._get(state, "target.x", "target.y", "target.z")
        velocity = np.append(self._get(state, "target.vx", "target.vy"), 0.0)
        ball[:2] += self.aim_error * 0.5
        return np.append(self._move(ee, ball + velocity * self.lead_s, gain=0.8), OPEN)


EXPERT_CLASSES: dict[str, type[Expert]] = {
    "reach": ReachExpert,
    "push": PushExpert,
    "pick_place": PickPlaceExpert,
    "push_two_ways": PushTwoWaysExpert,
    "pick_color": PickColorExpert,
    "catch": CatchExpert,
}
