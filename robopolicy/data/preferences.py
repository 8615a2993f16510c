"""Preference labels of a store's episodes: binary desirability segments and ranked pairs.

The labels live in each episode's metadata, `extra["preference"]`:

    {"segments": [[start, stop, label, kind], ...],   frames [start, stop) of the episode; label +1 / -1
     "group": key or null,                            episodes of one start state (the reset seed) ...
     "score": number or null}                         ... are ranked by score: success first, then return

Segment kinds:
    intervention   the intervener's frames (a human or the scripted expert took over): desirable
    pre_takeover   the policy's frames in the `lookback` before a takeover, what the person stepped in to stop:
                   undesirable
    success        a whole rollout the policy ran alone, by its outcome: desirable ...
    failure        ... or undesirable
Demonstrations (source expert or human) get no labels: they are what behaviour cloning trains on.

Pairs (for Diffusion-DPO): within an intervention episode the intervener's segment beats the segment before its
takeover (the same moment, two ways to go on); across rollouts of one start state a higher score beats a lower one.
The deployment recorder labels episodes as it writes them; `derive_labels` labels any store from its per-frame
`intervention` flags, per-episode success and `extra.seed` (rollouts recorded before labels existed).
numpy only: the robot computer's recorder uses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

LABEL_KEY = "preference"
INTERVENTION_KEY = "intervention"
REWARD_KEY = "next.reward"
DESIRABLE, UNDESIRABLE = 1, -1
KINDS = ("intervention", "pre_takeover", "success", "failure")


def episode_labels(source: str, success: bool | None, *, length: int, intervention: np.ndarray | None = None,
                   lookback: int = 20, group: Any = None, ret: float | None = None) -> dict | None:
    """The labels of one episode (None for a demonstration or an unlabelled rollout). `intervention` [T] bool
    flags the frames a person drove; `lookback` frames before each takeover are the undesirable policy segment."""
    flags = np.zeros(length, dtype=bool) if intervention is None else np.asarray(intervention, bool).reshape(-1)
    if flags.any():
        segments = []
        padded = np.concatenate([[False], flags, [False]]).astype(np.int8)
        starts = np.flatnonzero(np.diff(padded) == 1)
        stops = np.flatnonzero(np.diff(padded) == -1)
        previous_stop = 0
        for start, stop in zip(starts, stops):
            before = max(previous_stop, start - lookback)
            if start > before:
                segments.append([int(before), int(start), UNDESIRABLE, "pre_takeover"])
            segments.append([int(start), int(stop), DESIRABLE, "intervention"])
            previous_stop = int(stop)
        return {"segments": segments, "group": None, "score": None}
    if source in ("expert", "human") or success is None:
        return None
    label, kind = (DESIRABLE, "success") if success else (UNDESIRABLE, "failure")
    score = float(bool(success)) + (0.0 if ret is None else 1e-3 * float(np.tanh(ret / 100.0)))
    return {"segments": [[0, int(length), label, kind]], "group": group, "score": score}


def derive_labels(store, lookback_s: float = 2.0) -> dict[int, dict]:
    """Labels of every episode of a `DemoStore` that has any, from its per-frame flags and metadata."""
    lookback = max(1, round(lookback_s * store.fps))
    starts, ends = store.episode_starts, store.episode_ends
    flags = store.read(INTERVENTION_KEY) if INTERVENTION_KEY in store.features else None
    rewards = store.read(REWARD_KEY) if REWARD_KEY in store.features else None
    labels = {}
    for episode in store.episodes:
        i = episode["index"]
        start, stop = int(starts[i]), int(ends[i])
        extra = episode.get("extra") or {}
        ret = None if rewards is None else float(np.sum(rewards[start:stop]))
        label = episode_labels(episode["source"], episode.get("success"), length=stop - start,
                               intervention=None if flags is None else flags[start:stop], lookback=lookback,
                               group=extra.get("seed"), ret=ret)
        if label is not None:
            labels[i] = label
    return labels


def store_labels(store, lookback_s: float = 2.0) -> tuple[dict[int, dict], bool]:
    """(labels per episode, whether they all came from the store's metadata): the stored labels, and derived ones
    for episodes written without them."""
    stored = {e["index"]: e["extra"][LABEL_KEY] for e in store.episodes
              if isinstance(e.get("extra"), Mapping) and e["extra"].get(LABEL_KEY)}
    derived = {i: v for i, v in derive_labels(store, lookback_s).items() if i not in stored}
    return {**derived, **stored}, not derived


def label_store(store, lookback_s: float = 2.0) -> dict[int, dict]:
    """Write derived labels into the metadata of the episodes that have none (a store open for appending)."""
    labels, complete = store_labels(store, lookback_s)
    if not complete:
        stored = {e["index"] for e in store.episodes if (e.get("extra") or {}).get(LABEL_KEY)}
        store.update_extra({i: {LABEL_KEY: v} for i, v in labels.items() if i not in stored})
    return labels


def preference_pairs(labels: Mapping[int, dict], by_return: bool = False) -> list[dict]:
    """Winner/loser segment pairs, each {"winner": (episode, start, stop), "loser": (...), "kind"}: takeover pairs
    inside intervention episodes and ranked pairs among rollouts of one start state: a success beats a failure;
    with `by_return` a higher return also decides between two rollouts of the same outcome."""
    pairs = []
    groups: dict[Any, list[int]] = {}
    for episode, label in labels.items():
        segments = label["segments"]
        for k, (start, stop, _label, kind) in enumerate(segments):
            if kind == "intervention" and k > 0 and segments[k - 1][3] == "pre_takeover":
                before = segments[k - 1]
                pairs.append({"winner": (episode, start, stop), "loser": (episode, before[0], before[1]),
                              "kind": "takeover"})
        if label.get("group") is not None and label.get("score") is not None:
            groups.setdefault(repr(label["group"]), []).append(episode)
    for members in groups.values():
        for a in members:
            for b in members:
                gap = labels[a]["score"] - labels[b]["score"]
                if gap >= 0.5 or (by_return and gap > 0):
                    win, lose = labels[a]["segments"][0], labels[b]["segments"][0]
                    pairs.append({"winner": (a, win[0], win[1]), "loser": (b, lose[0], lose[1]),
                                  "kind": "same_start"})
    return pairs


def label_counts(labels: Mapping[int, dict]) -> dict[str, Any]:
    """What `robopolicy data info` shows: segments and frames per label and kind, pairs per kind."""
    by_kind = dict.fromkeys(KINDS, 0)
    frames = {"desirable": 0, "undesirable": 0}
    segments = {"desirable": 0, "undesirable": 0}
    for label in labels.values():
        for start, stop, value, kind in label["segments"]:
            name = "desirable" if value == DESIRABLE else "undesirable"
            segments[name] += 1
            frames[name] += int(stop - start)
            by_kind[kind] = by_kind.get(kind, 0) + 1
    pairs: dict[str, int] = {"takeover": 0, "same_start": 0}
    for pair in preference_pairs(labels):
        pairs[pair["kind"]] += 1
    return {"labelled_episodes": len(labels), "segments": segments, "frames": frames, "by_kind": by_kind,
            "pairs": pairs}
