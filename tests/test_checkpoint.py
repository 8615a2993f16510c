"""Checkpoints: round trip, atomic writes, and clear errors for mismatched or damaged folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from test_policies import make_batch, make_features, make_stats, observation, small_config

from robopolicy.checkpoint import CheckpointError, load_extra_tensors, read_checkpoint_info, save_checkpoint
from robopolicy.loading import load_policy
from robopolicy.policies import make_policy


def trained_policy(config_name: str, cameras: tuple[str, ...] = ()):
    torch.manual_seed(0)
    features = make_features(cameras=cameras)
    policy = make_policy(small_config(config_name), features, make_stats(features, -2.0, 3.0))
    # A few optimizer steps so weights differ from their initialization.
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3)
    batch = make_batch(features, 8)
    for _ in range(3):
        loss, _ = policy.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return policy.eval(), features, batch


@pytest.mark.parametrize("config_name, cameras", [("flow", ()), ("diffusion", ("front",)), ("mlp", ())])
def test_round_trip_gives_identical_chunks(tmp_path, config_name, cameras):
    policy, features, batch = trained_policy(config_name, cameras)
    config = {"policy": small_config(config_name), "task": "builtin/reach", "seed": 3}
    path = save_checkpoint(tmp_path / "ckpt", policy, config=config, extra_json={"step": 12})
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", "features.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp folder left behind

    loaded = load_policy(path, expect_features=features)
    assert not loaded.training and type(loaded) is type(policy)
    noise = torch.randn(4, *policy.noise_shape)
    obs = observation(batch, 4)
    assert torch.equal(loaded.sample_chunk(obs, noise), policy.sample_chunk(obs, noise))
    # The normalizer travelled with the weights (a fresh policy with identity stats differs).
    assert torch.equal(loaded.normalizer.norms["action"].scale, policy.normalizer.norms["action"].scale)

    info = read_checkpoint_info(path)
    assert info["policy"] == config_name.split("_")[0]
    assert info["config"]["task"] == "builtin/reach" and info["config"]["seed"] == 3
    assert info["features"] == policy.features and info["extra"] == {"step": 12}
    assert {"robopolicy", "torch", "python"} <= set(info["versions"])


def test_a_state_bound_travels_with_the_checkpoint_and_older_ones_load_without(tmp_path):
    policy, features, batch = trained_policy("flow")
    policy.set_state_bound(3.0)
    path = save_checkpoint(tmp_path / "bounded", policy, config={"policy": small_config("flow")})
    loaded = load_policy(path)
    assert loaded.cfg.normalization.state_bound == 3.0 and loaded.normalizer.state_bound == 3.0
    knocked = {"observation.state": batch["observation.state"][:4] * 100}
    noise = torch.randn(4, *policy.noise_shape)
    assert torch.equal(loaded.sample_chunk(knocked, noise), policy.sample_chunk(knocked, noise))

    config = yaml.safe_load((path / "config.yaml").read_text())
    del config["policy"]["normalization"]["state_bound"]  # written before the key existed
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    old = load_policy(path)
    assert old.cfg.normalization.state_bound is None and old.normalizer.state_bound is None
    assert old.normalize_obs(knocked)["observation.state"].abs().max() > 3.0


def test_overwrite_and_extra_tensors(tmp_path):
    policy, _, _ = trained_policy("mlp")
    extra = {"residual.weight": torch.randn(3, 4)}
    save_checkpoint(tmp_path / "ckpt", policy, config={"task": "t"})
    save_checkpoint(tmp_path / "ckpt", policy, config={"task": "t2"}, extra_json={"base": "../base"},
                    extra_tensors=extra)
    assert read_checkpoint_info(tmp_path / "ckpt")["config"]["task"] == "t2"
    assert read_checkpoint_info(tmp_path / "ckpt")["config"]["policy"]["name"] == "mlp"
    assert torch.equal(load_extra_tensors(tmp_path / "ckpt")["residual.weight"], extra["residual.weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_failed_save_leaves_nothing_under_the_final_name(tmp_path):
    policy, _, _ = trained_policy("mlp")
    with pytest.raises(Exception):  # noqa: B017 - safetensors refuses a non-tensor value
        save_checkpoint(tmp_path / "ckpt", policy, config={}, extra_tensors={"bad": "not a tensor"})
    assert list(tmp_path.iterdir()) == []


def test_weights_of_another_policy_type_fail_clearly(tmp_path):
    mlp, _, _ = trained_policy("mlp")
    flow, _, _ = trained_policy("flow")
    save_checkpoint(tmp_path / "mlp", mlp, config={})
    save_checkpoint(tmp_path / "flow", flow, config={})
    shutil.copy(tmp_path / "mlp" / "model.safetensors", tmp_path / "flow" / "model.safetensors")
    with pytest.raises(CheckpointError, match="weights of policy 'mlp' but config.yaml configures 'flow'"):
        load_policy(tmp_path / "flow")
    # An edited architecture: same policy type, other sizes.
    save_checkpoint(tmp_path / "flow", flow, config={})
    config = yaml.safe_load((tmp_path / "flow" / "config.yaml").read_text())
    config["policy"]["mlp"]["hidden_dim"] = 16  # the denoiser flow uses by default
    (tmp_path / "flow" / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(CheckpointError, match="does not match the 'flow' policy.*of another shape"):
        load_policy(tmp_path / "flow")


def test_expected_features_mismatch_names_the_key(tmp_path):
    policy, features, _ = trained_policy("flow")
    save_checkpoint(tmp_path / "ckpt", policy, config={})
    wrong_shape = {**features, "observation.state": {"dtype": "float32", "shape": [9], "names": None}}
    with pytest.raises(CheckpointError, match=r"observation.state has shape \[9\] where \[6\] is expected"):
        load_policy(tmp_path / "ckpt", expect_features=wrong_shape)
    missing = {k: v for k, v in features.items() if k != "observation.state"}
    with pytest.raises(CheckpointError, match=r"observation.state is missing"):
        load_policy(tmp_path / "ckpt", expect_features=missing)
    extra_camera = make_features(cameras=("front",))
    with pytest.raises(CheckpointError, match="observation.images.front"):
        load_policy(tmp_path / "ckpt", expect_features=extra_camera)
    assert load_policy(tmp_path / "ckpt", expect_features=extra_camera, allow_extra_features=True)


def test_damaged_or_missing_files_fail_clearly(tmp_path):
    policy, _, _ = trained_policy("flow")
    path = save_checkpoint(tmp_path / "ckpt", policy, config={})
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is damaged or truncated"):
        load_policy(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_policy(tmp_path / "nowhere")
    (path / "features.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="features.json is not valid JSON"):
        load_policy(path)
    (path / "features.json").unlink()
    with pytest.raises(CheckpointError, match="has no features.json"):
        load_policy(path)


def test_newer_format_and_unknown_policy_are_refused(tmp_path):
    policy, _, _ = trained_policy("mlp")
    path = save_checkpoint(tmp_path / "ckpt", policy, config={})
    info = json.loads((path / "features.json").read_text())
    (path / "features.json").write_text(json.dumps({**info, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_policy(path)
    (path / "features.json").write_text(json.dumps(info))
    config = yaml.safe_load((path / "config.yaml").read_text())
    config["policy"]["name"] = "act"
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(CheckpointError, match="'act', which is not registered"):
        load_policy(path)


@pytest.mark.parametrize("config_name", ["flow", "diffusion"])
def test_sampler_steps_can_be_changed_at_load_time(tmp_path, config_name):
    policy, features, batch = trained_policy(config_name)
    path = save_checkpoint(tmp_path / "ckpt", policy, config={"policy": small_config(config_name)})
    noise = torch.randn(2, *policy.noise_shape)
    obs = observation(batch, 2)
    same = load_policy(path)
    more = load_policy(path, num_inference_steps=12)
    assert torch.equal(same.sample_chunk(obs, noise), policy.sample_chunk(obs, noise))
    chunk = more.sample_chunk(obs, noise)  # the same weights, integrated with another step count
    assert torch.isfinite(chunk).all() and not torch.equal(chunk, policy.sample_chunk(obs, noise))
    assert read_checkpoint_info(path)["config"]["policy"].get("num_inference_steps") != 12  # the folder is unchanged
    with pytest.raises(CheckpointError, match="at least 1"):
        load_policy(path, num_inference_steps=0)


def test_sampler_steps_on_a_policy_without_a_sampler_are_refused(tmp_path):
    policy, _, _ = trained_policy("mlp")
    path = save_checkpoint(tmp_path / "ckpt", policy, config={"policy": small_config("mlp")})
    with pytest.raises(CheckpointError, match="no sampler steps"):
        load_policy(path, num_inference_steps=8)
