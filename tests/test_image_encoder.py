"""the patchify stem (encoder.stem_stride) of configs/policy/flow_image.yaml."""

import pytest
import torch
import yaml
from test_policies import CONFIGS, make_batch, make_features, make_stats, observation, small_config

from robopolicy.policies import make_policy
from robopolicy.policies.encoders import ImageEncoder, crop_images


def test_patchify_stem_shrinks_feature_maps_and_default_is_unchanged():
    default, patch = ImageEncoder([8, 16], 16), ImageEncoder([8, 16], 16, stem_stride=4)
    assert default.backbone[0].weight.shape == (8, 3, 3, 3)  # checkpoints of the default keep their shapes
    x = torch.randn(2, 3, 88, 88)
    assert default.backbone(x).shape[-2:] == (22, 22) and patch.backbone(x).shape[-2:] == (11, 11)
    with pytest.raises(ValueError, match="stem_stride"):
        ImageEncoder([8, 16], 16, stem_stride=1)


def test_flow_image_config_trains_and_samples():
    cfg = yaml.safe_load((CONFIGS / "flow_image.yaml").read_text())
    assert cfg["defaults"] == ["flow", "_self_"] and cfg["encoder"]["stem_stride"] == 4
    features = make_features(cameras=("front",))
    policy = make_policy(small_config("flow", encoder={**small_config("flow")["encoder"], "stem_stride": 4}),
                         features, make_stats(features, 0.0, 1.0))
    batch = make_batch(features, 4)
    loss, _ = policy.train().loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert policy.eval().sample_chunk(observation(batch)).shape == (4, 8, 3)


def test_random_crop_takes_one_window_per_sample():
    images = torch.arange(2 * 2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 2, 1, 6, 6)
    torch.manual_seed(0)
    crops = crop_images(images, 4, random=True)
    assert crops.shape == (2, 2, 1, 4, 4)
    for b in range(2):  # each crop is a contiguous window of its own sample, the same for both frames
        y, x = divmod(int(crops[b, 0, 0, 0, 0] - images[b, 0, 0, 0, 0]), 6)
        assert torch.equal(crops[b], images[b, :, :, y:y + 4, x:x + 4])
