"""Policies: the runtime contract (shapes, robot units, determinism), training signal, and multimodality."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from robopolicy.policies import POLICIES, NormalizationError, PolicyConfigError, make_policy

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "policy"
POLICY_CONFIGS = ["flow", "diffusion", "diffusion_transformer", "mlp"]
GENERATIVE = ["flow", "diffusion", "diffusion_transformer"]
STATE_DIM, ACTION_DIM, IMAGE_SIZE = 6, 3, 32


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: one thread avoids OpenMP hand-off costs (and contention with parallel test workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_config(config_name: str, **overrides) -> dict:
    """The shipped config shrunk so a CPU test step takes milliseconds."""
    cfg = yaml.safe_load((CONFIGS / f"{config_name}.yaml").read_text())
    cfg.update(horizon=8, n_obs_steps=2, n_action_steps=4)
    cfg["encoder"].update(image_channels=[8, 16], image_feature_dim=16, num_keypoints=8, crop=28)
    if "unet" in cfg:
        cfg["unet"].update(down_dims=[32, 64], step_embed_dim=32)
    if "mlp" in cfg:
        cfg["mlp"].update(hidden_dim=64, n_blocks=2, step_embed_dim=32)
    if "transformer" in cfg:
        cfg["transformer"].update(d_model=32, n_layers=2, n_heads=2)
    if "hidden_dims" in cfg:
        cfg["hidden_dims"] = [64, 64]
    cfg.update(overrides)
    return cfg


def make_features(cameras: tuple[str, ...] = (), state_dim: int = STATE_DIM, action_dim: int = ACTION_DIM) -> dict:
    features = {
        "observation.state": {"dtype": "float32", "shape": [state_dim], "names": None},
        "action": {"dtype": "float32", "shape": [action_dim], "names": None},
        "next.reward": {"dtype": "float32", "shape": [], "names": None},  # not a policy feature: ignored
    }
    for cam in cameras:
        features[f"observation.images.{cam}"] = {"dtype": "uint8", "shape": [IMAGE_SIZE, IMAGE_SIZE, 3], "names": None}
    return features


def make_stats(features: dict, low: float = -1.0, high: float = 1.0) -> dict:
    stats = {}
    for key, spec in features.items():
        dims = 3 if key.startswith("observation.images.") else int(np.prod(spec["shape"]))
        stats[key] = {
            "min": np.full(dims, low, np.float32), "max": np.full(dims, high, np.float32),
            "mean": np.full(dims, (low + high) / 2, np.float32), "std": np.full(dims, (high - low) / 4, np.float32),
            "q01": np.full(dims, low, np.float32), "q99": np.full(dims, high, np.float32),
        }
    return stats


def make_batch(features: dict, batch_size: int, horizon: int = 8, n_obs_steps: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for key, spec in features.items():
        if key.startswith("observation.images."):
            batch[key] = torch.randint(0, 256, (batch_size, n_obs_steps, *spec["shape"]), generator=g,
                                       dtype=torch.uint8)
        elif key.startswith("observation."):
            batch[key] = torch.rand(batch_size, n_obs_steps, *spec["shape"], generator=g) * 2 - 1
    # Actions a smooth function of the state so there is something to learn.
    state = batch["observation.state"][:, -1]
    phase = torch.linspace(0, 1, horizon)[None, :, None]
    batch["action"] = torch.tanh(state[:, None, :ACTION_DIM] + phase)  # [B, H, A]
    batch["action_is_pad"] = torch.zeros(batch_size, horizon, dtype=torch.bool)
    batch["action_is_pad"][:, -2:] = True
    return batch


def observation(batch: dict, size: int | None = None) -> dict:
    return {k: v[:size] for k, v in batch.items() if k.startswith("observation.")}


def overfit(policy, batch: dict, steps: int, lr: float = 1e-3) -> list[float]:
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    policy.train()
    losses = []
    for _ in range(steps):
        loss, metrics = policy.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(metrics["loss"])
    return losses


def test_registry_names_the_shipped_policies():
    assert {"flow", "diffusion", "mlp"} <= set(POLICIES)
    for name in POLICY_CONFIGS:
        cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        assert cfg["name"] in POLICIES
        assert {"horizon", "n_obs_steps", "n_action_steps", "optim"} <= set(cfg)


@pytest.mark.parametrize("config_name", POLICY_CONFIGS)
def test_loss_is_finite_and_decreases_when_overfitting(config_name):
    torch.manual_seed(0)
    features = make_features()
    policy = make_policy(small_config(config_name), features, make_stats(features))
    losses = overfit(policy, make_batch(features, 64), steps=60)
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])


@pytest.mark.parametrize("config_name", POLICY_CONFIGS)
def test_sample_chunk_shape_units_and_determinism(config_name):
    torch.manual_seed(0)
    features = make_features()
    # Actions live in [10, 20] robot units; the policy works in [-1, 1] inside.
    stats = make_stats(features)
    stats["action"].update(min=np.full(ACTION_DIM, 10.0, np.float32), max=np.full(ACTION_DIM, 20.0, np.float32))
    policy = make_policy(small_config(config_name), features, stats).eval()
    obs = observation(make_batch(features, 5))
    assert policy.noise_shape == (8, ACTION_DIM)
    noise = torch.randn(5, *policy.noise_shape)
    chunk = policy.sample_chunk(obs, noise)
    assert chunk.shape == (5, 8, ACTION_DIM) and chunk.dtype == torch.float32
    assert not chunk.requires_grad
    assert torch.equal(chunk, policy.sample_chunk(obs, noise.clone()))
    assert policy.sample_chunk(obs).shape == chunk.shape  # noise=None draws its own
    if config_name in GENERATIVE:
        # Clipped in normalized space, so always inside the action range in robot units.
        assert chunk.min() >= 10.0 - 1e-4 and chunk.max() <= 20.0 + 1e-4
        assert not torch.allclose(chunk, policy.sample_chunk(obs, torch.randn(5, *policy.noise_shape)))
    else:
        assert torch.equal(chunk, policy.sample_chunk(obs, torch.randn(5, *policy.noise_shape)))


@pytest.mark.parametrize("config_name, options", [
    ("flow", {"denoiser": "mlp"}), ("flow", {"denoiser": "unet"}), ("flow", {"denoiser": "transformer"}),
    ("diffusion", {"denoiser": "mlp", "prediction_type": "sample"}),
    ("diffusion", {"denoiser": "mlp", "prediction_type": "epsilon"}),
    ("diffusion", {"denoiser": "unet", "prediction_type": "epsilon"}),
])
def test_every_denoiser_learns_and_samples_deterministically(config_name, options):
    torch.manual_seed(0)
    features = make_features()
    cfg = small_config(config_name, **options)
    cfg.setdefault("transformer", {"d_model": 32, "n_layers": 2, "n_heads": 2})
    policy = make_policy(cfg, features, make_stats(features))
    losses = overfit(policy, make_batch(features, 64), steps=60)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
    obs, noise = observation(make_batch(features, 3)), torch.randn(3, *policy.noise_shape)
    chunk = policy.eval().sample_chunk(obs, noise)
    assert chunk.shape == (3, 8, ACTION_DIM) and torch.equal(chunk, policy.sample_chunk(obs, noise.clone()))


def test_normalizer_round_trip_in_robot_units():
    features = make_features()
    stats = make_stats(features)
    stats["action"].update(min=np.array([-3.0, 0.0, 5.0], np.float32), max=np.array([3.0, 0.0, 9.0], np.float32))
    for mode in ("min_max", "mean_std"):
        policy = make_policy(small_config("flow", normalization={"action": mode}), features, stats)
        actions = torch.tensor([[[-3.0, 0.0, 5.0], [3.0, 0.0, 9.0], [1.0, 0.0, 7.0]]])
        normalized = policy.normalizer.normalize("action", actions)
        if mode == "min_max":
            # [min, max] -> [-1, 1]; a constant dimension maps to 0 rather than dividing by zero.
            assert torch.allclose(normalized[0, :2], torch.tensor([[-1.0, 0.0, -1.0], [1.0, 0.0, 1.0]]))
        assert torch.allclose(policy.unnormalize_actions(normalized), actions, atol=1e-5)


def test_state_bound_clamps_the_normalized_state_and_nothing_else():
    """normalization.state_bound: min_max from demos in which a feature hardly moved scales it by hundreds, so a
    state outside their range reached the network as +-250; the bound clamps it, in training and in sampling, and
    leaves states inside it, images and actions as they were."""
    features = make_features(cameras=("front",))
    stats = make_stats(features)
    stats["observation.state"].update(min=np.full(STATE_DIM, -0.01, np.float32), max=np.full(STATE_DIM, 0.01, np.float32))
    stats["observation.images.front"].update(std=np.full(3, 0.01, np.float32))  # images normalized up to +-100
    torch.manual_seed(0)
    free = make_policy(small_config("flow"), features, stats).eval()
    bounded = make_policy(small_config("flow", normalization={"state_bound": 3.0}), features, stats).eval()
    bounded.load_state_dict(free.state_dict())
    batch = make_batch(features, 4)
    inside = {**observation(batch), "observation.state": batch["observation.state"] * 0.01}  # normalized [-1, 1]
    assert torch.equal(bounded.encode(inside), free.encode(inside))
    knocked = {**inside, "observation.state": batch["observation.state"] * 2.5}
    assert free.normalize_obs(knocked)["observation.state"].abs().max() > 200
    clamped = bounded.normalize_obs(knocked)
    assert clamped["observation.state"].abs().max() == 3.0
    image = "observation.images.front"
    assert torch.equal(clamped[image], free.normalize_obs(knocked)[image]) and clamped[image].abs().max() > 3.0
    actions = torch.full((1, 8, ACTION_DIM), 100.0)
    assert torch.equal(bounded.normalized_actions({"action": actions}), free.normalized_actions({"action": actions}))
    # what the network gets is the state at the bound, in raw units +-0.03
    at_bound = {**knocked, "observation.state": knocked["observation.state"].clamp(-0.03, 0.03)}
    noise = torch.randn(4, *free.noise_shape)
    assert torch.allclose(bounded.sample_chunk(knocked, noise), free.sample_chunk(at_bound, noise), atol=1e-5)
    losses = []
    for policy, obs in ((bounded.train(), knocked), (free.train(), at_bound)):
        torch.manual_seed(1)
        losses.append(policy.loss({**batch, **obs})[0])
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    with pytest.raises(PolicyConfigError, match="state_bound"):
        make_policy(small_config("flow", normalization={"state_bound": 0.0}), features, stats)


def test_mlp_learns_actions_in_robot_units():
    torch.manual_seed(0)
    features = make_features()
    stats = make_stats(features)
    stats["action"].update(min=np.full(ACTION_DIM, 100.0, np.float32), max=np.full(ACTION_DIM, 104.0, np.float32))
    batch = make_batch(features, 32)
    batch["action"] = 102.0 + batch["action"]  # in [101, 103] robot units
    policy = make_policy(small_config("mlp"), features, stats)
    overfit(policy, batch, steps=150)
    chunk = policy.eval().sample_chunk(observation(batch))
    valid = ~batch["action_is_pad"]
    assert (chunk - batch["action"])[valid].abs().mean() < 0.1


def test_loss_ignores_padded_actions():
    features = make_features()
    policy = make_policy(small_config("mlp"), features, make_stats(features))
    batch = make_batch(features, 8)
    loss, _ = policy.loss(batch)
    batch["action"][batch["action_is_pad"]] = 1e6
    assert torch.allclose(policy.loss(batch)[0], loss)


@pytest.mark.parametrize("config_name", ["flow", "diffusion", "mlp"])
def test_two_cameras_and_state(config_name):
    torch.manual_seed(0)
    features = make_features(cameras=("front", "wrist"))
    policy = make_policy(small_config(config_name), features, make_stats(features, 0.0, 1.0))
    assert len(policy.obs_encoder.image_encoders) == 2
    batch = make_batch(features, 4)
    loss, _ = policy.train().loss(batch)  # random crops
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in policy.obs_encoder.image_encoders.parameters())
    policy.eval()
    features_out = policy.encode(observation(batch))
    # state history (2 x 6) + 2 cameras x 2 frames x 16 image features
    assert features_out.shape == (4, 2 * STATE_DIM + 2 * 2 * 16) == (4, policy.obs_encoder.out_dim)
    noise = torch.randn(4, *policy.noise_shape)
    chunk = policy.sample_chunk(observation(batch), noise)
    assert chunk.shape == (4, 8, ACTION_DIM)
    assert torch.equal(chunk, policy.sample_chunk(observation(batch), noise))  # centre crop at eval
    # The cameras matter: another wrist image changes the encoding.
    other = observation(batch)
    other["observation.images.wrist"] = torch.flip(other["observation.images.wrist"], dims=[0])
    assert not torch.allclose(policy.encode(other), features_out)


def test_shared_image_encoder_and_longer_history_is_trimmed():
    features = make_features(cameras=("front", "wrist"))
    cfg = small_config("flow")
    cfg["encoder"]["share_image_encoder"] = True
    policy = make_policy(cfg, features, make_stats(features, 0.0, 1.0)).eval()
    assert len(policy.obs_encoder.image_encoders) == 1
    obs = observation(make_batch(features, 2, n_obs_steps=4))
    assert torch.equal(policy.encode(obs), policy.encode({k: v[:, -2:] for k, v in obs.items()}))


def test_config_accepts_omegaconf_and_rejects_bad_input():
    features = make_features()
    policy = make_policy(OmegaConf.create(small_config("flow")), features, make_stats(features))
    assert policy.horizon == 8 and policy.n_obs_steps == 2 and policy.n_action_steps == 4
    assert policy.action_dim == ACTION_DIM and set(policy.features) == {"observation.state", "action"}
    with pytest.raises(PolicyConfigError, match="'nope'"):
        make_policy({**small_config("flow"), "name": "nope"}, features, make_stats(features))
    with pytest.raises(PolicyConfigError, match="horizon"):
        make_policy(small_config("flow", horizon=4), features, make_stats(features))
    stats = make_stats(features)
    del stats["observation.state"]
    with pytest.raises(NormalizationError, match="observation.state"):
        make_policy(small_config("flow"), features, stats)
    stats = make_stats(features)
    stats["action"]["max"] = np.ones(7, np.float32)
    with pytest.raises(NormalizationError, match="'action'/'max'"):
        make_policy(small_config("flow"), features, stats)
    with pytest.raises(KeyError, match="observation.state"):
        make_policy(small_config("flow"), features, make_stats(features)).sample_chunk({})


def bimodal_batch(batch_size: int) -> dict:
    """Constant observation; the whole action chunk is +1 or -1 with equal probability."""
    sign = torch.where(torch.rand(batch_size) < 0.5, -1.0, 1.0)
    return {
        "observation.state": torch.zeros(batch_size, 2, 1),
        "action": sign[:, None, None].expand(batch_size, 8, 1).clone(),
        "action_is_pad": torch.zeros(batch_size, 8, dtype=torch.bool),
    }


@pytest.mark.parametrize("config_name, steps, batch_size, down_dims, lr", [
    ("flow", 300, 128, [32, 64], 2e-3),
    ("diffusion", 200, 64, [16, 32], 3e-3),
    ("mlp", 150, 64, None, 2e-3),
])
def test_generative_policies_fit_two_modes_that_mlp_averages(config_name, steps, batch_size, down_dims, lr):
    torch.manual_seed(0)
    features = make_features(state_dim=1, action_dim=1)
    cfg = small_config(config_name)
    if down_dims:
        cfg["unet"]["down_dims"] = down_dims
    else:
        cfg["loss_type"] = "mse"  # the mean of the modes; L1's median is anywhere between them
    # Stats wider than the data so +-1 are not the clipping bounds (the clip would make this trivial).
    policy = make_policy(cfg, features, make_stats(features, -2.0, 2.0))
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    for _ in range(steps):
        loss, _ = policy.train().loss(bimodal_batch(batch_size))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    chunk_means = policy.eval().sample_chunk({"observation.state": torch.zeros(200, 2, 1)}).mean(dim=(1, 2))
    if config_name == "mlp":
        assert chunk_means.abs().max() < 0.3
    else:
        distance_to_mode = (chunk_means.abs() - 1).abs()
        assert distance_to_mode.median() < 0.25
        assert 0.25 < (chunk_means > 0).float().mean() < 0.75  # both modes are sampled


def test_flow_time_grid_and_the_sampler_of_older_checkpoints(tmp_path):
    import json

    from robopolicy.checkpoint import save_checkpoint
    from robopolicy.loading import load_policy

    features = make_features()
    stats = make_stats(features)
    policy = make_policy(small_config("flow", num_inference_steps=4), features, stats).eval()
    grid = policy.time_grid()
    assert grid[0] == 0.0 and grid[-1] == 1.0 and all(a < b for a, b in zip(grid, grid[1:]))
    assert grid[1] - grid[0] > grid[-1] - grid[-2]  # schedule_power > 1: the long step comes first

    # A format-1 checkpoint saved before schedule_power, clip_prediction, time_sampling and prediction_type existed
    # keeps its uniform, unclipped Euler sampler on velocity (the code's fallbacks then).
    folder = save_checkpoint(tmp_path / "old", policy, config={})
    info = json.loads((folder / "features.json").read_text())
    (folder / "features.json").write_text(json.dumps({**info, "format_version": 1}))
    config = yaml.safe_load((folder / "config.yaml").read_text())
    for key in ("schedule_power", "clip_prediction", "time_sampling", "prediction_type"):
        del config["policy"][key]
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    old = load_policy(folder)
    assert old.time_grid() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert (old.prediction_type, old.time_sampling, old.clip_prediction) == ("velocity", "beta", False)
    obs = observation(make_batch(features, 3), 3)
    noise = torch.randn(3, *old.noise_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond, x = old.encode(obs), noise.clone()
        for i in range(4):
            x = x + 0.25 * old.denoiser(x, torch.full((3,), i * 0.25 * 100.0), cond)
    expected = old.unnormalize_actions(x.clamp(-1.0, 1.0))
    torch.testing.assert_close(old.sample_chunk(obs, noise), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(PolicyConfigError, match="schedule_power"):
        make_policy(small_config("flow", schedule_power=0.0), features, stats)


# ------------------------------------------------------------------------------------ declared capabilities


@pytest.mark.parametrize("config_name", GENERATIVE)
def test_a_prefix_policy_keeps_the_committed_prefix_and_generates_the_rest(config_name):
    features = make_features()
    policy = make_policy(small_config(config_name, num_inference_steps=4), features, make_stats(features)).eval()
    assert policy.supports_prefix
    obs = {"observation.state": torch.randn(2, 2, STATE_DIM)}
    noise = torch.randn(2, *policy.noise_shape, generator=torch.Generator().manual_seed(1))
    prefix = torch.rand(2, 3, ACTION_DIM) * 1.6 - 0.8
    chunk = policy.sample_chunk(obs, noise, prefix_actions=prefix)
    torch.testing.assert_close(chunk[:, :3], prefix, atol=1e-5, rtol=0)
    # an empty prefix is no prefix; with one, the free part depends on it
    torch.testing.assert_close(policy.sample_chunk(obs, noise, prefix_actions=prefix[:, :0]),
                               policy.sample_chunk(obs, noise))
    other = policy.sample_chunk(obs, noise, prefix_actions=-prefix)
    assert not torch.allclose(chunk[:, 3:], other[:, 3:])


def test_a_policy_without_prefix_support_refuses_a_prefix_instead_of_ignoring_it():
    features = make_features()
    policy = make_policy(small_config("mlp"), features, make_stats(features)).eval()
    assert not policy.supports_prefix
    obs = {"observation.state": torch.randn(1, 2, STATE_DIM)}
    with pytest.raises(ValueError, match="supports_prefix"):
        policy.sample_chunk(obs, prefix_actions=torch.zeros(1, 2, ACTION_DIM))


def test_film_key_modulates_the_state_by_a_code_and_learns_a_selection():
    """encoder.film_key: the named low-dim key (a goal one-hot) scales and shifts the other state features. It
    starts as no modulation (zero-initialised), reaches the denoiser, and fits "the action is the state dimension
    the code names" (a product of code and state) that the policy must otherwise build additively."""
    torch.manual_seed(0)
    features = {**make_features(), "observation.goal": {"dtype": "float32", "shape": [3], "names": None}}
    cfg = small_config("mlp")
    cfg["encoder"] = {**cfg["encoder"], "film_key": "observation.goal", "film_dim": 64}
    policy = make_policy(cfg, features, make_stats(features, low=-1.0, high=1.0))
    encoder = policy.obs_encoder
    assert encoder.lowdim_keys == ["observation.state"] and encoder.out_dim == 64 + 3
    assert all(float(p.detach().abs().sum()) == 0.0 for p in encoder.film.modulation[-1].parameters())

    batch = make_batch(features, 256, n_obs_steps=2, seed=1)
    pick = torch.randint(0, 3, (256,))
    batch["observation.goal"] = torch.nn.functional.one_hot(pick, 3).float()[:, None].expand(-1, 2, -1) * 2 - 1
    chosen = batch["observation.state"][:, -1].gather(1, pick[:, None])  # [B, 1]
    batch["action"] = chosen[:, None].expand(-1, 8, ACTION_DIM).tanh()
    losses = overfit(policy, batch, steps=300, lr=3e-3)
    assert np.mean(losses[-10:]) < 0.1 * np.mean(losses[:5])
    assert any(float(p.detach().abs().sum()) > 0.0 for p in encoder.film.modulation[-1].parameters())
    # the code reaches the action: the same state with another goal gives another chunk
    obs = observation(batch, 8)
    other = {**obs, "observation.goal": obs["observation.goal"].roll(1, dims=-1)}
    policy.eval()
    assert (policy.sample_chunk(obs) - policy.sample_chunk(other)).abs().mean() > 0.05


def test_film_key_must_name_a_low_dim_key():
    features = make_features()
    cfg = small_config("flow")
    cfg["encoder"] = {**cfg["encoder"], "film_key": "observation.goal"}
    with pytest.raises(ValueError, match="film_key 'observation.goal' is not a low-dim observation key"):
        make_policy(cfg, features, make_stats(features))
