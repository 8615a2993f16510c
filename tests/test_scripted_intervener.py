"""The scripted intervener (real/host/teleop.py): takes over on a stall and asks the expert at the task's rate."""

import numpy as np

import sim
from real.host.teleop import ScriptedIntervener
from robopolicy.data.spec import STATE_KEY


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class StillRobot:
    """A simulated pick_place robot seen through the HAL's reads, with its hand kept still (a stalled policy)."""

    fps = 10

    def __init__(self) -> None:
        env = sim.make_env("builtin/pick_place")
        obs, _ = env.reset(seed=0)
        self.state = np.asarray(obs[STATE_KEY], dtype=np.float32)
        self.observation_features = {STATE_KEY: {"names": list(env.unwrapped.feature_names[STATE_KEY])}}
        env.close()
        self.status = {"success": False}

    def get_observation(self) -> dict:
        return {STATE_KEY: self.state}


class CountingExpert:
    def __init__(self, expert) -> None:
        self.expert, self.calls = expert, []

    def reset(self, seed=None) -> None:
        self.expert.reset(seed)

    def act(self, obs):
        self.calls.append(obs)
        return self.expert.act(obs)


def test_a_stall_starts_a_takeover_and_the_expert_runs_at_the_task_rate_on_a_jittery_20hz_loop():
    clock = Clock()
    robot = StillRobot()
    intervener = ScriptedIntervener(robot, "builtin/pick_place", stall_s=1.0, takeover_s=2.0, clock=clock)
    intervener.connect()
    intervener._expert = counting = CountingExpert(intervener._expert)
    rng = np.random.default_rng(0)
    actions = []
    for tick in range(120):  # 6 s at 20 Hz; each tick up to 1 ms early or late, as a real loop's are
        clock.t = tick * 0.05 + rng.uniform(-1e-3, 1e-3)
        actions.append(intervener.get_action())
    assert intervener.interventions >= 1
    taking_over = [a is not None for a in actions]
    first = taking_over.index(True)
    assert 19 <= first <= 22  # the hand stayed still for stall_s (1 s at 20 Hz)
    assert sum(taking_over[first:first + 40]) == 40  # then takeover_s (2 s) of the expert's actions
    # the expert's phase machine counts task steps: 10 Hz, i.e. every 2nd tick of the 20 Hz loop (it used to be
    # asked every 3rd tick, as a tick a hair early missed the due time)
    assert abs(len(counting.calls) - sum(taking_over) / 2) <= 2
