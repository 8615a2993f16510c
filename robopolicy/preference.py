"""Refinement from preferences and interventions, offline from stores: `apo`, `dpo` and `hg_dagger`.

    robopolicy finetune algo=apo ckpt=BASE algo.data=[runs/deploy/episodes] out=RUN

The data are stores whose episodes carry preference labels (robopolicy/data/preferences.py): deployment
recordings with interventions (the intervener's segments desirable, the policy's before each takeover
undesirable) and rollouts labelled by outcome (pairs: rollouts of one start state ranked by outcome and return).
Each method fine-tunes the base policy's own weights (flow or diffusion: anything declaring `denoising`) and
writes a plain checkpoint: no base is needed to load or deploy it.

    apo        KTO-style binary desirability with APO's adaptive reweighting (Xia et al. 2025, "Human-assisted
               robotic policy refinement via action preference optimization"). The implicit reward of a sample is
               the Diffusion-KTO surrogate of log pi/pi_ref: r = err_ref - err_policy, the drop of its denoising
               error against the frozen reference under the same noise and time. Value: lambda * sigmoid(beta (r -
               z0)) for desirable samples, lambda * sigmoid(beta (z0 - r)) for undesirable ones, z0 the batch's
               mean reward clipped at 0 (KTO's KL reference point, not differentiated). APO's adaptive weights
               (algo.adaptive=true): w_i = l_i / mean(l) from the policy's own regression error l_i, lambda_D = 1 -
               exp(-eta_D w) and lambda_U = exp(-eta_U w): desirable actions the policy does not reproduce yet weigh
               more, undesirable ones it is already far from weigh less. By default adaptive on recordings with
               takeovers, KTO's even weights on rollouts labelled whole by outcome (ApoConfig.adaptive).
    dpo        Diffusion-DPO (Wallace et al. 2023) for flow and diffusion heads: winner and loser share the noise
               and the time, loss -log sigmoid(beta ((err_ref_w - err_w) - (err_ref_l - err_l))), plus the
               winners' denoising loss weighted on the order of beta (DPO with an NLL term, as RPO), which keeps
               the policy on its data at the base's own learning rate.
    hg_dagger  HG-DAgger's update (Kelly et al. 2019): behaviour cloning on the intervened segments (only the
               intervener's actions count, the rest of each window is masked).
All three mix the base's own demonstrations into every batch (`demos_fraction`; desirable for apo, behaviour
cloning for dpo and hg_dagger): trained on recoveries and failures alone, a policy forgets its ordinary behaviour.

Why these run as `robopolicy finetune algo=...` and not as a command of their own: a user refines a base
checkpoint with a method named by `algo=`, online or offline, and reads the same summary (base and final success
on the same unseen seeds, the refined checkpoint); only the data differ (stores instead of a simulator), so
`finetune` dispatches the offline methods here. The optimizer, schedule and EMA are train.py's.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from robopolicy.checkpoint import point_last, save_checkpoint
from robopolicy.config import register_config, setting, to_dict
from robopolicy.data import DemoStore, WindowDataset
from robopolicy.data.preferences import DESIRABLE, preference_pairs, store_labels
from robopolicy.data.spec import feature_problems
from robopolicy.evaluate import EVAL_SEED, evaluate
from robopolicy.loading import load_policy
from robopolicy.train import EMA, OptimConfig, make_optimizer, optimizer_settings, select_episodes

HELD_KEY = "action.held"  # deployment recordings: the frames where the robot held for want of an action
OBS_TIME_KEY, COMMAND_TIME_KEY = "timing.obs_timestamp", "timing.command_time"  # deployment recordings: per tick


def applied_frames(store: DemoStore) -> np.ndarray | None:
    """Per frame of a deployment recording, the frame whose command the robot was executing when that frame's
    observation was captured: the last command sent at or before the capture time (the first of the episode for
    frames captured before any). None for stores without the timing columns (collected demonstrations, rollouts),
    whose action already belongs to their observation.

    A recording frame is a control tick: the latest observation and the command sent at that tick, which the robot
    meets later (the simulated arm samples it at its next servo tick, half a tick on, as it captures the next
    frame). Paired as recorded, an observation carried the command sent 1-2 ticks after the one that moved it on
    (half a task step to one ahead; of the policy's commands, the interpolated ones the arm never sampled), so the
    intervener's labels were taught one step early and the policy's own segments shifted likewise."""
    if OBS_TIME_KEY not in store.features or COMMAND_TIME_KEY not in store.features:
        return None
    captured, sent = store.read(OBS_TIME_KEY)[:, 0], store.read(COMMAND_TIME_KEY)[:, 0]
    applied = np.arange(len(captured))
    for start, end in zip(store.episode_starts, store.episode_ends):
        start, end = int(start), int(end)
        last = np.searchsorted(sent[start:end], captured[start:end], side="right") - 1
        applied[start:end] = start + np.maximum(last, 0)
    return applied

# ================================================================================================ configs


@dataclass
class OfflineAlgoConfig:
    """Settings every offline refinement shares (configs/algo/<name>.yaml)."""

    name: str = setting("", "the method")
    data: list[str] = setting([], "stores of labelled episodes: deployment recordings (<deploy out>/episodes), "
                                  "rollouts labelled by success")
    steps: int = setting(1000, "gradient steps")
    batch_size: int = setting(128, "windows per step (dpo: pairs)")
    lookback_s: float = setting(2.0, "seconds of policy frames before a takeover labelled undesirable (episodes "
                                     "recorded without labels)")
    action_fps: int | None = setting(None, "the rate of the policy's actions; null: the fps of the store the base "
                                           "was trained on (a store at k times that rate is read every k-th frame)")
    kinds: list[str] | None = setting(None, "label kinds trained on (intervention, pre_takeover, success, failure); "
                                            "null: all")
    demos: str | None = setting(None, "the original demonstrations, mixed in as desirable data (all their "
                                      "successful episodes); null: the episodes the base was trained on (its store "
                                      "and max_episodes)")
    demos_fraction: float = setting(0.25, "share of each batch drawn from the demonstrations (anchors the policy "
                                          "to its data while the labelled segments move it; 0: none)")
    optim: OptimConfig = setting(OptimConfig(lr=1.0e-4, warmup_steps=50),
                                 "AdamW, warmup + cosine, EMA (train.py's); nulls: the policy config's")
    # refit on the same loop recordings: apo 0.89 [0.81, 0.94] and hg_dagger 0.86 with 3; 0.79 and 0.84 without
    state_bound: float | None = setting(3.0, "clamp of the refined policy's normalized low-dim observations to [-b, "
                                             "b] (policy normalization.state_bound, saved with it); null: the base's")

    def __post_init__(self) -> None:
        if self.state_bound is not None and self.state_bound <= 0:
            raise PreferenceError(f"algo.state_bound={self.state_bound} must be positive, or null (the base's).")


@register_config("algo", "apo")
@dataclass
class ApoConfig(OfflineAlgoConfig):
    name: str = setting("apo", "the method")
    steps: int = setting(2000, "gradient steps")
    # the base's rate, as hg_dagger: on the offline line apo at 3e-4 reached 0.40 from a 0.41 base, at the flow
    # base's 1e-3 0.57 [0.47, 0.66]
    optim: OptimConfig = setting(OptimConfig(lr=None, warmup_steps=50),
                                 "AdamW, warmup + cosine, EMA (train.py's); nulls: the base's training settings "
                                 "(its train optim, else its policy config's)")
    kinds: list[str] | None = setting(None, "label kinds trained on (intervention, pre_takeover, success, failure); "
                                            "null: intervention and pre_takeover where the stores hold takeovers, "
                                            "every kind otherwise (default_kinds)")
    beta: float = setting(100.0, "temperature of the implicit reward (the denoising error drop, per element)")
    # null: APO's adaptive weights on recordings with takeovers (the setting APO was made for: a short segment of
    # the policy's own mistake before each takeover), KTO's even weights on rollouts labelled whole by outcome.
    # Measured on the same data (100 episodes): the preference loop's rounds 1-2 recordings 0.87 [0.79, 0.92]
    # adaptive, 0.73 [0.64, 0.81] even; offline from 200 success-labelled rollouts (benchmarks/preference_offline.py,
    # seeds 0 / 1) the pick_place 15-demo base 0.40 -> 0.58 / 0.54 even, 0.51 adaptive (0.56 / 0.53 at eta_D 2,
    # eta_U 0.5; 0.56 rescaled to mean weight 1), builtin/push 6-demo 0.28 -> 0.41 / 0.39 even, 0.27 / 0.24 / 0.25
    # adaptive: there most windows of a failed rollout are ordinary motion the policy reproduces, and the adaptive
    # weights push hardest on exactly those.
    adaptive: bool | None = setting(None, "APO's adaptive weights from the policy's per-sample error (lambda_D = 1 - "
                                          "exp(-eta_D w), lambda_U = exp(-eta_U w)); false: KTO's even weights "
                                          "(eta_desirable, eta_undesirable); null: adaptive where the stores hold "
                                          "takeovers, even otherwise")
    eta_desirable: float = setting(1.0, "lambda_D = 1 - exp(-eta_D w) (adaptive); KTO's lambda_D otherwise")
    eta_undesirable: float = setting(1.0, "lambda_U = exp(-eta_U w) (adaptive); KTO's lambda_U otherwise")
    bc_weight: float = setting(1.0, "plus this times the denoising loss on desirable samples (keeps the policy on "
                                    "the data while the preference term pushes)")
    # 0.9, not KTO's balance: a failed rollout is labelled as a whole, and most of its frames do what a success's do,
    # so an even share pushes the policy off its ordinary behaviour. Offline from 200 success-labelled rollouts
    # (benchmarks/preference_offline.py, 100 episodes, seeds 0 / 1 / 2 where run), share 0.5 / 0.8 / 0.9:
    #   pick_place, 15-demo flow base 0.40:  0.46 / 0.58, 0.55 / 0.53, 0.49, 0.51
    #   pick_place, sloppy flow base 0.56:   0.40, 0.37 / 0.81, 0.75, 0.79 / 0.79
    #   pick_place, 15-demo diffusion 0.42:  - / 0.63 / 0.62
    #   push, 6-demo flow base 0.39:         - / 0.30, 0.29 / 0.52, 0.50
    # 0.9 is the one share that improved every base (0.8 lost 9-10 points on push). Refits on the preference loop's
    # recordings (takeovers), rounds 1-3, at 0.5 / 0.8 / 0.9: one loop's 0.89 / 0.88 / 0.91, another's - / 0.92 / 0.85
    desirable_fraction: float | None = setting(0.9, "share of desirable windows per batch (failures are labelled "
                                                    "whole and run long); null: as they come in the data")


@register_config("algo", "dpo")
@dataclass
class DpoConfig(OfflineAlgoConfig):
    name: str = setting("dpo", "the method")
    batch_size: int = setting(64, "pairs per step")
    beta: float = setting(300.0, "Diffusion-DPO's temperature (beta T w(t) folded into one number)")
    steps: int = setting(2000, "gradient steps")
    # outcome by default: rollouts of one start state rarely differ in outcome (7 of 100 starts of the 15-demo base,
    # 32 of the sloppy one), and two attempts from one start compared frame by frame are near-duplicates whose
    # difference the loss amplifies (aligned from the start: 0.56 -> 0.18)
    pairs: str = setting("outcome", "ranked: takeover pairs and same-start pairs, a success over a failure | "
                                    "return: also same-outcome pairs by return | outcome: also any desirable "
                                    "segment against any undesirable one (rollouts of different starts)",
                         choices=("ranked", "return", "outcome"))
    optim: OptimConfig = setting(OptimConfig(lr=None, warmup_steps=50),
                                 "AdamW, warmup + cosine, EMA (train.py's); nulls: the base's training settings "
                                 "(its train optim, else its policy config's)")
    # The DPO term's gradient is about beta/2 times the denoising loss's, so at bc_weight 1 it alone moves the
    # weights: at 1e-4..1e-3 it wrecked the policy (0.56 -> 0.03-0.34); 1e-5 kept it near its base (0.51-0.65).
    # Weighted on the order of beta, the winners' loss anchors the policy at the base's rate. Offline, 200 rollouts
    # (pairs outcome, 2000 steps, 100 episodes): 15-demo base 0.40 -> 0.58 at bc_weight 150, 0.48 with the DPO term
    # off (beta 0.001); sloppy base 0.56 -> 0.74 (150) / 0.76 (500), 0.76 with it off
    bc_weight: float = setting(150.0, "plus this times the denoising loss on the winners and the demonstrations "
                                      "(of the order of beta)")


@register_config("algo", "hg_dagger")
@dataclass
class HgDaggerConfig(OfflineAlgoConfig):
    name: str = setting("hg_dagger", "the method")
    # behaviour cloning, so the base's own recipe: at the fine-tuning rate (1e-4 for 1000 steps, a tenth of the flow
    # base's 1e-3) the ~900 intervened windows of a round hardly moved the policy (0.39 from a 0.40 base; the
    # demonstrations alone 0.37); at the base's rate and steps, 0.65 [0.55, 0.74] on the same recording
    steps: int = setting(2000, "gradient steps (the base's own training ran 2000)")
    optim: OptimConfig = setting(OptimConfig(lr=None, warmup_steps=100),
                                 "AdamW, warmup + cosine, EMA (train.py's); nulls: the base's training settings "
                                 "(its train optim, else its policy config's)")
    kinds: list[str] | None = setting(["intervention"], "label kinds trained on: the intervener's segments")
    demos_fraction: float = setting(0.5, "share of each batch drawn from the demonstrations (the rest: the "
                                         "intervened segments)")


OFFLINE_ALGOS = {"apo": ApoConfig, "dpo": DpoConfig, "hg_dagger": HgDaggerConfig}


class PreferenceError(ValueError):
    """Offline refinement that cannot run as asked (one sentence naming the store or setting)."""


# ================================================================================================ losses


def implicit_reward(error: torch.Tensor, ref_error: torch.Tensor) -> torch.Tensor:
    """Diffusion surrogate of log pi(a|o) / pi_ref(a|o) per sample [B]: how much lower the policy's denoising
    error is than the reference's under the same noise and time (0 when the policy is the reference)."""
    return ref_error - error


def dpo_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             beta: float) -> torch.Tensor:
    """Diffusion-DPO per pair [B]: -log sigmoid(beta (r_w - r_l)); log 2 and no gradient when winner = loser."""
    margin = implicit_reward(err_w, ref_w) - implicit_reward(err_l, ref_l)
    return -F.logsigmoid(beta * margin)


def apo_weights(error: torch.Tensor, desirable: torch.Tensor, eta_d: float, eta_u: float) -> torch.Tensor:
    """APO's adaptive lambda per sample from the policy's own error l_i (not differentiated): w = l / mean(l),
    lambda_D = 1 - exp(-eta_D w), lambda_U = exp(-eta_U w)."""
    w = (error / error.mean().clamp_min(1e-12)).detach()
    return torch.where(desirable, 1.0 - torch.exp(-eta_d * w), torch.exp(-eta_u * w))


def kto_loss(reward: torch.Tensor, desirable: torch.Tensor, weight: torch.Tensor, beta: float) -> torch.Tensor:
    """KTO per sample [B]: lambda - v with v = lambda sigmoid(beta (r - z0)) (desirable) or lambda sigmoid(beta
    (z0 - r)) (undesirable); z0 = the batch's mean reward clipped at 0, KTO's reference point, not differentiated."""
    z0 = reward.mean().clamp_min(0.0).detach()
    value = torch.where(desirable, torch.sigmoid(beta * (reward - z0)), torch.sigmoid(beta * (z0 - reward)))
    return weight * (1.0 - value)


# ================================================================================================ data

TAKEOVER_KINDS = ("intervention", "pre_takeover")


def default_kinds(paths: list[str], lookback_s: float, takeovers: bool | None = None) -> list[str] | None:
    """The label kinds apo trains on when `kinds` is null: where the stores hold takeovers, a person's signal
    alone (the intervener's segments and the policy's before each takeover); otherwise every kind (rollouts labelled
    by outcome). In deployment recordings the policy's own unassisted successes are labelled desirable too, but they
    only repeat what the policy already does: on the preference loop's three rounds apo trained on every kind scored
    0.74 [0.65, 0.82], on the takeover kinds alone 0.90 [0.83, 0.94] (same recordings, 100 episodes)."""
    if takeovers is None:  # `takeovers`: has_takeovers(paths, lookback_s) when the caller already knows it
        takeovers = has_takeovers(paths, lookback_s)
    return list(TAKEOVER_KINDS) if takeovers else None


def has_takeovers(paths: list[str], lookback_s: float) -> bool:
    """Whether any of the stores holds an intervener's segment (a deployment recording with takeovers)."""
    for path in paths:
        labels, _ = store_labels(_open(path), lookback_s)
        if any(segment[3] == "intervention" for episode in labels.values() for segment in episode["segments"]):
            return True
    return False


class LabelledWindows:
    """Training windows of the labelled segments of several stores. A window's actions outside its segment are
    masked (padding), so a segment's loss covers exactly the frames its label speaks for."""

    def __init__(self, paths: list[str], policy, action_fps: int, lookback_s: float, *, kinds=None,
                 only_success: bool = False, episodes: list[int] | None = None):
        self.datasets: list[WindowDataset] = []
        rows = []  # per window: dataset, item, label, segment id, segment [start, stop) in store frames
        self.labels: list[dict[int, dict]] = []
        self.held: list[np.ndarray | None] = []
        self.applied: list[np.ndarray | None] = []
        self.segments: dict[tuple[int, int, int, int], int] = {}  # (dataset, episode, start, stop) -> segment id
        keys = [k for k in policy.features if k.startswith("observation.")] + ["action"]
        self.kinds = kinds
        for d, path in enumerate(paths):
            store = _open(path)
            problems = feature_problems({k: policy.features[k] for k in keys}, store.features, extra_ok=True)
            if problems:
                raise PreferenceError(f"{path} does not record what the policy uses: {'; '.join(problems)}.")
            stride = store.fps // action_fps if store.fps % action_fps == 0 else 0
            if stride < 1:
                raise PreferenceError(f"{path} is recorded at {store.fps} fps, not a multiple of the policy's "
                                      f"{action_fps}; pass algo.action_fps=... if that is not the policy's rate.")
            if only_success:  # demonstrations: every successful episode (of `episodes`) is one desirable segment
                labels = {e["index"]: {"segments": [[0, e["length"], DESIRABLE, "demonstration"]]}
                          for e in store.episodes if e.get("success") and (episodes is None or e["index"] in episodes)}
            else:
                labels, _ = store_labels(store, lookback_s)
                if kinds is not None:
                    labels = {i: {**v, "segments": [s for s in v["segments"] if s[3] in kinds]}
                              for i, v in labels.items()}
                    labels = {i: v for i, v in labels.items() if v["segments"]}
            self.labels.append(labels)
            # a deployment's hold ticks (waiting for a chunk) are no one's action: masked like padding
            self.held.append(store.read(HELD_KEY)[:, 0] if HELD_KEY in store.features else None)
            # a deployment's observation paired with the command in force when it was captured
            self.applied.append(applied_frames(store))
            dataset = WindowDataset(store, policy.n_obs_steps, policy.horizon, keys=keys, episodes=sorted(labels),
                                    frame_stride=stride)
            self.datasets.append(dataset)
            starts = store.episode_starts
            for item in range(len(dataset)):
                episode = int(dataset.item_episode[item])
                frame = int(dataset.item_frame[item]) - int(starts[episode])
                for start, stop, label, _kind in labels[episode]["segments"]:
                    if start <= frame < stop:
                        seg = self.segments.setdefault((d, episode, start, stop), len(self.segments))
                        rows.append((d, item, label, seg, starts[episode] + start, starts[episode] + stop))
                        break
        if not rows:
            raise PreferenceError(f"{', '.join(paths)} hold no labelled segments of the kinds this method uses "
                                  f"({', '.join(kinds) if kinds else 'any'}); record deployments with interventions "
                                  "or rollouts with success labels.")
        self.rows = np.asarray(rows, dtype=np.int64)  # [N, 6]
        self.desirable = self.rows[:, 2] == DESIRABLE
        order = np.argsort(self.rows[:, 3], kind="stable")
        self.segment_windows = np.split(order, np.flatnonzero(np.diff(self.rows[order, 3])) + 1)

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Windows of these rows, stacked, with `action_is_pad` marking actions outside each window's segment."""
        parts: dict[str, list] = {}
        order = []
        for d, dataset in enumerate(self.datasets):
            mine = np.flatnonzero(self.rows[rows, 0] == d)
            if not len(mine):
                continue
            picked = self.rows[rows[mine]]
            windows = dataset.get_batch(picked[:, 1])
            anchor = dataset.item_frame[picked[:, 1]][:, None]
            frames = anchor + dataset.frame_stride * np.arange(1 - dataset.n_obs_steps,
                                                                1 - dataset.n_obs_steps + dataset.horizon)
            if self.applied[d] is not None:  # the command each observation met, not the one sent at its tick
                first, last = dataset.item_start[picked[:, 1]][:, None], dataset.item_end[picked[:, 1]][:, None] - 1
                frames = self.applied[d][np.clip(frames, first, last)]
                windows["action"] = dataset.lowdim["action"][frames]
            outside = (frames < picked[:, 4:5]) | (frames >= picked[:, 5:6])
            if self.held[d] is not None:
                outside |= self.held[d][np.clip(frames, 0, len(self.held[d]) - 1)]
            windows["action_is_pad"] = windows["action_is_pad"] | outside
            for key, value in windows.items():
                parts.setdefault(key, []).append(value)
            order.append(mine)
        inverse = np.argsort(np.concatenate(order))
        return {k: torch.from_numpy(np.concatenate(v)[inverse]) for k, v in parts.items()}

    def sample_rows(self, rng: np.random.Generator, n: int, desirable_fraction: float | None) -> np.ndarray:
        """n windows at random; with `desirable_fraction`, that share desirable (when both labels exist)."""
        good, bad = np.flatnonzero(self.desirable), np.flatnonzero(~self.desirable)
        if desirable_fraction is None or not len(good) or not len(bad):
            return rng.integers(0, len(self), n)
        n_good = int(round(n * desirable_fraction))
        return np.concatenate([rng.choice(good, n_good), rng.choice(bad, n - n_good)])

    def pairs(self, mode: str) -> list[tuple[int, int]]:
        """(winner segment, loser segment) ids: the stores' takeover and same-start pairs; with mode "outcome"
        also every desirable segment against every undesirable one."""
        found = []
        for d, labels in enumerate(self.labels):
            for pair in preference_pairs(labels, by_return=mode == "return"):
                w, lo = (d, *pair["winner"]), (d, *pair["loser"])
                if w in self.segments and lo in self.segments:
                    found.append((self.segments[w], self.segments[lo]))
        if mode == "outcome":
            label_of = {seg: self.rows[self.rows[:, 3] == seg][0, 2] for seg in self.segments.values()}
            good = [s for s, v in label_of.items() if v == DESIRABLE]
            bad = [s for s, v in label_of.items() if v != DESIRABLE]
            found = sorted(set(found) | {(g, b) for g in good for b in bad})
        return found

    def sample_pair_rows(self, pairs: np.ndarray, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """n (winner, loser) windows: a pair at random, then the windows at one random fraction of each segment
        (aligned in time: two attempts from one start state are compared at the same stage)."""
        chosen = pairs[rng.integers(0, len(pairs), n)]
        u = rng.random(n)
        rows = []
        for column in (0, 1):
            segs = [self.segment_windows[s] for s in chosen[:, column]]
            rows.append(np.array([seg[int(f * len(seg))] for seg, f in zip(segs, u)]))
        return rows[0], rows[1]


def _open(path: str) -> DemoStore:
    if not Path(path).exists():
        raise PreferenceError(f"No store at {path}: pass algo.data=[...] with recorded or rollout stores.")
    return DemoStore.open(path)


# ================================================================================================ rollouts


def record_rollouts(policy, envs, store: DemoStore, n_starts: int, per_start: int, *, seed: int, task: str,
                    progress=None) -> dict[str, Any]:
    """`per_start` rollouts of the policy from each of `n_starts` start states (episode seeds seed, seed + 1, ...),
    each pass with its own sampler noise, appended to `store` (source "policy") with success labels; the
    rollouts of one start state form a group, so the pairs ranked by outcome come out of it."""
    from robopolicy.data.preferences import LABEL_KEY, episode_labels
    from robopolicy.evaluate import PolicyAgent
    from robopolicy.rollout import run_episodes

    policy.eval()
    outcomes = []
    for r in range(per_start):
        generator = torch.Generator().manual_seed(seed * 7919 + r)

        def chunk_fn(obs, noise, r=r, generator=generator):  # pass 0: the evaluation's noise; others: fresh
            return policy.sample_chunk(obs, noise if r == 0 else torch.randn(noise.shape, generator=generator))

        def append(ep, r=r) -> None:
            labels = episode_labels("policy", ep.success, length=ep.length, group=ep.seed, ret=ep.ret)
            store.append_episode(ep.stacked(), task=task, source="policy", success=ep.success,
                                 extra={"seed": ep.seed, "rollout": r, LABEL_KEY: labels})
            outcomes.append(ep.success)
            if progress is not None:
                progress.update(1)

        agent = PolicyAgent(policy, envs.num_envs, chunk_fn=chunk_fn)
        run_episodes(envs, agent, n_starts, seed=seed, record=True, on_episode=append)
    from robopolicy.metrics import success_summary

    return {**success_summary(outcomes), "store": str(store.path), "rollouts": len(outcomes)}


# ================================================================================================ the loop


def refine_offline(run, algo: OfflineAlgoConfig, base: Path, info: Mapping[str, Any], task: str | None,
                   make_envs: Callable[[int], Any] | None, *, log: Callable[[str], None] = print,
                   progress=None) -> dict[str, Any]:
    """Fine-tune the base's weights with `algo` on its stores, evaluate before and after on the same unseen
    seeds, write out/checkpoints/refined (a plain checkpoint, `last` points to it) and out/summary.json."""
    if not algo.data and algo.name != "hg_dagger":
        raise PreferenceError(f"algo={algo.name} needs algo.data=[STORE, ...]: stores of labelled episodes.")
    out = Path(run.out)
    policy = load_policy(base).train()
    if not getattr(policy, "denoising", False) and algo.name != "hg_dagger":
        raise PreferenceError(f"{base} holds a {policy.name!r} policy; apo and dpo compare denoising errors, so "
                              "they refine flow and diffusion policies.")
    torch.set_num_threads(run.threads)
    torch.manual_seed(run.seed)
    base_config = dict(info["config"])
    action_fps = algo.action_fps or _training_fps(base_config, base)
    kinds = algo.kinds
    if algo.name == "apo" and (kinds is None or algo.adaptive is None):
        takeovers = has_takeovers(list(algo.data), algo.lookback_s)
        if kinds is None:  # dpo's pairs need every kind: same-start pairs rank unassisted episodes
            kinds = default_kinds(list(algo.data), algo.lookback_s, takeovers)
        if algo.adaptive is None:
            algo = dataclasses.replace(algo, adaptive=takeovers)
    data = LabelledWindows(list(algo.data), policy, action_fps, algo.lookback_s, kinds=kinds) if algo.data else None
    if data is None:
        raise PreferenceError("algo=hg_dagger needs algo.data=[STORE, ...]: deployment recordings with interventions.")
    demos = None
    if algo.demos_fraction > 0:
        demos_path = algo.demos or base_config.get("data")
        if not demos_path:
            raise PreferenceError(f"{base} names no training store: pass algo.demos=STORE.")
        # the base's own training episodes (train's max_episodes), not the whole store: a base trained on 15 of 50
        # demonstrations would otherwise be refined on 35 it never saw, and the gain would not be the labels'
        picked = None if algo.demos else select_episodes(_open(demos_path), bool(base_config.get("only_success", True)),
                                                         base_config.get("max_episodes"))
        demos = LabelledWindows([demos_path], policy, action_fps, algo.lookback_s, only_success=True, episodes=picked)
    pairs = None
    if algo.name == "dpo":
        pairs = np.asarray(data.pairs(algo.pairs), dtype=np.int64).reshape(-1, 2)
        if not len(pairs):
            what = ("no desirable segment or no undesirable one" if algo.pairs == "outcome" else
                    "no preference pairs (takeovers, or rollouts of one start with different outcomes)")
            raise PreferenceError(f"{', '.join(algo.data)} hold {what}; dpo needs both a winner and a loser: record "
                                  f"more{'' if algo.pairs == 'outcome' else ', or pass algo.pairs=outcome'}.")
    # the base as loaded, for base_eval; the policy refined (and the reference of its implicit reward) see the
    # clamped state from here on
    base_policy = copy.deepcopy(policy).eval().requires_grad_(False)
    if algo.state_bound is not None:
        policy.set_state_bound(algo.state_bound)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    optim = optimizer_settings(algo.optim, _training_optim(base_config))
    optimizer, scheduler = make_optimizer(policy, optim, algo.steps)
    ema = EMA(policy, optim.ema_decay)
    counts = {"kinds": data.kinds, "windows": len(data), "desirable_windows": int(data.desirable.sum()),
              "undesirable_windows": int((~data.desirable).sum()), "pairs": None if pairs is None else len(pairs),
              "demonstration_windows": None if demos is None else len(demos),
              "demonstration_episodes": None if demos is None else len(demos.labels[0])}
    if algo.name == "apo":
        counts["weights"] = "adaptive" if algo.adaptive else "even"
    log(f"finetune {algo.name} offline: base {base} ({policy.name}), {counts}, {algo.steps} steps")

    started, load_started = time.perf_counter(), os.getloadavg()[0]
    base_eval = _evaluate(make_envs, base_policy, run.eval.base_episodes, run.eval.num_envs)
    if base_eval is not None:
        log(f"base success {base_eval['success_rate']:.2f} over {base_eval['episodes']} episodes")
    history = []
    step_fn = {"apo": _apo_step, "dpo": _dpo_step, "hg_dagger": _hg_dagger_step}[algo.name]
    train_started = time.perf_counter()
    for step in range(algo.steps):
        rng = np.random.default_rng([run.seed, step])
        torch.manual_seed(run.seed * 1_000_003 + step)
        loss, metrics = step_fn(policy, reference, data, algo, rng, pairs=pairs, demos=demos)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), optim.grad_clip)
        optimizer.step()
        scheduler.step()
        ema.update(policy, step)
        if (step + 1) % 50 == 0 or step + 1 == algo.steps:
            history.append({"step": step + 1, **{k: round(float(v), 6) for k, v in metrics.items()}})
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
    train_seconds = round(time.perf_counter() - train_started, 1)

    refined = ema.model.eval()
    final = _evaluate(make_envs, refined, run.eval.final_episodes, run.eval.num_envs)
    config = {**{k: v for k, v in base_config.items() if k != "policy"}, "task": task,
              "refined": {"algo": to_dict(algo), "base": str(base), "seed": run.seed}}
    checkpoint = save_checkpoint(out / "checkpoints" / "refined", refined, config=config,
                                 extra_json={"algo": algo.name, "steps": algo.steps})
    point_last(checkpoint)
    (out / "curves.json").write_text(json.dumps({"algo": algo.name, "train": history}, indent=1))
    summary = {
        "command": "finetune", "algo": algo.name, "offline": True, "task": task, "base": str(base),
        "checkpoint": str(checkpoint), "data": list(algo.data), "counts": counts, "steps": algo.steps,
        "train_seconds": train_seconds, "wall_seconds": round(time.perf_counter() - started, 1),
        "load_average_1min": [round(load_started, 2), round(os.getloadavg()[0], 2)],
        "base_eval": _brief(base_eval), "final_eval": _brief(final),
        "last_metrics": history[-1] if history else None, "curves": str(out / "curves.json"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["summary"] = str(out / "summary.json")
    return summary


def _apo_step(policy, reference, data: LabelledWindows, algo: ApoConfig, rng, *, demos, **_):
    n_demo = int(round(algo.batch_size * algo.demos_fraction)) if demos is not None else 0
    rows = data.sample_rows(rng, algo.batch_size - n_demo, algo.desirable_fraction)
    batch, desirable = data.batch(rows), torch.from_numpy(data.desirable[rows])
    if n_demo:  # demonstrations are desirable
        batch = _concat(batch, demos.batch(rng.integers(0, len(demos), n_demo)))
        desirable = torch.cat([desirable, torch.ones(n_demo, dtype=torch.bool)])
    noise, t = policy.denoising_inputs(len(desirable), policy.device)
    error = policy.per_sample_error(policy.denoising_error(batch, noise, t), batch)
    with torch.no_grad():
        ref_error = reference.per_sample_error(reference.denoising_error(batch, noise, t), batch)
    if algo.adaptive:
        weight = apo_weights(error, desirable, algo.eta_desirable, algo.eta_undesirable)
    else:
        weight = torch.where(desirable, algo.eta_desirable, algo.eta_undesirable).to(error.dtype)
    reward = implicit_reward(error, ref_error)
    preference = kto_loss(reward, desirable, weight, algo.beta).mean()
    bc = (error * desirable).sum() / desirable.sum().clamp_min(1)
    loss = preference + algo.bc_weight * bc
    return loss, {"loss": loss.item(), "kto": preference.item(), "bc": bc.item(),
                  "reward_desirable": _masked_mean(reward, desirable), "reward_undesirable": _masked_mean(reward, ~desirable)}


def _dpo_step(policy, reference, data: LabelledWindows, algo: DpoConfig, rng, *, pairs, demos, **_):
    win, lose = data.sample_pair_rows(pairs, rng, algo.batch_size)
    n = len(win)
    n_demo = int(round(2 * n * algo.demos_fraction)) if demos is not None else 0
    batch = data.batch(np.concatenate([win, lose]))  # winners then losers (then demonstrations): one forward pass
    if n_demo:
        batch = _concat(batch, demos.batch(rng.integers(0, len(demos), n_demo)))
    noise, t = policy.denoising_inputs(n + n_demo, policy.device)
    noise, t = torch.cat([noise[:n], noise]), torch.cat([t[:n], t])  # a winner and its loser share noise and time
    error = policy.per_sample_error(policy.denoising_error(batch, noise, t), batch)
    with torch.no_grad():
        ref_error = reference.per_sample_error(reference.denoising_error(batch, noise, t), batch)
    pair_loss = dpo_loss(error[:n], error[n:2 * n], ref_error[:n], ref_error[n:2 * n], algo.beta).mean()
    bc = torch.cat([error[:n], error[2 * n:]]).mean()  # the winners and the demonstrations
    loss = pair_loss + algo.bc_weight * bc
    margin = implicit_reward(error[:n], ref_error[:n]) - implicit_reward(error[n:2 * n], ref_error[n:2 * n])
    return loss, {"loss": loss.item(), "dpo": pair_loss.item(), "bc": bc.item(),
                  "accuracy": float((margin > 0).float().mean())}


def _hg_dagger_step(policy, reference, data: LabelledWindows, algo: HgDaggerConfig, rng, *, demos, **_):
    n_demo = int(round(algo.batch_size * algo.demos_fraction)) if demos is not None else 0
    parts = [data.batch(rng.integers(0, len(data), algo.batch_size - n_demo))] if n_demo < algo.batch_size else []
    if n_demo:  # demos_fraction 1: the demonstrations alone (the control: what more training alone does)
        parts.append(demos.batch(rng.integers(0, len(demos), n_demo)))
    return policy.loss(parts[0] if len(parts) == 1 else _concat(*parts))


def _concat(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([a[k], b[k]]) for k in a}


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float(x[mask].detach().mean()) if bool(mask.any()) else 0.0


def _training_optim(base_config: Mapping[str, Any]) -> dict[str, Any]:
    """The policy config with the base's training optim settings over its own `optim:` (what a null fills)."""
    policy = dict(base_config["policy"])
    trained = {k: v for k, v in (base_config.get("optim") or {}).items() if v is not None}
    return {**policy, "optim": {**(policy.get("optim") or {}), **trained}}


def _training_fps(base_config: Mapping[str, Any], base: Path) -> int:
    store = base_config.get("data")
    if not store or not Path(store).exists():
        raise PreferenceError(f"{base}'s training store {store!r} is not here to tell the policy's action rate: "
                              "pass algo.action_fps=... (10 for the built-in tasks).")
    return DemoStore.open(store).fps


def _evaluate(make_envs, policy, episodes: int, num_envs: int) -> dict | None:
    if not episodes or make_envs is None:
        return None
    envs = make_envs(num_envs)
    try:
        return evaluate(envs, policy.eval(), episodes, seed=EVAL_SEED)
    finally:
        envs.close()


def _brief(result: dict | None) -> dict | None:
    return None if result is None else {k: v for k, v in result.items() if k != "per_episode"}


__all__ = ["OFFLINE_ALGOS", "ApoConfig", "DpoConfig", "HgDaggerConfig", "PreferenceError", "apo_weights",
           "dpo_loss", "implicit_reward", "kto_loss", "refine_offline"]
