"""Data-quality report of a demonstration store, a quality weight per episode, and filtering by that weight.

Per episode (states and actions z-scored with the whole store's mean / std first):
    jerk                  mean norm of the third difference of actions (shaky, noisy teleoperation is high)
    idle_fraction         share of steps whose state change is below 10% of the store's median step (pauses)
    action_divergence     RMS error of a k-nearest-neighbour regression state -> action fitted on the OTHER
                          episodes, averaged over the episode (actions unlike what the rest of the data does in
                          similar states: detours, noise, a different strategy)
    transition_diversity  spread (RMS) of next-state changes among the k nearest (state, action) pairs of other
                          episodes: how predictable the outcomes around this episode are. It describes the
                          environment and coverage more than the demonstrator, so it is reported, not weighted.
    length                frames; for an episode not marked failed, the time it took to do the task. Slow,
                          hesitant, wandering demonstrations (a sloppy teleoperator) take longer than the store's
                          typical one although each of their steps looks smooth (their jerk is often LOWER).
Quality weight in (0, 1], each factor 1 for an episode at or better than the store's median:
    w = s * (1 - idle_fraction) * min(1, median_jerk / jerk) ** 0.5 * min(1, median_divergence / divergence)
          * d,  d = min(1, median_length / length) for an episode not marked failed (median over those), else 1
    s = 0.25 for an episode marked failed, else 1; w is clipped to [0.01, 1].
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from robopolicy.data.spec import ACTION_KEY, STATE_KEY
from robopolicy.data.store import DemoStore, StoreError, staged_store

K_NEIGHBOURS = 5
MAX_REFERENCE_FRAMES = 20_000  # kNN reference set cap (random subset) so the report stays fast on big stores
IDLE_RATIO = 0.1
FAILED_FACTOR, JERK_POWER, MIN_WEIGHT = 0.25, 0.5, 0.01
MEASURES = ("length", "jerk", "idle_fraction", "action_divergence", "transition_diversity", "quality")


def quality_report(store_path: str | os.PathLike, out_dir: str | os.PathLike, *, write_weights: bool = True) -> dict:
    """Measure every episode, write `report.json` and `report.png` in `out_dir`, and (by default) store the
    weights in the store with `set_quality`. Returns a summary (per-source means, file paths)."""
    out_dir = Path(out_dir)
    with DemoStore.open(store_path, "a" if write_weights else "r") as store:
        if store.num_episodes == 0:
            raise StoreError(f"{store.path} holds no episodes; there is nothing to report on.")
        if ACTION_KEY not in store.features:
            raise StoreError(f"{store.path} has no {ACTION_KEY!r} feature; the quality measures need actions.")
        episodes = store.episodes
        rows = _measure(store)
        for row, episode in zip(rows, episodes):
            row.update(index=episode["index"], source=episode["source"], task=episode["task"],
                       success=episode["success"])
        _add_weights(rows)
        if write_weights:
            store.set_quality([row["quality"] for row in rows])
    sources = _per_source(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"store": str(store_path), "episodes": rows, "sources": sources, "weights_written": write_weights,
              "formula": __doc__.split("Quality weight", 1)[1].strip(), "k_neighbours": K_NEIGHBOURS}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    _plot(rows, out_dir / "report.png")
    weights = np.array([row["quality"] for row in rows])
    return {"store": str(store_path), "episodes": len(rows), "sources": sources,
            "quality": {"min": float(weights.min()), "median": float(np.median(weights)),
                        "max": float(weights.max())},
            "weights_written": write_weights, "report": str(out_dir / "report.json"), "plot": str(out_dir / "report.png")}


def filter_store(store_path: str | os.PathLike, out_store: str | os.PathLike, *, min_quality: float,
                 overwrite: bool = False) -> dict:
    """Copy the episodes whose quality weight is >= `min_quality` into a new store (features, tasks, metadata kept)."""
    if Path(store_path).resolve() == Path(out_store).resolve():
        raise StoreError(f"{out_store} is the source store; write the filtered copy somewhere else.")
    with DemoStore.open(store_path, "r") as source:
        keep = [ep for ep in source.episodes if ep["quality"] >= min_quality]
        if not keep:
            best = max((ep["quality"] for ep in source.episodes), default=None)
            raise StoreError(f"{source.path}: no episode has quality >= {min_quality} (best is {best}); "
                             "lower min_quality or run the quality report first.")
        info = {**source.info, "filtered_from": {"store": str(source.path.resolve()), "min_quality": min_quality}}
        with staged_store(out_store, source.features, source.fps, overwrite=overwrite, info=info) as out:
            for ep in keep:
                out.append_episode(source.get_episode(ep["index"]), task=ep["task"], source=ep["source"],
                                   success=ep["success"], quality=ep["quality"],
                                   extra={**ep["extra"], "source_episode": ep["index"]})
            out.compute_stats()
        frames = sum(ep["length"] for ep in keep)
        total = source.num_episodes
    return {"store": str(out_store), "episodes": len(keep), "dropped": total - len(keep), "frames": frames,
            "min_quality": min_quality, "kept_episodes": [ep["index"] for ep in keep]}


# ------------------------------------------------------------------------------------------- measures
def _zscore(values: np.ndarray) -> np.ndarray:
    values = values.reshape(len(values), -1).astype(np.float64)
    std = values.std(0)
    return (values - values.mean(0)) / np.where(std > 1e-8, std, 1.0)


def _measure(store: DemoStore) -> list[dict]:
    actions = _zscore(store.read(ACTION_KEY))  # [N, A]
    states = _zscore(store.read(STATE_KEY)) if STATE_KEY in store.features else None
    starts, ends = store.episode_starts, store.episode_ends
    episode_of = np.repeat(np.arange(store.num_episodes), ends - starts)  # [N]
    # steps t -> t+1 inside an episode
    has_next = np.ones(len(actions), dtype=bool)
    has_next[ends - 1] = False
    rows = [{"length": int(e - s)} for s, e in zip(starts, ends)]
    for row, s, e in zip(rows, starts, ends):
        third = np.diff(actions[s:e], n=3, axis=0)
        row["jerk"] = float(np.linalg.norm(third, axis=1).mean()) if len(third) else 0.0

    if states is None:  # image-only stores: no state to measure motion or neighbourhoods in
        for row in rows:
            row.update(idle_fraction=None, action_divergence=None, transition_diversity=None)
        return rows
    step = np.linalg.norm(states[1:] - states[:-1], axis=1)  # [N-1], step[t] = |s[t+1] - s[t]|
    inside = has_next[:-1]
    idle_threshold = IDLE_RATIO * np.median(step[inside]) if inside.any() else 0.0
    for row, s, e in zip(rows, starts, ends):
        steps = step[s:e - 1]
        row["idle_fraction"] = float((steps < idle_threshold).mean()) if len(steps) else 0.0

    rng = np.random.default_rng(0)
    # action divergence: kNN regression state -> action on other episodes
    neighbours = _knn(states, episode_of, rng)
    if neighbours is None:
        divergence = np.full(len(states), np.nan)
    else:
        predicted = actions[neighbours].mean(1)  # [N, k, A] -> [N, A]
        divergence = np.sqrt(((actions - predicted) ** 2).mean(1))
    # transition diversity: spread of next-state changes among similar (state, action) pairs
    pairs = np.flatnonzero(has_next)
    delta = np.zeros_like(states)
    delta[pairs] = states[pairs + 1] - states[pairs]
    joint = np.concatenate([states, actions], axis=1)
    pair_neighbours = _knn(joint[pairs], episode_of[pairs], rng)
    diversity = np.full(len(states), np.nan)
    if pair_neighbours is not None:
        outcomes = delta[pairs][pair_neighbours]  # [P, k, D]
        spread = np.sqrt(((outcomes - outcomes.mean(1, keepdims=True)) ** 2).sum(2).mean(1) / states.shape[1])
        diversity[pairs] = spread
    for row, s, e in zip(rows, starts, ends):
        row["action_divergence"] = _mean_or_none(divergence[s:e])
        row["transition_diversity"] = _mean_or_none(diversity[s:e])
    return rows


def _knn(points: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """Indices (into `points`) of each point's k nearest neighbours from OTHER groups (episodes); None when
    there is no other episode. Brute force in chunks: squared distances via |q|^2 + |r|^2 - 2 q.r."""
    if len(np.unique(groups)) < 2:
        return None
    reference = np.arange(len(points))
    if len(reference) > MAX_REFERENCE_FRAMES:
        reference = np.sort(rng.choice(reference, MAX_REFERENCE_FRAMES, replace=False))
    ref_points, ref_groups = points[reference], groups[reference]
    ref_norms = (ref_points**2).sum(1)
    k = min(K_NEIGHBOURS, len(reference) - 1)
    out = np.empty((len(points), k), dtype=np.int64)
    for start in range(0, len(points), 1024):
        query = points[start:start + 1024]
        distance = (query**2).sum(1)[:, None] + ref_norms[None] - 2 * query @ ref_points.T  # [q, r]
        distance[groups[start:start + 1024, None] == ref_groups[None]] = np.inf
        nearest = np.argpartition(distance, k - 1, axis=1)[:, :k]
        out[start:start + 1024] = reference[nearest]
    return out


def _mean_or_none(values: np.ndarray) -> float | None:
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else None


def _add_weights(rows: list[dict]) -> None:
    medians = {}
    for name in ("jerk", "action_divergence"):
        values = [row[name] for row in rows if row[name] is not None]
        medians[name] = float(np.median(values)) if values else None
    # duration: compared among the episodes that finished the task (a failed one ran to the time limit)
    finished = [row["length"] for row in rows if row["success"] is not False]
    median_length = float(np.median(finished)) if finished else None
    for row in rows:
        weight = FAILED_FACTOR if row["success"] is False else 1.0
        if row["success"] is not False and median_length is not None and row["length"] > median_length:
            weight *= median_length / row["length"]
        if row["idle_fraction"] is not None:
            weight *= 1.0 - row["idle_fraction"]
        for name, power in (("jerk", JERK_POWER), ("action_divergence", 1.0)):
            value, median = row[name], medians[name]
            if value is not None and median is not None and value > median > 0:
                weight *= (median / value) ** power
        row["quality"] = float(np.clip(weight, MIN_WEIGHT, 1.0))


def _per_source(rows: list[dict]) -> dict:
    sources = {}
    for source in sorted({row["source"] for row in rows}):
        group = [row for row in rows if row["source"] == source]
        known = [row["success"] for row in group if row["success"] is not None]
        summary = {"episodes": len(group), "frames": sum(row["length"] for row in group),
                   "success_rate": float(np.mean(known)) if known else None}
        for name in MEASURES[1:]:
            values = [row[name] for row in group if row[name] is not None]
            summary[f"mean_{name}"] = float(np.mean(values)) if values else None
        sources[source] = summary
    return sources


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = sorted({row["source"] for row in rows})
    colours = {source: f"C{i}" for i, source in enumerate(sources)}
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    index = [row["index"] for row in rows]
    for ax, name in zip(axes.flat, MEASURES):
        values = [np.nan if row[name] is None else row[name] for row in rows]
        ax.bar(index, values, color=[colours[row["source"]] for row in rows])
        failed = [i for i, row in zip(index, rows) if row["success"] is False]
        if failed:
            ax.plot(failed, [0] * len(failed), "kx", label="failed")
        ax.set_title(name.replace("_", " "))
        ax.set_xlabel("episode")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[s]) for s in sources]
    fig.legend(handles, sources, loc="upper right", title="source")
    fig.suptitle("Demonstration quality per episode")
    fig.savefig(path, dpi=80)
    plt.close(fig)
