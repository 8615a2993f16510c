"""Preferences and interventions: labels from stores, the APO / Diffusion-DPO losses, offline `finetune`."""

import copy
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import last_json, run_cli

from robopolicy.checkpoint import read_checkpoint_info
from robopolicy.data import DemoStore
from robopolicy.data.preferences import (
    derive_labels,
    episode_labels,
    label_counts,
    label_store,
    preference_pairs,
    store_labels,
)
from robopolicy.policies import make_policy
from robopolicy.preference import apo_weights, dpo_loss, implicit_reward, kto_loss

FEATURES = {
    "observation.state": {"dtype": "float32", "shape": [3], "names": None},
    "action": {"dtype": "float32", "shape": [2], "names": None},
}
STATS_INPUT = {"observation.state": np.random.default_rng(0).normal(size=(50, 3)),
               "action": np.random.default_rng(1).uniform(-1, 1, size=(50, 2))}


def small_policy(name: str):
    from robopolicy.data.stats import lowdim_stats

    stats = {k: {s: np.asarray(v, np.float32) for s, v in lowdim_stats(x).items()} for k, x in STATS_INPUT.items()}
    cfg = {"name": name, "horizon": 8, "n_obs_steps": 2, "n_action_steps": 4, "mlp": {"hidden_dim": 32}}
    torch.manual_seed(0)
    return make_policy(cfg, FEATURES, stats)


def batch_of(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"observation.state": torch.randn(n, 2, 3, generator=g),
            "action": torch.rand(n, 8, 2, generator=g) * 2 - 1,
            "action_is_pad": torch.zeros(n, 8, dtype=torch.bool)}


# ------------------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("name", ["flow", "diffusion"])
def test_dpo_with_identical_winner_and_loser_is_log2_with_zero_gradient(name):
    policy = small_policy(name).double()  # float64: the winner's and loser's gradients cancel to round-off
    reference = copy.deepcopy(policy).requires_grad_(False)
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch_of(6).items()}
    noise, t = policy.denoising_inputs(6)
    noise, t = noise.double(), t.double() if t.is_floating_point() else t
    both = {k: torch.cat([v, v]) for k, v in batch.items()}  # winners then the very same losers
    error = policy.per_sample_error(policy.denoising_error(both, torch.cat([noise, noise]), torch.cat([t, t])), both)
    with torch.no_grad():
        ref = reference.per_sample_error(reference.denoising_error(both, torch.cat([noise, noise]),
                                                                   torch.cat([t, t])), both)
    loss = dpo_loss(error[:6], error[6:], ref[:6], ref[6:], beta=500.0).mean()
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    grads = [p.grad.abs().max().item() for p in policy.parameters() if p.grad is not None]
    assert grads and max(grads) < 1e-10


def test_dpo_loss_rewards_the_winner_getting_better_than_the_loser():
    ref = torch.tensor([0.1, 0.1])
    better = dpo_loss(torch.tensor([0.05, 0.05]), torch.tensor([0.1, 0.1]), ref, ref, beta=100.0)
    worse = dpo_loss(torch.tensor([0.1, 0.1]), torch.tensor([0.05, 0.05]), ref, ref, beta=100.0)
    assert (better < math.log(2)).all() and (worse > math.log(2)).all()


@pytest.mark.parametrize("name", ["flow", "diffusion"])
def test_kto_implicit_reward_is_zero_when_the_reference_is_the_policy(name):
    policy = small_policy(name)
    reference = copy.deepcopy(policy)
    batch = batch_of(8)
    noise, t = policy.denoising_inputs(8)
    error = policy.per_sample_error(policy.denoising_error(batch, noise, t), batch)
    ref = reference.per_sample_error(reference.denoising_error(batch, noise, t), batch)
    reward = implicit_reward(error, ref)
    assert torch.equal(reward, torch.zeros(8))
    desirable = torch.tensor([True, False] * 4)
    weight = apo_weights(error, desirable, 1.0, 1.0)
    # at r = z0 = 0 every sample's value is lambda / 2: the loss is half its weight, for either label
    assert torch.allclose(kto_loss(reward, desirable, weight, beta=300.0), weight / 2)


def test_apo_weights_favour_desirable_samples_the_policy_misses_and_spare_undesirable_ones_it_avoids():
    error = torch.tensor([0.01, 0.1, 0.01, 0.1])
    desirable = torch.tensor([True, True, False, False])
    w = apo_weights(error, desirable, 1.0, 1.0)
    assert w[1] > w[0]  # a desirable action far from the policy weighs more
    assert w[3] < w[2]  # an undesirable action the policy is already far from weighs less
    assert ((w > 0) & (w < 1)).all()


# ------------------------------------------------------------------------------------------------- labels


def test_intervention_labels_mark_the_takeover_and_the_policy_before_it():
    flags = np.zeros(40, bool)
    flags[10:20] = True
    flags[30:35] = True
    labels = episode_labels("intervention", True, length=40, intervention=flags, lookback=4)
    assert labels["segments"] == [[6, 10, -1, "pre_takeover"], [10, 20, 1, "intervention"],
                                  [26, 30, -1, "pre_takeover"], [30, 35, 1, "intervention"]]
    pairs = preference_pairs({0: labels})
    assert [(p["winner"], p["loser"], p["kind"]) for p in pairs] == [
        ((0, 10, 20), (0, 6, 10), "takeover"), ((0, 30, 35), (0, 26, 30), "takeover")]
    # a takeover right after the previous one: the lookback never reaches into the intervener's frames
    flags2 = np.zeros(20, bool)
    flags2[5:8] = flags2[9:12] = True
    segments = episode_labels("intervention", False, length=20, intervention=flags2, lookback=4)["segments"]
    assert segments[2] == [8, 9, -1, "pre_takeover"]


def test_rollout_labels_rank_same_start_attempts_by_outcome_and_demonstrations_stay_unlabelled():
    assert episode_labels("expert", True, length=10) is None
    win = episode_labels("policy", True, length=10, group=7, ret=5.0)
    lose = episode_labels("policy", False, length=12, group=7, ret=9.0)
    other = episode_labels("policy", False, length=12, group=8, ret=1.0)
    assert win["segments"] == [[0, 10, 1, "success"]] and lose["segments"] == [[0, 12, -1, "failure"]]
    pairs = preference_pairs({0: win, 1: lose, 2: other})
    assert [(p["winner"][0], p["loser"][0]) for p in pairs] == [(0, 1)]  # start 8 has no second attempt
    counts = label_counts({0: win, 1: lose, 2: other})
    assert counts["segments"] == {"desirable": 1, "undesirable": 2}
    assert counts["frames"] == {"desirable": 10, "undesirable": 24} and counts["pairs"]["same_start"] == 1


def recorded_store(path, demos_path, n: int = 4):
    """A store shaped like a deployment recording: the demos' frames with per-frame intervention flags."""
    demos = DemoStore.open(demos_path)
    features = {**demos.features, "intervention": {"dtype": "bool", "shape": [1], "names": None}}
    store = DemoStore.create(path, features, demos.fps)
    for i in range(n):
        frames = demos.get_episode(i)
        flags = np.zeros((len(frames["action"]), 1), bool)
        flags[len(flags) // 2:] = True  # the second half driven by the intervener
        store.append_episode({**frames, "intervention": flags}, task="t", source="intervention", success=True,
                             extra={"seed": i})
    for i in range(n, n + 2):  # two episodes the policy ran alone, one failed
        frames = demos.get_episode(i)
        store.append_episode({**frames, "intervention": np.zeros((len(frames["action"]), 1), bool)}, task="t",
                             source="policy", success=i == n, extra={"seed": 100})
    return store


def test_labels_are_derived_then_written_into_episode_metadata(tmp_path):
    run_cli("collect", "task=builtin/reach", "episodes=6", f"out={tmp_path / 'demos'}", check=True)
    store = recorded_store(tmp_path / "rec", tmp_path / "demos")
    labels, stored = store_labels(store, lookback_s=0.5)
    assert not stored and labels == derive_labels(store, 0.5)
    assert sorted(labels) == list(range(6)) and labels[4]["segments"][0][3] == "success"
    label_store(store, lookback_s=0.5)
    store.close()
    labelled = last_json(run_cli("data", "label", f"store={tmp_path / 'demos'}", check=True))
    assert labelled["preference_labels"]["labelled_episodes"] == 0  # expert demonstrations stay unlabelled
    reopened = DemoStore.open(tmp_path / "rec")
    assert all("preference" in e["extra"] for e in reopened.episodes)
    assert reopened.episodes[0]["extra"]["seed"] == 0  # merged, not replaced
    assert store_labels(reopened)[1]
    info = last_json(run_cli("data", "info", f"store={tmp_path / 'rec'}", check=True))
    counts = info["preference_labels"]
    assert counts["stored"] and counts["by_kind"]["intervention"] == 4 and counts["by_kind"]["pre_takeover"] == 4
    assert counts["pairs"] == {"takeover": 4, "same_start": 1}


# ------------------------------------------------------------------------------------------------- offline finetune


def test_apo_dpo_hg_dagger_write_plain_checkpoints_that_need_no_base(tmp_path):
    demos, base = tmp_path / "demos", tmp_path / "base"
    run_cli("collect", "task=builtin/reach", "episodes=6", f"out={demos}", check=True)
    run_cli("train", "task=builtin/reach", f"data={demos}", f"out={base}", "steps=30", "eval.episodes=0",
            "eval.final_episodes=0", "max_episodes=4", check=True)
    recorded_store(tmp_path / "rec", demos).close()
    for algo in ("apo", "dpo", "hg_dagger"):
        out = tmp_path / algo
        summary = last_json(run_cli("finetune", f"algo={algo}", f"ckpt={base}", f"algo.data=[{tmp_path / 'rec'}]",
                                    f"out={out}", "algo.steps=4", "algo.batch_size=8", "eval.base_episodes=0",
                                    "eval.final_episodes=2", check=True))
        assert summary["algo"] == algo and summary["offline"] and summary["final_eval"]["episodes"] == 2
        counts = summary["counts"]
        assert counts["demonstration_episodes"] == 4  # the base's own 4 of the 6 demonstrations, not all 6
        if algo == "hg_dagger":
            assert counts["undesirable_windows"] == 0 and counts["demonstration_windows"] > 0
        else:
            assert counts["desirable_windows"] > 0 and counts["undesirable_windows"] > 0
        if algo == "dpo":  # pairs outcome (the default): the 4 takeovers and 1 same-start pair, and every
            assert counts["pairs"] > 5  # desirable segment against every undesirable one
        if algo == "apo":  # a recording with takeovers: the person's signal alone, not the unassisted episodes
            assert counts["kinds"] == ["intervention", "pre_takeover"] and counts["weights"] == "adaptive"
        refined = read_checkpoint_info(summary["checkpoint"])["config"]["policy"]
        assert refined["normalization"]["state_bound"] == 3.0  # algo.state_bound's default, saved with the policy
    assert read_checkpoint_info(base / "checkpoints" / "last")["config"]["policy"]["normalization"]["state_bound"] is None
    shutil.rmtree(base)  # plain checkpoints: the base is not needed any more
    for algo in ("apo", "dpo", "hg_dagger"):
        evaluated = last_json(run_cli("eval", f"ckpt={tmp_path / algo}", "episodes=2", "num_envs=2", check=True))
        assert evaluated["episodes"] == 2 and evaluated["task"] == "builtin/reach"


def test_offline_finetune_refuses_missing_data_in_one_sentence(tmp_path):
    demos, base = tmp_path / "demos", tmp_path / "base"
    run_cli("collect", "task=builtin/reach", "episodes=2", f"out={demos}", check=True)
    run_cli("train", "task=builtin/reach", f"data={demos}", f"out={base}", "steps=5", "eval.episodes=0",
            "eval.final_episodes=0", check=True)
    proc = run_cli("finetune", "algo=apo", f"ckpt={base}", f"out={tmp_path / 'x'}")
    assert proc.returncode != 0 and "algo.data" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("finetune", "algo=dpo", f"ckpt={base}", f"algo.data=[{tmp_path / 'nope'}]", f"out={tmp_path / 'x'}")
    assert proc.returncode != 0 and "nope" in proc.stderr and "Traceback" not in proc.stderr
    # demonstrations only: no labelled segments, no pairs
    proc = run_cli("finetune", "algo=apo", f"ckpt={base}", f"algo.data=[{demos}]", f"out={tmp_path / 'x'}")
    assert proc.returncode != 0 and "labelled" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x" / "summary.json").exists()


def test_windows_mask_actions_outside_their_segment_and_held_ticks(tmp_path):
    from robopolicy.preference import LabelledWindows

    features = {**FEATURES, "intervention": {"dtype": "bool", "shape": [1], "names": None},
                "action.held": {"dtype": "bool", "shape": [1], "names": None}}
    store = DemoStore.create(tmp_path / "rec", features, fps=20)
    flags = np.zeros((40, 1), bool)
    flags[20:] = True
    held = np.zeros((40, 1), bool)
    held[24] = True
    actions = np.tile(np.arange(40, dtype=np.float32)[:, None], (1, 2)) / 40  # the frame index in the action
    store.append_episode({"observation.state": np.zeros((40, 3), np.float32), "action": actions,
                          "intervention": flags, "action.held": held}, task="t", source="intervention",
                         success=True)
    store.close()
    policy = small_policy("flow")
    data = LabelledWindows([str(tmp_path / "rec")], policy, action_fps=10, lookback_s=0.5)
    assert data.datasets[0].frame_stride == 2  # a 20 Hz recording of a 10 Hz policy
    assert sorted(set(data.rows[:, 2].tolist())) == [-1, 1]
    row = int(np.flatnonzero((data.rows[:, 1] == 22) & (data.desirable))[0])  # anchored at frame 22, intervening
    batch = data.batch(np.array([row]))
    frames = 22 + 2 * np.arange(-1, 7)  # n_obs_steps 2, horizon 8, every 2nd frame
    np.testing.assert_allclose(batch["action"][0, :, 0].numpy(), np.minimum(frames, 39) / 40)
    pad = batch["action_is_pad"][0].numpy()
    np.testing.assert_array_equal(pad, (frames < 20) | (frames >= 40) | (frames == 24))


def test_recorded_observations_are_paired_with_the_command_they_met(tmp_path):
    # a 20 Hz deployment recording of a 10 Hz arm: a frame is captured at each servo tick, half a control tick after
    # an even tick's command (which the arm samples as it captures); the odd ticks' commands are never executed
    from robopolicy.preference import LabelledWindows, applied_frames

    features = {**FEATURES, "intervention": {"dtype": "bool", "shape": [1], "names": None},
                "timing.obs_timestamp": {"dtype": "float64", "shape": [1], "names": None},
                "timing.command_time": {"dtype": "float64", "shape": [1], "names": None}}
    store = DemoStore.create(tmp_path / "rec", features, fps=20)
    ticks = np.arange(40)
    sent = 0.05 * ticks + 0.002
    captures = 0.025 + 0.1 * np.floor((0.05 * ticks - 0.025) / 0.1)  # the latest frame at each tick
    captures[0] = -0.01  # the reset frame, before any command
    flags = np.zeros((40, 1), bool)
    flags[10:] = True
    store.append_episode({"observation.state": np.zeros((40, 3), np.float32),
                          "action": np.tile(ticks[:, None] / 40, (1, 2)).astype(np.float32), "intervention": flags,
                          "timing.obs_timestamp": captures[:, None], "timing.command_time": sent[:, None]},
                         task="t", source="intervention", success=True)
    store.close()
    applied = applied_frames(DemoStore.open(tmp_path / "rec"))
    # frame 23 (tick 1.15 s) sees the frame captured at 1.125 s: the arm was executing tick 22's command then
    assert applied[23] == 22 and applied[22] == 20 and applied[0] == 0
    data = LabelledWindows([str(tmp_path / "rec")], small_policy("flow"), action_fps=10, lookback_s=0.5)
    row = int(np.flatnonzero((data.rows[:, 1] == 23) & data.desirable)[0])
    batch = data.batch(np.array([row]))
    frames = np.minimum(23 + 2 * np.arange(-1, 7), 39)
    np.testing.assert_allclose(batch["action"][0, :, 0].numpy(), applied[frames] / 40)  # even ticks only
    assert not batch["action_is_pad"][0, :6].any()


@pytest.mark.parametrize("name", ["hg_dagger", "apo", "dpo"])
def test_offline_methods_train_at_the_bases_own_rate_from_their_yaml(name):
    # HG-DAgger is behaviour cloning: at a fine-tuning rate (1e-4 x 1000 steps, a tenth of the flow base's 1e-3) a
    # round's interventions hardly moved a 15-demo base (0.39 from 0.40); at the base's own rate 0.65. apo likewise:
    # at 3e-4 0.40 from a 0.41 base on the offline line, at the base's 1e-3 0.57. dpo at 1e-5 stayed near its base
    # (0.51-0.65 from 0.56); at the base's rate with bc_weight of the order of beta, 0.74-0.76
    from pathlib import Path

    import yaml

    from robopolicy.config import from_mapping
    from robopolicy.preference import OFFLINE_ALGOS, _training_optim
    from robopolicy.train import optimizer_settings

    raw = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "algo" / f"{name}.yaml").read_text())
    algo = from_mapping(OFFLINE_ALGOS[name], raw)
    assert algo.optim.lr is None
    policy = {"name": "flow", "optim": {"lr": 1e-3, "weight_decay": 1e-6, "ema_decay": 0.995}}
    assert optimizer_settings(algo.optim, _training_optim({"policy": policy})).lr == 1e-3
    assert algo.steps >= 2000
    trained = {"policy": policy, "optim": {"lr": 3e-4, "weight_decay": None, "ema_decay": None}}
    assert optimizer_settings(algo.optim, _training_optim(trained)).lr == 3e-4  # the base's train override
    if name == "dpo":  # the DPO term's gradient is ~beta/2 times the denoising loss's: at the base's rate the
        # winners' loss must weigh as much, or the pairs alone move the weights (0.56 -> 0.03-0.34 at 1e-4..1e-3)
        assert algo.bc_weight >= algo.beta / 4
    if name == "apo":  # APO's adaptive weights where there are takeovers (loop recordings 0.87, even 0.73), KTO's
        # even ones on rollouts labelled whole (offline pick_place 0.58 even / 0.51 adaptive, push 0.41 / 0.27)
        assert algo.adaptive is None and algo.eta_desirable == algo.eta_undesirable == 1.0


@pytest.mark.parametrize("base_bound, algo_bound, refined_bound", [(None, 3.0, 3.0), (2.0, None, 2.0)])
def test_offline_refinement_clamps_the_refined_state_and_measures_the_base_as_loaded(
        tmp_path, monkeypatch, base_bound, algo_bound, refined_bound):
    """algo.state_bound (null: the base's) is set on the policy refined and on the reference of its implicit reward
    (the reward compares the same inputs) and saved in the refined checkpoint; base_eval measures the base as it
    was loaded."""
    import robopolicy.preference as preference
    from robopolicy.checkpoint import save_checkpoint
    from robopolicy.finetune import finetune
    from robopolicy.loading import load_policy

    base = small_policy("flow")
    base.set_state_bound(base_bound)
    base = save_checkpoint(tmp_path / "base", base, config={"task": "t"})
    features = {**FEATURES, "intervention": {"dtype": "bool", "shape": [1], "names": None}}
    store = DemoStore.create(tmp_path / "rec", features, fps=10)
    flags = np.zeros((40, 1), bool)
    flags[20:] = True
    rng = np.random.default_rng(0)
    store.append_episode({"observation.state": rng.normal(size=(40, 3)).astype(np.float32),
                          "action": rng.uniform(-1, 1, size=(40, 2)).astype(np.float32), "intervention": flags},
                         task="t", source="intervention", success=True)
    store.close()
    evaluated, compared = [], []
    monkeypatch.setattr(preference, "_evaluate",
                        lambda make_envs, policy, episodes, num_envs: evaluated.append(policy.normalizer.state_bound))
    apo_step = preference._apo_step

    def recording_step(policy, reference, *args, **kwargs):
        compared.append((policy.normalizer.state_bound, reference.normalizer.state_bound))
        return apo_step(policy, reference, *args, **kwargs)

    monkeypatch.setattr(preference, "_apo_step", recording_step)
    algo = {"name": "apo", "data": [str(tmp_path / "rec")], "steps": 2, "batch_size": 4, "action_fps": 10,
            "demos_fraction": 0.0, "state_bound": algo_bound}
    summary = finetune({"ckpt": str(base), "out": str(tmp_path / "apo"), "algo": algo,
                        "eval": {"base_episodes": 2, "final_episodes": 2}}, make_envs=lambda n: None, log=lambda m: None)
    assert evaluated == [base_bound, refined_bound]  # the base as loaded, then the refined policy
    assert compared == [(refined_bound, refined_bound)] * 2
    info = read_checkpoint_info(summary["checkpoint"])
    assert info["config"]["policy"]["normalization"]["state_bound"] == refined_bound
    assert load_policy(summary["checkpoint"]).normalizer.state_bound == refined_bound


def test_apos_null_kinds_are_the_takeovers_where_there_are_any_and_every_kind_otherwise(tmp_path):
    from robopolicy.preference import TAKEOVER_KINDS, LabelledWindows, default_kinds

    def store_of(path, with_takeover: bool):
        features = {**FEATURES, "intervention": {"dtype": "bool", "shape": [1], "names": None}}
        store = DemoStore.create(path, features, fps=10)
        for i, success in enumerate((True, False)):  # the policy alone: a success and a failure
            store.append_episode({"observation.state": np.zeros((30, 3), np.float32),
                                  "action": np.zeros((30, 2), np.float32), "intervention": np.zeros((30, 1), bool)},
                                 task="t", source="policy", success=success, extra={"seed": i})
        if with_takeover:
            flags = np.zeros((30, 1), bool)
            flags[15:] = True
            store.append_episode({"observation.state": np.zeros((30, 3), np.float32),
                                  "action": np.zeros((30, 2), np.float32), "intervention": flags},
                                 task="t", source="intervention", success=True, extra={"seed": 2})
        store.close()
        return str(path)

    rollouts = store_of(tmp_path / "rollouts", with_takeover=False)
    recording = store_of(tmp_path / "recording", with_takeover=True)
    assert default_kinds([rollouts], 0.5) is None
    assert default_kinds([rollouts, recording], 0.5) == list(TAKEOVER_KINDS)
    policy = small_policy("flow")
    takeovers = LabelledWindows([recording], policy, action_fps=10, lookback_s=0.5, kinds=list(TAKEOVER_KINDS))
    assert {s[3] for v in takeovers.labels[0].values() for s in v["segments"]} == set(TAKEOVER_KINDS)
    every = LabelledWindows([recording], policy, action_fps=10, lookback_s=0.5)
    assert {s[3] for v in every.labels[0].values() for s in v["segments"]} == {
        "intervention", "pre_takeover", "success", "failure"}
