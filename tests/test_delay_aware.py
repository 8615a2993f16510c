"""Delay-aware policies (training-time real-time chunking): the prefix is honoured, the learned conditioning
continues it, the checkpoint records it, older checkpoints are unaffected and the control node runs rtc for it."""

from __future__ import annotations

import pytest
import torch
import yaml
from test_policies import (
    ACTION_DIM,
    STATE_DIM,
    make_batch,
    make_features,
    make_stats,
    observation,
    small_config,
)

from real.host.local_inference import LocalInference
from real.host.server import policy_metadata
from real.robot.control_node import ControlConfig, execution_mode
from real.robot.protocol import HelloReply, decode_message, encode_message
from robopolicy.checkpoint import read_checkpoint_info, save_checkpoint
from robopolicy.loading import load_policy
from robopolicy.policies import PolicyConfigError, make_policy


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def delay_aware_policy(max_delay: int = 2, config_name: str = "flow", **overrides):
    features = make_features()
    policy = make_policy(small_config(config_name, max_delay=max_delay, **overrides), features, make_stats(features))
    return policy, features


@pytest.mark.parametrize("config_name", ["flow", "diffusion"])
def test_prefix_is_kept_exactly_and_the_chunk_is_a_function_of_obs_noise_and_prefix(config_name):
    policy, _ = delay_aware_policy(config_name=config_name)
    policy.eval()
    assert policy.delay_aware and policy.supports_prefix
    obs = {"observation.state": torch.randn(2, 2, STATE_DIM)}
    noise = torch.randn(2, *policy.noise_shape, generator=torch.Generator().manual_seed(1))
    prefix = torch.rand(2, 3, ACTION_DIM) * 1.6 - 0.8
    chunk = policy.sample_chunk(obs, noise, prefix_actions=prefix)
    torch.testing.assert_close(chunk[:, :3], prefix, atol=1e-5, rtol=0)
    assert torch.equal(chunk, policy.sample_chunk(obs, noise, prefix_actions=prefix))  # deterministic
    # an empty prefix is no prefix; the free part depends on the prefix (through x_t and the mask)
    assert torch.equal(policy.sample_chunk(obs, noise, prefix_actions=prefix[:, :0]), policy.sample_chunk(obs, noise))
    assert not torch.allclose(chunk[:, 3:], policy.sample_chunk(obs, noise, prefix_actions=-prefix)[:, 3:])
    assert not torch.allclose(chunk[:, 3:], policy.sample_chunk(obs, noise, prefix_actions=prefix[:, :2])[:, 3:])


@pytest.mark.parametrize("config_name", ["flow", "diffusion"])
def test_training_draws_prefixes_up_to_n_obs_steps_plus_max_delay_and_puts_no_loss_on_them(config_name):
    policy, features = delay_aware_policy(max_delay=2, config_name=config_name)
    lengths = policy.sample_prefix_len(4000)
    assert set(lengths.tolist()) == set(range(0, 2 + 2 + 1))  # 0: the first chunk of an episode
    batch = make_batch(features, 16)
    noise, time = policy.denoising_inputs(16)
    full = torch.full((16,), 5)
    error = policy.denoising_error(batch, noise, time, prefix_len=full)
    # the committed positions are given to the denoiser clean; moving them changes the prediction elsewhere
    shifted = {**batch, "action": batch["action"].clone()}
    shifted["action"][:, :5] += 0.3
    assert not torch.allclose(error[:, 5:], policy.denoising_error(shifted, noise, time, prefix_len=full)[:, 5:])
    # the loss leaves the prefix out: an error there changes nothing
    lengths = torch.full((16,), 3)
    masked = policy.without_prefix(batch, lengths)["action_is_pad"]
    assert masked[:, :3].all() and torch.equal(masked[:, 3:], batch["action_is_pad"][:, 3:])
    plain, _ = delay_aware_policy(max_delay=0, config_name=config_name)
    assert not plain.delay_aware and set(plain.sample_prefix_len(100).tolist()) == {0}
    assert plain.without_prefix(batch, lengths) is batch


@pytest.mark.parametrize("config_name", ["flow", "diffusion"])
def test_a_delay_aware_policy_learns_to_continue_the_committed_prefix(config_name):
    """Chunks are ramps from an offset the observation does not show: only the prefix tells where the chunk is.
    The learned conditioning continues it (flow: 0.03 mean error here, prefix inpainting of the same policy
    trained without prefixes: 0.15); without a prefix the policy can only guess."""
    torch.manual_seed(0)
    features = make_features()
    extra = {"denoiser": "mlp"} if config_name == "diffusion" else {}
    policy = make_policy(small_config(config_name, max_delay=2, **extra), features, make_stats(features)).train()

    def ramp_batch(size: int) -> dict:
        offset = torch.rand(size, 1, ACTION_DIM) * 1.2 - 0.6
        steps = 0.05 * torch.arange(8)[None, :, None]
        return {"observation.state": torch.zeros(size, 2, STATE_DIM), "action": offset + steps,
                "action_is_pad": torch.zeros(size, 8, dtype=torch.bool)}

    optimizer = torch.optim.Adam(policy.parameters(), lr=2e-3)
    for _ in range(600):
        loss, _ = policy.loss(ramp_batch(64))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.eval()
    test = ramp_batch(64)
    noise = torch.randn(64, *policy.noise_shape, generator=torch.Generator().manual_seed(2))
    obs = observation(test)
    with_prefix = policy.sample_chunk(obs, noise, prefix_actions=test["action"][:, :3])
    without = policy.sample_chunk(obs, noise)
    error_with = (with_prefix[:, 3:] - test["action"][:, 3:]).abs().mean().item()
    error_without = (without[:, 3:] - test["action"][:, 3:]).abs().mean().item()
    assert error_with < 0.08 and error_with < 0.3 * error_without, (error_with, error_without)


def test_checkpoint_records_delay_awareness_and_older_checkpoints_are_unaffected(tmp_path):
    policy, features = delay_aware_policy(max_delay=3)
    batch = make_batch(features, 8)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3)
    for _ in range(3):
        loss, _ = policy.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.eval()
    path = save_checkpoint(tmp_path / "ckpt", policy, config={"policy": small_config("flow", max_delay=3)})
    assert read_checkpoint_info(path)["config"]["policy"]["max_delay"] == 3
    loaded = load_policy(path, expect_features=features)
    assert loaded.delay_aware and loaded.max_delay == 3
    obs, noise = observation(batch, 4), torch.randn(4, *policy.noise_shape)
    prefix = batch["action"][:4, :3]
    assert torch.equal(loaded.sample_chunk(obs, noise, prefix_actions=prefix),
                       policy.sample_chunk(obs, noise, prefix_actions=prefix))

    # a checkpoint written before the setting existed (no max_delay in its config) is a plain flow policy
    torch.manual_seed(0)
    plain = make_policy(small_config("flow"), features, make_stats(features)).eval()
    old = save_checkpoint(tmp_path / "old", plain, config={"policy": small_config("flow")})
    config = yaml.safe_load((old / "config.yaml").read_text())
    del config["policy"]["max_delay"]
    (old / "config.yaml").write_text(yaml.safe_dump(config))
    reloaded = load_policy(old)
    assert not reloaded.delay_aware
    assert torch.equal(reloaded.sample_chunk(obs, noise, prefix_actions=prefix),
                       plain.sample_chunk(obs, noise, prefix_actions=prefix))  # inpainting, as before


def test_bad_max_delay_is_refused():
    with pytest.raises(PolicyConfigError, match="max_delay"):
        delay_aware_policy(max_delay=6)  # horizon 8, n_obs_steps 2: at most 5
    with pytest.raises(PolicyConfigError, match="max_delay"):
        delay_aware_policy(max_delay=-1)


def test_the_control_node_runs_rtc_for_a_delay_aware_policy_automatically():
    aware, _ = delay_aware_policy()
    plain, _ = delay_aware_policy(max_delay=0)
    assert ControlConfig().mode == "auto"
    assert execution_mode("auto", LocalInference(aware)) == "rtc"
    assert execution_mode("auto", LocalInference(plain)) == "sync"
    assert execution_mode("ensemble", LocalInference(aware)) == "ensemble"  # an explicit mode stands
    # the policy server declares it in its hello reply (protocol 4); an older peer never sees the field
    reply = policy_metadata(aware)
    assert reply.delay_aware and decode_message(encode_message(reply)).delay_aware
    assert not decode_message(encode_message(reply, version=3)).delay_aware
    assert not HelloReply({}, 1, 1, 1).delay_aware
