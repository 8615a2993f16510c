"""Quality report on real demonstrations of a built-in task: clean expert episodes rank above sloppy, noisy ones."""

import json

import numpy as np
import pytest

from robopolicy.data import DemoStore, StoreError, validate_store
from robopolicy.data.quality import filter_store, quality_report
from robopolicy.features import features_from_env

TASK = "builtin/push"


def spearman(a, b) -> float:
    """Spearman rank correlation with average ranks for ties."""
    def ranks(x):
        x = np.asarray(x, dtype=float)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for value in np.unique(x):  # ties share their mean rank
            r[x == value] = r[x == value].mean()
        return r
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def auc(scores, positive) -> float:
    """P(score of a random positive > score of a random negative), ties count half."""
    pos, neg = scores[positive][:, None], scores[~positive][None]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def rollout_store(path, task: str, episodes: int, bad: dict, max_steps: int):
    """`episodes` expert episodes rolled out in the real MuJoCo task, even ones clean, odd ones with the expert's
    `bad` options (e.g. sloppy=True, noise=0.3); returns the store path and the clean mask."""
    import sim

    env = sim.make_env(task)
    features = features_from_env(env.observation_space, env.action_space, env.unwrapped.feature_names)
    clean = []
    with DemoStore.create(path, features, fps=env.unwrapped.fps) as store:
        for i in range(episodes):
            is_clean = i % 2 == 0
            expert = sim.make_expert(task, noise=0.0) if is_clean else sim.make_expert(task, **bad)
            obs, _ = env.reset(seed=i)
            expert.reset(i)
            frames = {key: [] for key in features}
            for _ in range(max_steps):
                action = np.asarray(expert.act(obs), dtype=np.float32)
                next_obs, reward, terminated, truncated, info = env.step(action)
                for key, value in obs.items():
                    frames[key].append(value)
                frames["action"].append(action)
                frames["next.reward"].append(reward)
                frames["next.success"].append(info["success"])
                obs = next_obs
                if terminated or truncated:
                    break
            store.append_episode({k: np.asarray(v) for k, v in frames.items()}, task=task.split("/")[-1],
                                 source="expert" if is_clean else "human", success=bool(info["success"]))
            clean.append(is_clean)
    env.close()
    return path, np.array(clean)


@pytest.fixture(scope="module")
def mixed_store(tmp_path_factory):
    """8 clean expert episodes and 8 sloppy, noisy ones (interleaved); 60 steps at most keeps the test fast."""
    return rollout_store(tmp_path_factory.mktemp("quality") / "store", TASK, 16, {"sloppy": True, "noise": 0.3}, 60)


def test_slow_sloppy_demonstrations_rank_below_clean_ones(tmp_path):
    """Sloppy without noise: slower, pausing, wandering but smooth (lower jerk than the expert's). The duration
    factor is what ranks them: successful episodes that took longer than the store's median are down-weighted."""
    path, clean = rollout_store(tmp_path / "store", "builtin/pick_place", 16, {"sloppy": True}, 150)
    quality_report(path, tmp_path / "report")
    rows = json.loads((tmp_path / "report" / "report.json").read_text())["episodes"]
    weights = np.array([row["quality"] for row in rows])
    length = np.array([row["length"] for row in rows])
    assert np.median(length[~clean]) > np.median(length[clean])
    area = auc(weights, clean)
    print(f"AUC(quality, clean) = {area:.3f}, Spearman = {spearman(weights, clean):.3f}")
    assert area > 0.8


def test_clean_episodes_rank_above_noisy_ones(mixed_store, tmp_path):
    path, clean = mixed_store
    summary = quality_report(path, tmp_path / "report")
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    weights = np.array([row["quality"] for row in report["episodes"]])
    rho = spearman(weights, clean)
    print(f"Spearman(quality, clean) = {rho:.3f}")
    assert rho > 0.5
    assert np.all((weights > 0) & (weights <= 1))
    jerk = np.array([row["jerk"] for row in report["episodes"]])
    divergence = np.array([row["action_divergence"] for row in report["episodes"]])
    assert jerk[clean].mean() < jerk[~clean].mean()
    assert divergence[clean].mean() < divergence[~clean].mean()
    assert set(summary["sources"]) == {"expert", "human"}
    assert summary["sources"]["expert"]["mean_quality"] > summary["sources"]["human"]["mean_quality"]
    assert (tmp_path / "report" / "report.png").stat().st_size > 10_000
    with DemoStore.open(path) as store:  # weights were written to the store
        np.testing.assert_allclose([ep["quality"] for ep in store.episodes], weights)


def test_filter_keeps_the_high_quality_episodes(mixed_store, tmp_path):
    path, clean = mixed_store
    quality_report(path, tmp_path / "report")
    with DemoStore.open(path) as store:
        weights = np.array([ep["quality"] for ep in store.episodes])
    threshold = float(np.median(weights))
    summary = filter_store(path, tmp_path / "filtered", min_quality=threshold)
    kept = np.flatnonzero(weights >= threshold)
    assert summary["kept_episodes"] == kept.tolist()
    assert clean[kept].mean() > 0.5  # mostly the clean ones
    assert validate_store(tmp_path / "filtered") == []
    with DemoStore.open(path) as source, DemoStore.open(tmp_path / "filtered") as out:
        assert out.features == source.features and out.fps == source.fps
        first = out.get_episode(0)
        original = source.get_episode(int(kept[0]))
        for key in source.features:
            np.testing.assert_array_equal(first[key], original[key])
        assert out.episodes[0]["task"] == "push" and out.episodes[0]["extra"]["source_episode"] == kept[0]
    with pytest.raises(StoreError, match="no episode has quality >= 2"):
        filter_store(path, tmp_path / "none", min_quality=2.0)
