"""benchmarks/pick_color_failures.py: a failed pick_color episode is sorted by the first thing that went wrong."""

from __future__ import annotations

import numpy as np
from conftest import load_benchmark

GOAL = {"color": "green", "target": "purple"}


def pick_color_names() -> list[str]:
    import sim
    from robopolicy.data.spec import STATE_KEY
    from robopolicy.features import features_from_env

    env = sim.make_env("builtin/pick_color")
    features = features_from_env(env.observation_space, env.action_space, getattr(env.unwrapped, "feature_names", None))
    env.close()
    return list(features[STATE_KEY]["names"])


def episode(names: list[str], lift: str | None = None, end_at: tuple[float, float] | None = None) -> np.ndarray:
    """States [20, D]: cubes resting at z 0.02, the yellow pad at (0.4, 0.1), the purple one at (0.6, -0.1); `lift`
    raises that cube 5 cm mid-episode; `end_at`: where the green cube ends."""
    column = {name: i for i, name in enumerate(names)}
    states = np.zeros((20, len(names)), dtype=np.float32)
    for i, colour in enumerate(("red", "green", "blue")):
        states[:, column[f"cube_{colour}.x"]], states[:, column[f"cube_{colour}.y"]] = 0.5, -0.2 + 0.2 * i
        states[:, column[f"cube_{colour}.z"]] = 0.02
    for pad, (x, y) in {"yellow": (0.4, 0.1), "purple": (0.6, -0.1)}.items():
        states[:, column[f"pad_{pad}.x"]], states[:, column[f"pad_{pad}.y"]] = x, y
    if lift:
        states[8:14, column[f"cube_{lift}.z"]] = 0.07
    if end_at:
        states[-1, column["cube_green.x"]], states[-1, column["cube_green.y"]] = end_at
    return states


def test_each_failure_is_named_for_what_went_wrong_first():
    bench = load_benchmark("pick_color_failures")
    names = pick_color_names()

    def kind(states):
        return bench.classify(states, names, GOAL, pad_radius=0.035)

    assert kind(episode(names)) == "never_grasped"
    assert kind(episode(names, lift="blue")) == "grasped_wrong_cube"
    assert kind(episode(names, lift="green", end_at=(0.41, 0.1))) == "right_cube_wrong_pad"
    assert kind(episode(names, lift="green", end_at=(0.5, 0.0))) == "right_cube_missed_pad"
    # the named cube pushed (not lifted) onto the pad it was told is still no grasp
    pushed = episode(names, end_at=(0.6, -0.1))
    assert kind(pushed) == "never_grasped"
    # a wrong cube dropped, then the named one carried: the grasp was right at last, the placement is what failed
    both = episode(names, lift="green", end_at=(0.5, 0.0))
    both[2:5, names.index("cube_red.z")] = 0.07
    assert kind(both) == "right_cube_missed_pad"


def test_the_thresholds_fit_the_simulator(tmp_path, cli):
    """On the scripted expert's real episodes the named cube is lifted and ends on the named pad, no other cube rises."""
    import sim
    from robopolicy.data import DemoStore
    from robopolicy.data.spec import STATE_KEY
    from sim.builtin.tasks import PAD_RADIUS

    bench = load_benchmark("pick_color_failures")
    cli("collect", "task=builtin/pick_color", "episodes=4", "num_envs=2", f"out={tmp_path / 'pc'}", check=True)
    store = DemoStore.open(tmp_path / "pc")
    states, names = store.read(STATE_KEY), store.features[STATE_KEY]["names"]
    env = sim.make_env("builtin/pick_color")
    for start, end, meta in zip(store.episode_starts, store.episode_ends, store.episodes):
        goal = env.unwrapped.goal_from_instruction(meta["task"])
        assert bench.classify(states[start:end], names, goal, PAD_RADIUS) == "on_the_named_pad"
        wrong = {"color": next(c for c in ("red", "green", "blue") if c != goal["color"]), "target": goal["target"]}
        assert bench.classify(states[start:end], names, wrong, PAD_RADIUS) == "grasped_wrong_cube"
    env.close()
