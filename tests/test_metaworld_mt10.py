"""`metaworld/mt10` (and MT50): one env drawing a task per reset, written instructions, the task's expert, eval per task."""

import json

import numpy as np
import pytest
from conftest import last_json

pytest.importorskip("metaworld")

import sim  # noqa: E402
from sim import metaworld_adapter  # noqa: E402
from sim.metaworld_adapter import multi_task_names, task_variations  # noqa: E402
from sim.metaworld_language import INSTRUCTIONS  # noqa: E402

MT10 = "metaworld/mt10"


@pytest.fixture(scope="module")
def env():
    env = sim.make_env(MT10)
    yield env
    env.close()


def test_a_reset_draws_task_variation_and_instruction_from_its_seed(env):
    assert env.observation_space["observation.state"].shape == (39,)
    assert env.unwrapped.goal_fields == {"task": tuple(multi_task_names("mt10"))}
    a, _ = env.reset(seed=7)
    first = (dict(env.goal), env.instruction)
    b, _ = env.reset(seed=7)
    assert (dict(env.goal), env.instruction) == first
    np.testing.assert_array_equal(a["observation.state"], b["observation.state"])
    draws = []
    for seed in range(60):
        obs, _ = env.reset(seed=seed)
        draws.append((env.goal["task"], env.instruction, tuple(obs["observation.state"][-3:])))
    tasks = {t for t, _, _ in draws}
    assert tasks == set(multi_task_names("mt10")), "60 seeded resets should visit all ten tasks"
    push_goals = {g for t, _, g in draws if t == "push-v3"}
    assert len(push_goals) > 1, "the same task gets different variations under different seeds"


def test_seeded_resets_run_every_task_equally_often(env):
    """Task `seed mod 10`: any 20 consecutive seeds (collect's from 0, eval's from its own start) run each task
    twice, so 500 episodes are exactly 50 per task; variation and instruction still come from the seed."""
    tasks = multi_task_names("mt10")
    for start in (0, 1_000_003):
        visits = []
        for seed in range(start, start + 2 * len(tasks)):
            env.reset(seed=seed)
            visits.append(env.goal["task"])
        assert sorted(visits) == sorted(tasks * 2), visits
    env.reset(seed=7)
    assert env.goal["task"] == tasks[7]
    goals = {tuple(env.reset(seed=s)[0]["observation.state"][-3:]) for s in range(3, 100, 10)}  # all task 3
    assert len(goals) > 1, "the seed still draws the task's variation"


def test_state_dimensions_are_named_by_entity(env):
    """hand, gripper, two object poses, the previous frame's, the goal: `entity.field`, 7 entities (obj1 and obj2
    are one entity, names dropping trailing digits), as MetaWorld lays out its observation."""
    from robopolicy.policies.vla_tokens import state_entities

    for probe in (env.unwrapped, sim.make_env("metaworld/reach-v3")):
        names = probe.feature_names["observation.state"]
        assert len(names) == 39 and all(n.count(".") == 1 for n in names)
        assert names[:4] == ["hand.x", "hand.y", "hand.z", "gripper.opening"]
        assert names[4:11] == ["obj1.x", "obj1.y", "obj1.z", "obj1.qx", "obj1.qy", "obj1.qz", "obj1.qw"]
        assert names[18:22] == ["prev_hand.x", "prev_hand.y", "prev_hand.z", "prev_gripper.opening"]
        assert names[29:36] == [f"prev_obj2.{f}" for f in ("x", "y", "z", "qx", "qy", "qz", "qw")]
        assert names[-3:] == ["goal.x", "goal.y", "goal.z"]
    # the named goal is the goal MetaWorld observes, the named hand its end effector
    obs, _ = env.reset(seed=3)
    inner = env.unwrapped.current._env
    names = env.unwrapped.feature_names["observation.state"]
    state = dict(zip(names, obs["observation.state"]))
    np.testing.assert_allclose([state[f"goal.{c}"] for c in "xyz"], inner._get_pos_goal(), atol=1e-6)
    np.testing.assert_allclose([state[f"hand.{c}"] for c in "xyz"], inner.get_endeff_pos(), atol=1e-6)
    spec = {"dtype": "float32", "shape": [39], "names": names}
    groups = state_entities("observation.state", spec, "entity")
    assert [len(idx) for _, idx in groups] == [3, 1, 14, 3, 1, 14, 3]


def test_the_vla_builds_one_state_token_per_metaworld_entity(env):
    """The vla on a MetaWorld store's features: 7 state tokens (not 39 one-dimension ones), and no pointer (no two
    entities of one family and layout to choose between)."""
    from test_policies import make_stats
    from test_vla import vla_config

    from robopolicy.features import features_from_env
    from robopolicy.policies import make_policy

    features = features_from_env(env.observation_space, env.action_space, env.unwrapped.feature_names)
    policy = make_policy(vla_config(pointer=True), features, make_stats(features))
    assert len(policy.obs_encoder.state_groups) == 7
    assert policy.obs_encoder.pointer is None


def test_every_instruction_is_one_of_its_tasks_phrasings(env):
    for task in multi_task_names("mt50"):
        assert len(set(INSTRUCTIONS[task])) >= 3
    for seed in range(40):
        env.reset(seed=seed)
        assert env.instruction in INSTRUCTIONS[env.goal["task"]]
    # drawer open / close: the instructions differ in the word that matters
    assert not set(INSTRUCTIONS["drawer-open-v3"]) & set(INSTRUCTIONS["drawer-close-v3"])


def test_misinstruct_names_another_task_and_templates_are_refused():
    env = sim.make_env(MT10, misinstruct=True)
    for seed in range(10):
        env.reset(seed=seed)
        named = env.unwrapped.goal_from_instruction(env.instruction)
        assert named != env.goal and named["task"] in multi_task_names("mt10")  # the task swapped
        assert env.goal["task"] == multi_task_names("mt10")[seed]  # success checks the seed's task still
        assert env.instruction not in INSTRUCTIONS[env.goal["task"]]
    env.close()
    with pytest.raises(ValueError, match="misinstruct needs a task whose instruction names a goal"):
        sim.make_env("metaworld/push-v3", misinstruct=True)
    with pytest.raises(ValueError, match="no instruction fields"):
        sim.make_env(MT10, instruction_template="do {task}")


def test_variations_are_mt10s_and_the_cache_file_gives_them_back(tmp_path, monkeypatch):
    built = task_variations("mt10")
    assert {t: len(v) for t, v in built.items()} == {t: 50 for t in multi_task_names("mt10")}
    monkeypatch.setenv("ROBOPOLICY_CACHE", str(tmp_path))
    monkeypatch.setattr(metaworld_adapter, "_VARIATIONS", {})
    import metaworld

    bench = metaworld.MT10(seed=0)
    probe = bench.train_classes["push-v3"]()
    probe.set_task(next(t for t in bench.train_tasks if t.env_name == "push-v3"))
    assert np.array_equal(task_variations("mt10")["push-v3"][0], probe._last_rand_vec)
    assert (tmp_path / "metaworld" / "mt10_seed0_variations.json").exists()
    monkeypatch.setattr(metaworld_adapter, "_VARIATIONS", {})
    again = task_variations("mt10")  # from the file
    assert all(np.array_equal(a, b) for t in built for a, b in zip(built[t], again[t]))


def test_the_expert_succeeds_on_every_task(env):
    expert = sim.make_expert(MT10)
    results: dict[str, list[bool]] = {t: [] for t in multi_task_names("mt10")}
    seed = 0
    while min(len(v) for v in results.values()) < 3:
        obs, _ = env.reset(seed=seed)
        expert.reset(seed)
        task = env.goal["task"]
        seed += 1
        if len(results[task]) >= 3:
            continue
        for _ in range(env.max_episode_steps):
            obs, _, terminated, truncated, info = env.step(expert.act({**obs, "goal": env.goal}))
            if terminated or truncated:
                break
        results[task].append(info["success"])
    rates = {t: np.mean(v) for t, v in results.items()}
    assert all(r >= 2 / 3 for r in rates.values()), rates
    assert np.mean(list(rates.values())) >= 0.9, rates
    with pytest.raises(ValueError, match="goal"):
        expert.act(obs)  # without the episode's goal the expert cannot know the task


def test_collect_records_instructions_and_eval_reports_each_task(cli, tmp_path):
    store, run = tmp_path / "mt10", tmp_path / "run"
    summary = last_json(cli("collect", f"task={MT10}", "episodes=6", "num_envs=2", f"out={store}", check=True))
    assert summary["success_rate"] >= 0.8
    from robopolicy.data import DemoStore

    phrasings = {p for t in multi_task_names("mt10") for p in INSTRUCTIONS[t]}
    assert {e["task"] for e in DemoStore.open(store).episodes} <= phrasings
    cli("train", f"task={MT10}", "policy=flow", "policy.mlp.hidden_dim=32", "policy.mlp.n_blocks=1", f"data={store}",
        f"out={run}", "steps=2", "batch_size=8", "threads=1", "eval.every=0", "eval.episodes=0",
        "eval.final_episodes=0", check=True)
    result = last_json(cli("eval", f"ckpt={run}", "episodes=6", "num_envs=2", "max_episode_steps=3",
                           f"out={tmp_path / 'eval'}", check=True))
    groups = result["per_goal"]["groups"]
    assert groups and all(g.removeprefix("task=") in multi_task_names("mt10") for g in groups)
    assert sum(g["episodes"] for g in groups.values()) == 6
    lo, hi = result["per_goal"]["mean_ci95"]
    assert lo <= result["per_goal"]["mean"] <= hi
    per_episode = json.loads((tmp_path / "eval" / "summary.json").read_text())["per_episode"]
    assert all(e["instruction"] in phrasings for e in per_episode)


def test_a_given_instruction_picks_its_task(env):
    env.reset(seed=0, options={"instruction": "Close the drawer."})
    assert env.goal == {"task": "drawer-close-v3"} and env.instruction == "Close the drawer."
    assert env.unwrapped.goal_from_instruction("push the drawer shut") == {"task": "drawer-close-v3"}
    with pytest.raises(ValueError, match="none of metaworld/mt10"):
        env.reset(seed=0, options={"instruction": "juggle three balls"})


def test_a_store_with_the_old_unnamed_entities_still_trains_and_says_so(cli, tmp_path):
    """Stores collected before the entity names (`hand_x`, `obj1_qw`, ...) hold the same 39 dimensions in the same
    order: appending to one and training on it work, keep the store's names, and say so in one sentence."""
    from robopolicy.data import DemoStore
    from robopolicy.features import features_from_env

    probe = sim.make_env("metaworld/push-v3")
    features = features_from_env(probe.observation_space, probe.action_space, probe.unwrapped.feature_names)
    fps = probe.unwrapped.fps
    probe.close()
    frame = ["hand_x", "hand_y", "hand_z", "gripper"] + [f"obj{i}_{c}" for i in (1, 2) for c in
                                                         ("x", "y", "z", "qw", "qx", "qy", "qz")]
    features["observation.state"]["names"] = frame + [f"prev_{n}" for n in frame] + ["goal_x", "goal_y", "goal_z"]
    store, run = tmp_path / "old", tmp_path / "run"
    DemoStore.create(store, features=features, fps=fps, info={"task": "metaworld/push-v3"})
    proc = cli("collect", "task=metaworld/push-v3", "episodes=2", f"out={store}", check=True)
    assert "names observation.state's dimensions otherwise than metaworld/push-v3" in proc.stderr
    assert "'hand_x' where it has 'hand.x'" in proc.stderr
    assert DemoStore.open(store).features["observation.state"]["names"][0] == "hand_x"
    proc = cli("train", "task=metaworld/push-v3", "policy=flow", "policy.mlp.hidden_dim=32", "policy.mlp.n_blocks=1",
               f"data={store}", f"out={run}", "steps=2", "batch_size=8", "threads=1", "eval.every=0",
               "eval.episodes=0", "eval.final_episodes=0", check=True)
    assert "the vla's state tokens" in proc.stderr
