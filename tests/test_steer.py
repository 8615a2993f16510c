"""Latent-noise steering: a few updates on a real env give finite losses and a loadable refined checkpoint; the
noise stays inside [-noise_scale, noise_scale]."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import load_benchmark
from test_rl_core import base_ckpt, finetune_cfg, make_envs, refined  # noqa: F401  (base_ckpt is a fixture)

from robopolicy.finetune import finetune
from robopolicy.loading import load_policy
from robopolicy.rl.steer import SteerPolicy


@pytest.mark.parametrize("algo", ["steer", "steer_na"])
def test_steer_runs_updates_with_finite_losses(tmp_path, base_ckpt, algo):  # noqa: F811
    summary = finetune(finetune_cfg({"name": algo}, base_ckpt, tmp_path / "run"), make_envs, log=lambda m: None)
    assert summary["env_steps"] == 64 and summary["updates"] > 0
    assert summary["last_metrics"] and all(math.isfinite(v) for v in summary["last_metrics"].values())
    if algo == "steer_na":
        assert {"action_critic_loss", "distil_loss"} <= set(summary["last_metrics"])
    curves = json.loads((tmp_path / "run" / "curves.json").read_text())
    assert [p["env_steps"] for p in curves["eval"]] == [0, 32, 64, 64]  # start, every 32, final
    refined = load_policy(tmp_path / "run" / "checkpoints" / "last")  # what `robopolicy eval ckpt=RUN` resolves
    assert isinstance(refined, SteerPolicy) and refined.config["base"]["path"] == str(base_ckpt.resolve())


def test_steer_noise_is_bounded_by_noise_scale(base_ckpt):  # noqa: F811
    policy = refined(SteerPolicy, base_ckpt, noise_scale=0.7, hidden=[16])
    with torch.no_grad():
        for p in policy.actor.parameters():
            p.normal_(0, 10.0)  # huge pre-activations: tanh saturates
    features = torch.randn(256, policy.feature_dim) * 100
    noise = policy.latent_to_noise(policy.actor.sample(features)[0])
    assert noise.shape == (256, *policy.noise_shape)
    assert noise.abs().max() <= 0.7 + 1e-6 and noise.abs().max() > 0.69
    seen = []
    base_sample = policy.base.sample_chunk

    def spy(obs, noise):
        seen.append(noise)
        return base_sample(obs, noise)

    policy.base.sample_chunk = spy
    obs = {"observation.state": torch.randn(5, 2, *policy.features["observation.state"]["shape"])}
    policy.sample_chunk(obs, torch.randn(5, *policy.noise_shape) * 100)
    assert seen[0].abs().max() <= 0.7 + 1e-6  # the incoming noise is only the actor's epsilon


def test_steer_sampling_mode_uses_the_given_noise_as_epsilon(base_ckpt):  # noqa: F811
    policy = refined(SteerPolicy, base_ckpt, noise_scale=1.2, hidden=[16], actor_sampling="sample", latent="full")
    obs = {"observation.state": torch.randn(6, 2, *policy.features["observation.state"]["shape"])}
    noise = torch.randn(6, *policy.noise_shape)
    chunk = policy.sample_chunk(obs, noise)
    assert torch.equal(policy.sample_chunk(obs, noise), chunk)  # deterministic given the noise
    assert not torch.allclose(policy.sample_chunk(obs, torch.randn_like(noise)), chunk)
    mu, log_std = policy.actor(policy.encode(obs))
    expected = policy.base.sample_chunk(obs, policy.latent_to_noise(torch.tanh(mu + log_std.exp() * noise.flatten(1))))
    assert torch.allclose(chunk, expected, atol=1e-6)
    torch.manual_seed(3)  # no noise given (the control node's call): the runtime draws the epsilon itself
    drawn = policy.sample_chunk(obs)
    torch.manual_seed(3)
    assert torch.allclose(drawn, policy.sample_chunk(obs, torch.randn(6, *policy.noise_shape)), atol=1e-6)
    assert not torch.allclose(policy.sample_chunk(obs), drawn)
    with pytest.raises(ValueError, match="actor_sampling"):
        refined(SteerPolicy, base_ckpt, actor_sampling="mode")


def test_steer_executed_latent_steers_only_the_executed_noise(base_ckpt):  # noqa: F811
    policy = refined(SteerPolicy, base_ckpt, noise_scale=1.5, hidden=[16], latent="executed")
    assert policy.latent_dim == policy.n_exec * policy.action_dim
    latent = torch.rand(8, policy.latent_dim) * 2 - 1
    noise = policy.latent_to_noise(latent)
    assert noise.shape == (8, *policy.noise_shape)
    outside = torch.ones(policy.horizon, dtype=torch.bool)
    outside[policy.exec_slice] = False
    assert noise[:, outside].abs().max() == 0
    assert torch.allclose(noise[:, policy.exec_slice].flatten(1), 1.5 * latent)
    with pytest.raises(ValueError, match="latent"):
        refined(SteerPolicy, base_ckpt, latent="all")


def test_noise_authority_is_zero_for_a_base_that_ignores_its_noise(base_ckpt):  # noqa: F811
    authority = load_benchmark("noise_authority").authority
    base = load_policy(base_ckpt).eval()
    obs = {"observation.state": torch.randn(6, base.n_obs_steps, *base.features["observation.state"]["shape"])}
    moved = authority(base, obs, noises=8, noise_scale=1.5, seed=0)
    assert moved["observations"] == 6 and len(moved["std"]) == base.action_dim and moved["mean_std"] > 0
    sample = base.sample_chunk
    base.sample_chunk = lambda o, noise: sample(o, torch.zeros_like(noise))  # the noise has no say
    assert authority(base, obs, noises=8, noise_scale=1.5, seed=0)["mean_std"] == 0


def vib_base(folder, **encoder):
    """A small (untrained) flow policy with a VIB bottleneck on its encoder (a learned 8-d mean unless `encoder`
    says otherwise), saved as a checkpoint."""
    from test_policies import make_stats, small_config
    from test_rl_core import TASK

    import sim
    from robopolicy.checkpoint import save_checkpoint
    from robopolicy.features import features_from_env
    from robopolicy.policies import make_policy

    env = sim.make_env(TASK)
    features = features_from_env(env.observation_space, env.action_space)
    env.close()
    torch.manual_seed(0)
    cfg = small_config("flow", num_inference_steps=2)
    cfg["encoder"] = {**cfg.get("encoder", {}), "bottleneck": "vib", "bottleneck_mean": "learned", "bottleneck_dim": 8,
                      **encoder}
    policy = make_policy(cfg, features, make_stats(features, -1.0, 1.0)).eval()
    return save_checkpoint(folder, policy, config={"policy": cfg, "task": TASK})


def test_bottleneck_steering_moves_the_vib_latent_within_its_bound(tmp_path):
    base = vib_base(tmp_path / "vib_base")
    policy = refined(SteerPolicy, base, latent="bottleneck", latent_scale=0.5, hidden=[16])
    assert policy.latent_dim == policy.feature_dim == 8
    seen = []
    sample = policy.base.sample_from_features

    def spy(features, noise=None, prefix_actions=None):
        seen.append(features)
        return sample(features, noise)

    policy.base.sample_from_features = spy
    obs = {"observation.state": torch.randn(5, 2, *policy.features["observation.state"]["shape"])}
    with torch.no_grad():
        for p in policy.actor.parameters():
            p.normal_(0, 10.0)  # saturated residuals
    noise = torch.randn(5, *policy.noise_shape)
    chunk = policy.sample_chunk(obs, noise)
    z = policy.encode(obs)
    assert (seen[0] - z).abs().max() <= 0.5 + 1e-5 and (seen[0] - z).abs().max() > 0.45
    assert torch.allclose(chunk, sample(seen[0], noise), atol=1e-6)  # the noise goes to the base
    with pytest.raises(ValueError, match="bottleneck=vib"):
        refined(SteerPolicy, base_ckpt_plain(tmp_path), latent="bottleneck")


def test_bottleneck_steering_starts_as_its_base_and_can_decide_every_step(tmp_path):
    base = vib_base(tmp_path / "vib_base")
    policy = refined(SteerPolicy, base, latent="bottleneck", latent_scale=1.0, hidden=[16], n_action_steps=1)
    assert policy.n_action_steps == policy.n_exec == 1 and policy.base.n_action_steps > 1
    obs = {"observation.state": torch.randn(64, 2, *policy.features["observation.state"]["shape"]) * 3}
    noise = torch.randn(64, *policy.noise_shape)
    residual = policy.actor.deterministic(policy.encode(obs))
    assert residual.abs().max() < 0.05  # the actor starts near a zero residual ...
    moved = (policy.sample_chunk(obs, noise) - policy.base.sample_chunk(obs, noise)).abs().max()
    saturated = (policy.base.sample_from_features(policy.encode(obs) + 1.0, noise)
                 - policy.base.sample_chunk(obs, noise)).abs().max()
    assert moved < 0.1 * saturated  # ... so the refined policy starts close to its base
    noise_steer = refined(SteerPolicy, base, latent="executed", hidden=[16])  # a noise actor starts spread
    assert noise_steer.actor.deterministic(noise_steer.encode(obs)).abs().max() > 0.1
    assert SteerPolicy.config_from({"latent": "bottleneck", "n_action_steps": 1}).n_action_steps == 1
    with pytest.raises(ValueError, match="n_action_steps"):
        refined(SteerPolicy, base, latent="bottleneck", hidden=[16], n_action_steps=99)


def test_bottleneck_steering_explores_progressively_and_noise_steering_always_steers(tmp_path, base_ckpt):  # noqa: F811
    from robopolicy.rl.steer import Steer, SteerConfig

    cfg = SteerConfig(latent="bottleneck", explore_start=0.2, explore_steps=1000, hidden=[16])
    policy = SteerPolicy(cfg, load_policy(vib_base(tmp_path / "vib_base")), {"path": "x", "sha256": "y"})
    method = Steer(policy, cfg, seed=0)
    assert method.enabled_fraction(0) == 0.2 and method.enabled_fraction(5000) == 1.0
    method.enabled = {0: False, 1: True}
    obs = {"observation.state": torch.randn(2, 2, *policy.features["observation.state"]["shape"])}
    latent, actions, _ = method.act(obs, method.observe(obs), [0, 1], explore=True)
    assert torch.equal(latent[0], torch.zeros_like(latent[0])) and latent[1].abs().sum() > 0  # the base alone in 0
    assert method.act(obs, method.observe(obs), [0, 1], explore=False)[0][0].abs().sum() > 0  # eval: always on
    noise_cfg = SteerConfig(latent="executed", explore_start=0.2, explore_steps=1000, hidden=[16])
    noise_method = Steer(refined(SteerPolicy, base_ckpt, latent="executed", hidden=[16]), noise_cfg, seed=0)
    for i in range(20):
        noise_method.start_episode(i, 0)
    assert noise_method.enabled_fraction(0) == 1.0 and not noise_method.enabled  # zero noise is no "base alone"


def base_ckpt_plain(tmp_path):
    from test_rl_core import make_base

    return make_base(tmp_path / "plain")


def test_bottleneck_steering_finetunes_and_reloads(tmp_path):
    base = vib_base(tmp_path / "vib_base")
    summary = finetune(finetune_cfg({"name": "steer", "latent": "bottleneck"}, base, tmp_path / "run"), make_envs,
                       log=lambda m: None)
    assert summary["updates"] > 0 and all(math.isfinite(v) for v in summary["last_metrics"].values())
    policy = load_policy(tmp_path / "run" / "checkpoints" / "last")
    assert isinstance(policy, SteerPolicy) and policy.latent == "bottleneck"


def test_vib_encoder_compresses_features_and_adds_its_kl_to_the_loss(tmp_path):
    policy = load_policy(vib_base(tmp_path / "vib_base"))
    obs = {"observation.state": torch.randn(4, 2, *policy.features["observation.state"]["shape"])}
    assert policy.encode(obs).shape == (4, 8) and torch.equal(policy.encode(obs), policy.encode(obs))  # eval: mean
    policy.train()
    assert not torch.equal(policy.encode(obs), policy.encode(obs))  # training: a sample of q(z | obs)
    batch = {**obs, "action": torch.rand(4, policy.horizon, policy.action_dim) * 2 - 1}
    torch.manual_seed(0)
    loss, metrics = policy.loss(batch)
    assert metrics["encoder_penalty"] > 0 and math.isclose(loss.item(), metrics["loss"] + metrics["encoder_penalty"],
                                                           rel_tol=1e-5)


def test_vib_latent_comes_from_an_mlp_of_the_features_or_one_linear_layer(tmp_path):
    for hidden, layers in ((16, [torch.nn.Linear, torch.nn.Mish, torch.nn.Linear]), (0, [torch.nn.Linear])):
        policy = load_policy(vib_base(tmp_path / f"vib_{hidden}", bottleneck_hidden=hidden))
        encoder = policy.obs_encoder
        state = torch.zeros(1, policy.n_obs_steps, *policy.features["observation.state"]["shape"])
        width = encoder.features({"observation.state": state}).shape[-1]  # the features before the bottleneck
        modules = list(encoder.vib) if hidden else [encoder.vib]
        assert [type(m) for m in modules] == layers and modules[0].in_features == width
        head = modules[-1]  # -> [mean, log-variance] of the 8-d latent
        assert head.in_features == (hidden or width) and head.out_features == 16
        assert torch.all(head.bias[8:] == -4.0)  # starts nearly deterministic: std e^-2 per latent dimension


def test_a_vib_checkpoint_from_before_bottleneck_hidden_loads_with_its_linear_head(tmp_path):
    """Checkpoints written before `bottleneck_hidden` and `bottleneck_mean` existed had one linear layer to a learned
    mean; the new defaults (an MLP, the identity mean) must not change what they build (robopolicy/checkpoint.py:
    LATER_KEYS)."""
    import yaml

    folder = vib_base(tmp_path / "old_vib", bottleneck_hidden=0)
    saved = load_policy(folder)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    del config["policy"]["encoder"]["bottleneck_hidden"]
    del config["policy"]["encoder"]["bottleneck_mean"]
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    policy = load_policy(folder)
    assert isinstance(policy.obs_encoder.vib, torch.nn.Linear)
    obs = {"observation.state": torch.randn(2, policy.n_obs_steps, *policy.features["observation.state"]["shape"])}
    assert torch.equal(policy.encode(obs), saved.encode(obs))


def test_noise_authority_reports_a_vib_latent_spread(tmp_path):
    bench = load_benchmark("noise_authority")
    base = load_policy(vib_base(tmp_path / "vib_base"))
    obs = {"observation.state": torch.randn(4, base.n_obs_steps, *base.features["observation.state"]["shape"])}
    moved = bench.latent_authority(base, obs, residuals=8, latent_scale=2.0, seed=0)
    assert moved["observations"] == 4 and moved["mean_std"] > 0
    assert bench.latent_authority(base, obs, residuals=8, latent_scale=0.0, seed=0)["mean_std"] == 0


def test_identity_vib_latent_is_the_features_with_a_learned_noise(tmp_path):
    """`bottleneck_mean: identity` (the default): the latent's mean is the encoder's features, unchanged, and only
    its log-variance is learned; its KL still enters the loss, and steering perturbs the features themselves."""
    policy = load_policy(vib_base(tmp_path / "vib_id", bottleneck_mean="identity", bottleneck_hidden=16))
    encoder = policy.obs_encoder
    obs = {"observation.state": torch.randn(4, 2, *policy.features["observation.state"]["shape"])}
    features = encoder.features(policy.normalize_obs(obs))
    width = features.shape[-1]
    assert encoder.out_dim == width and encoder.vib[-1].out_features == width  # log-variance only
    assert torch.equal(policy.encode(obs), features)  # eval: the mean, i.e. the features
    policy.train()
    z, kl = encoder.encode_with_kl(policy.normalize_obs(obs))
    assert not torch.equal(z, features) and (z - features).abs().max() < 1.0  # a sample, std ~e^-2 at first
    loss, metrics = policy.loss({**obs, "action": torch.rand(4, policy.horizon, policy.action_dim) * 2 - 1})
    loss.backward()
    assert metrics["encoder_penalty"] > 0 and encoder.vib[-1].bias.grad.abs().sum() > 0
    steer = refined(SteerPolicy, vib_base(tmp_path / "vib_id2", bottleneck_mean="identity"), latent="bottleneck",
                    hidden=[16])
    assert steer.latent_dim == steer.feature_dim == width


def test_bottleneck_steering_through_the_base_differentiates_its_sampler_and_trains(tmp_path):
    from robopolicy.rl.steer import SteerNAConfig, SteerNoiseAliased

    base = vib_base(tmp_path / "vib_base")
    cfg = SteerNAConfig(latent="bottleneck", actor_gradient="through_base", latent_scale=0.5, hidden=[16])
    policy = SteerPolicy(cfg, load_policy(base), {"path": "x", "sha256": "y"})
    obs = {"observation.state": torch.randn(5, 2, *policy.features["observation.state"]["shape"])}
    latent = (torch.rand(5, policy.latent_dim) * 2 - 1).requires_grad_(True)
    torch.manual_seed(3)
    executed = policy.normalized_executed(obs, latent)
    torch.manual_seed(3)  # the same base noise: what the runtime executes for this latent, in normalized units
    chunk = policy.steered_chunk(obs, latent.detach(), policy.base.draw_noise(5))
    assert torch.allclose(executed.detach(), policy.normalize_actions(chunk)[:, policy.exec_slice].flatten(1),
                          atol=1e-5)
    executed.sum().backward()
    assert latent.grad is not None and latent.grad.abs().sum() > 0  # the actor's gradient reaches the latent
    noise_cfg = SteerNAConfig(latent="executed", actor_gradient="through_base", hidden=[16])
    with pytest.raises(ValueError, match="latent: bottleneck"):
        SteerNoiseAliased(refined(SteerPolicy, base_ckpt_plain(tmp_path), hidden=[16]), noise_cfg)
    summary = finetune(finetune_cfg({"name": "steer_na", "latent": "bottleneck", "actor_gradient": "through_base"},
                                    base, tmp_path / "run"), make_envs, log=lambda m: None)
    metrics = summary["last_metrics"]
    assert summary["updates"] > 0 and all(math.isfinite(v) for v in metrics.values())
    assert "action_critic_loss" in metrics and "distil_loss" not in metrics  # no distillation on this path
