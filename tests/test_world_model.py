"""The world model: chunk-step windows carry the right targets, `robopolicy world-model train` writes a model that
reloads to the same predictions and a held-out report, training lowers held-out prediction error, bad input is one
sentence, `eval wm=` predicts a success rate with an interval without stepping the simulator, and `algo=world_model`
refines in imagination spending only its real env-step budget."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import load_benchmark
from test_rl_core import MAX_STEPS, finetune_cfg, make_base, make_envs

from robopolicy import cli
from robopolicy.data import DemoStore
from robopolicy.finetune import finetune
from robopolicy.loading import load_policy
from robopolicy.rl.steer import SteerPolicy
from robopolicy.world_model import (
    WorldModelConfig,
    WorldModelError,
    load_episodes,
    load_world_model,
    predict_success,
)
from robopolicy.world_model.data import Episodes, sample_windows
from robopolicy.world_model.model import WorldModel, _stacked_dynamics, mlp
from robopolicy.world_model.train import fit, new_model, prediction_report

TASK = "builtin/pick_place"  # episodes of ~40 steps: several chunk steps each
TINY = ["steps=40", "batch_size=32", "model.hidden=[32,32]", "model.latent_dim=16", "model.ensemble=2",
        "holdout=0.25", "report_horizon=3"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("wm") / "pick_place"
    assert cli.main(["collect", f"task={TASK}", "episodes=8", f"out={path}", "num_envs=1"]) == 0
    return path


@pytest.fixture(scope="module")
def model_dir(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("wm") / "model"
    assert cli.main(["world-model", "train", f"data={store},{store}", f"out={out}", *TINY]) == 0
    return out


def test_windows_pad_past_the_end_and_mark_success_within_the_chunk():
    # one episode of 5 steps: state t = [t], action t = [10 t], reward 1 per step, success on the last step
    ep = Episodes(np.arange(5, dtype=np.float32)[:, None], 10 * np.arange(5, dtype=np.float32)[:, None],
                  np.ones(5, np.float32), np.array([0, 0, 0, 0, 1], bool), np.array([0]), np.array([5]))
    w = sample_windows(ep, 1, 2, 3, 2, np.random.default_rng(0), np.array([0]), np.array([1]))
    assert w["state"][0, :, 0].tolist() == [1, 4, 4]  # t = 1, 4, then clamped past the end
    assert w["valid"][0].tolist() == [1, 1, 0]
    assert w["history"][0, 0, :, 0].tolist() == [0, 1] and w["history"][0, 1, :, 0].tolist() == [3, 4]
    assert w["chunk"][0, 0, :, 0].tolist() == [10, 20, 30] and w["chunk"][0, 1, :, 0].tolist() == [40, 40, 40]
    assert w["reward"][0].tolist() == [3, 1]  # only steps inside the episode count
    assert w["success"][0].tolist() == [0, 1]
    first = sample_windows(ep, 1, 1, 3, 3, np.random.default_rng(0), np.array([0]), np.array([0]))
    assert first["history"][0, 0, :, 0].tolist() == [0, 0, 0]  # an episode's start is padded with its first frame


def test_imagination_starts_from_real_histories_padded_at_each_episode_start():
    # two episodes of 3 and 2 steps: state = frame index over the whole store
    ep = Episodes(np.arange(5, dtype=np.float32)[:, None], np.zeros((5, 1), np.float32), np.zeros(5, np.float32),
                  np.zeros(5, bool), np.array([0, 3]), np.array([3, 2]))
    assert ep.histories(2)[..., 0].tolist() == [[0, 0], [0, 1], [1, 2], [3, 3], [3, 4]]  # every visited frame
    assert ep.histories(2, first_only=True)[..., 0].tolist() == [[0, 0], [3, 3]]


def test_train_writes_a_model_that_reloads_to_the_same_predictions(model_dir, store):
    for name in ("model.safetensors", "config.json", "report.json", "report.png"):
        assert (model_dir / name).exists(), name
    report = json.loads((model_dir / "report.json").read_text())
    assert report["data"] == [str(store), str(store)] and report["episodes"] == 16
    rows = report["report"]["by_horizon"]
    assert [r["env_steps"] for r in rows] == [4, 8, 12][:len(rows)] and all(r["state_rmse"] >= 0 for r in rows)
    assert 0 <= report["report"]["success_classifier"]["accuracy"] <= 1
    model, info = load_world_model(model_dir)
    again, _ = load_world_model(model_dir)
    state = torch.randn(3, model.state_dim)
    chunk = torch.randn(3, model.cfg.chunk_steps, model.action_dim)
    z = model.encode(state)
    assert model.next(z, chunk).shape == (2, 3, 16) and model.decode(z).shape == (3, 2, model.state_dim)
    assert torch.equal(again.success(again.encode(state), chunk), model.success(z, chunk))
    assert info["features"]["observation.state"]["shape"] == [model.state_dim]


def test_training_lowers_held_out_prediction_error(store):
    episodes, _ = load_episodes([store])
    train, held = episodes.subset(range(6)), episodes.subset([6, 7])
    torch.manual_seed(0)
    model = new_model(WorldModelConfig(hidden=[64, 64], latent_dim=16, ensemble=2, horizon=2), train)
    first = prediction_report(model, held, 2)
    fit(model, train, 300, batch_size=64, seed=0)
    report = prediction_report(model, held, 2)
    before, after = first["by_horizon"][0]["state_rmse"], report["by_horizon"][0]["state_rmse"]
    assert after < 0.75 * before, (before, after)  # 6 training episodes: the start states barely repeat
    assert report["reconstruction"]["state_rmse"] < 0.75 * first["reconstruction"]["state_rmse"]
    std = model.state_std.numpy()
    for part in (report["reconstruction"], report["by_horizon"][0]):  # per dimension in robot units, the same error
        by_dim = np.array(part["state_rmse_by_dim"])
        assert by_dim.shape == (model.state_dim,)
        assert np.sqrt(np.mean((by_dim / std) ** 2)) == pytest.approx(part["state_rmse"], rel=0.01, abs=1e-3)


def test_the_batched_ensemble_is_each_member_s_own_mlp_and_reads_weights_saved_per_member():
    model = WorldModel(WorldModelConfig(hidden=[8, 8], latent_dim=4, ensemble=3, chunk_steps=2), 5, 2)
    for p in model.dynamics.parameters():  # away from the initial LayerNorm ones and zeros
        torch.nn.init.normal_(p)
    z, chunk = torch.randn(3, 6, 4), torch.randn(3, 6, 2, 2)
    together = model.next_per_member(z, chunk)
    old = {}  # the same weights as one mlp() per member (dynamics.<member>.<layer>.*), as models were saved before
    for e in range(3):
        member = mlp(4 + 4, [8, 8], 4)
        for i in range(3):
            member[3 * i].weight.data = model.dynamics.weights[i][e].T
            member[3 * i].bias.data = model.dynamics.biases[i][e, 0]
            if i < 2:
                member[3 * i + 1].weight.data = model.dynamics.norm_weights[i][e, 0]
                member[3 * i + 1].bias.data = model.dynamics.norm_biases[i][e, 0]
        alone = z[e] + member(torch.cat([z[e], model._chunk(chunk[e])], -1))
        assert torch.allclose(together[e], alone, atol=1e-5)
        old.update({f"dynamics.{e}.{k}": v for k, v in member.state_dict().items()})
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith("dynamics.")} | old
    again = WorldModel(model.cfg, 5, 2)
    again.load_state_dict(_stacked_dynamics(weights, model.cfg))
    assert torch.allclose(again.next_per_member(z, chunk), together, atol=1e-6)
    shared = model.next(z[0], chunk[0])  # every member from the same latent
    assert shared.shape == (3, 6, 4) and not torch.allclose(shared[0], shared[1])


@pytest.mark.parametrize("args, words", [
    (["data=/nonexistent/store"], "No store at /nonexistent/store"),
    (["data=STORE", "steps=0"], "steps must be at least 1"),
])
def test_bad_input_is_one_sentence_and_writes_nothing(args, words, store, tmp_path, capsys):
    out = tmp_path / "model"
    rc = cli.main(["world-model", "train", *[a.replace("STORE", str(store)) for a in args], f"out={out}"])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()


def test_an_existing_model_is_not_overwritten(model_dir, store, capsys):
    before = (model_dir / "model.safetensors").read_bytes()
    assert cli.main(["world-model", "train", f"data={store}", f"out={model_dir}", *TINY]) == 2
    assert "overwrite=true" in capsys.readouterr().err
    assert (model_dir / "model.safetensors").read_bytes() == before
    assert cli.main(["world-model"]) == 2  # the subcommand is required


def test_eval_in_the_world_model_predicts_a_rate_with_an_interval(model_dir, tmp_path, capsys):
    base = make_base(tmp_path / "base", TASK)  # flow: n_action_steps 4, n_obs_steps 2, like the model's defaults
    assert cli.main(["eval", f"ckpt={base}", f"wm={model_dir}", "episodes=6", f"out={tmp_path / 'ev'}"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["in"] == "world_model" and summary["starts"] == 6 and summary["starts_from"] == "env"
    low, high = summary["success_ci95"]
    assert 0 <= low <= summary["success_rate"] <= high <= 1 and len(summary["per_member"]) == 2
    model, _ = load_world_model(model_dir)
    policy = load_policy(base)
    starts = np.zeros((4, model.state_dim), np.float32)
    assert predict_success(model, policy, starts, 20, seed=3) == {**predict_success(model, policy, starts, 20, seed=3),
                                                                  "seconds": pytest.approx(0, abs=10)}
    policy.n_action_steps = 2
    with pytest.raises(WorldModelError, match="model.chunk_steps=2"):
        predict_success(model, policy, starts, 20)


@pytest.mark.parametrize("real_env_steps, start_states", [(0, "first"), (20, "first"), (20, "visited")])
def test_refining_in_the_model_spends_only_the_real_budget(model_dir, tmp_path, real_env_steps, start_states):
    base = make_base(tmp_path / "base", TASK)
    algo = {"name": "world_model", "wm": str(model_dir), "real_env_steps": real_env_steps, "round_env_steps": 20,
            "retrain_steps": 5, "imagined_steps": 200, "imagine_batch": 4, "horizon_chunks": 5,
            "start_states": start_states}
    cfg = finetune_cfg(algo, base, tmp_path / "run", task=TASK)
    summary = finetune(cfg, lambda n: make_envs(n, TASK), log=lambda m: None)
    assert summary["algo"] == "world_model" and summary["updates"] > 0 and summary["imagined_env_steps"] >= 200 * (1 + (real_env_steps > 0))  # one round per real round
    assert all(math.isfinite(v) for v in summary["last_metrics"].values())
    curves = json.loads((tmp_path / "run" / "curves.json").read_text())
    real = [p["env_steps"] for p in curves["eval"]]
    rollouts = tmp_path / "run" / "real_rollouts"
    if real_env_steps == 0:  # offline: the store alone, no env step but evaluation's
        assert summary["env_steps"] == 0 and real == [0, 0] and not rollouts.exists()
    else:
        assert 20 <= summary["env_steps"] < 20 + 2 * MAX_STEPS and real[0] == 0 and real[1] == summary["env_steps"]
        assert DemoStore.open(rollouts).num_frames == summary["env_steps"]
    refined = load_policy(tmp_path / "run" / "checkpoints" / "last")  # a steer checkpoint on its base
    assert isinstance(refined, SteerPolicy) and refined.config["base"]["path"] == str(base.resolve())


def test_collect_records_a_policys_rollouts_for_the_model(tmp_path, capsys):
    base = make_base(tmp_path / "base", TASK)
    out = tmp_path / "rollouts"
    assert cli.main(["collect", f"task={TASK}", f"ckpt={base}", "episodes=2", "num_envs=1", f"out={out}",
                     "max_episode_steps=12"]) == 0
    store = DemoStore.open(out)
    assert store.num_episodes == 2 and {e["source"] for e in store.episodes} == {"policy"}
    assert store.num_frames == sum(e["length"] for e in store.episodes) and store.num_frames <= 24
    assert load_episodes([out])[0].num_episodes == 2


def test_the_ranking_benchmark_scores_rank_agreement():
    ranking = load_benchmark("world_model_ranking")
    assert ranking.spearman([0.1, 0.3, 0.5, 0.7], [0.0, 0.2, 0.21, 0.9]) == pytest.approx(1.0)
    assert ranking.spearman([0.1, 0.3, 0.5], [0.9, 0.5, 0.1]) == pytest.approx(-1.0)
    assert ranking.ranks([0.2, 0.1, 0.2]).tolist() == [2.5, 1.0, 2.5]  # ties share their mean rank
