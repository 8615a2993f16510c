"""Observation encoders: low-dim state history and per-camera image CNNs, concatenated into one feature vector.

Inputs are already normalized by the policy's `Normalizer`: low-dim keys [B, To, D], images [B, To, 3, H, W].
GroupNorm everywhere (not BatchNorm) so EMA weights and batch-size-1 inference behave like training.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from robopolicy.config import setting
from robopolicy.data.spec import IMAGE_PREFIX


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResidualConvBlock(nn.Module):
    """conv-GN-Mish-conv-GN plus a (strided 1x1) shortcut, ResNet basic-block style."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            _group_norm(out_channels),
            nn.Mish(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            _group_norm(out_channels),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and in_channels == out_channels
            else nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                               _group_norm(out_channels))
        )
        self.act = nn.Mish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class SpatialSoftmax(nn.Module):
    """Keypoints as the expected (x, y) of a softmax over each feature map (Levine et al. 2016)."""

    def __init__(self, in_channels: int, num_keypoints: int):
        super().__init__()
        self.keypoints = nn.Conv2d(in_channels, num_keypoints, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heat = self.keypoints(x)  # [N, K, h, w]
        n, k, h, w = heat.shape
        attention = heat.flatten(2).softmax(-1)  # [N, K, h*w]
        ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1)  # [h*w, 2]
        return (attention @ grid).reshape(n, 2 * k)  # "n k (x y) -> n (k 2)"


class ImageEncoder(nn.Module):
    """Small ResNet: a strided stem (`stem_stride`), one strided residual block per extra width, pooled to
    `feature_dim`."""

    def __init__(self, channels: list[int], feature_dim: int, pooling: str = "spatial_softmax",
                 num_keypoints: int = 32, stem_stride: int = 2):
        super().__init__()
        if stem_stride < 2:
            raise ValueError(f"encoder.stem_stride {stem_stride} must be at least 2.")
        # stride 2: a 3x3 conv (the default); larger: a non-overlapping patchify conv (ConvNeXt-style), which
        # shrinks every later feature map by stem_stride / 2 per side (at 4: a quarter of the positions).
        kernel, padding = (3, 1) if stem_stride == 2 else (stem_stride, 0)
        layers: list[nn.Module] = [
            nn.Conv2d(3, channels[0], kernel, stride=stem_stride, padding=padding, bias=False),
            _group_norm(channels[0]),
            nn.Mish(),
        ]
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers.append(ResidualConvBlock(c_in, c_out, stride=2))
        self.backbone = nn.Sequential(*layers)
        if pooling == "spatial_softmax":
            self.pool = SpatialSoftmax(channels[-1], num_keypoints)
            pooled = 2 * num_keypoints
        elif pooling == "avg":
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            pooled = channels[-1]
        else:
            raise ValueError(f"encoder.pooling {pooling!r} is unknown; use 'spatial_softmax' or 'avg'.")
        self.head = nn.Sequential(nn.Linear(pooled, feature_dim), nn.LayerNorm(feature_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # [N, 3, H, W] -> [N, F]
        return self.head(self.pool(self.backbone(images)))


def crop_images(images: torch.Tensor, size: int, random: bool) -> torch.Tensor:
    """Square crop of [B, To, C, H, W]: a random offset per window (same for its To frames) or the centre."""
    b, _, _, h, w = images.shape
    if size >= h and size >= w:
        return images
    if not random:
        top, left = (h - size) // 2, (w - size) // 2
        return images[..., top:top + size, left:left + size]
    top = torch.randint(0, h - size + 1, (b,), device=images.device)
    left = torch.randint(0, w - size + 1, (b,), device=images.device)
    # One slice per window, then a stack: plain strided copies rather than one gather over 5 broadcast index
    # tensors, which built a [B, T, C, size, size] index set per batch.
    return torch.stack([images[i, ..., y:y + size, x:x + size]
                        for i, (y, x) in enumerate(zip(top.tolist(), left.tolist()))])


class FiLMStateEncoder(nn.Module):
    """State features modulated by a code (a goal or task vector): h = Linear(state), then per dimension
    h * (1 + scale(code)) + shift(code), Mish, Linear; returns [those features, the code].

    Taking "the offset of whichever object the code names" is a product of code and state, which an additive
    layer (a Linear of [state, code]) builds only slowly; a per-dimension gate from the code can switch the other
    objects' features off at once (RT-1's FiLM of its image features by the instruction). The modulation starts
    at zero (a plain MLP of the state beside the code)."""

    def __init__(self, state_dim: int, code_dim: int, width: int):
        super().__init__()
        self.state_in = nn.Linear(state_dim, width)
        self.modulation = nn.Sequential(nn.Linear(code_dim, width), nn.Mish(), nn.Linear(width, 2 * width))
        nn.init.zeros_(self.modulation[-1].weight)
        nn.init.zeros_(self.modulation[-1].bias)
        self.out = nn.Sequential(nn.Mish(), nn.Linear(width, width))

    def forward(self, state: torch.Tensor, code: torch.Tensor) -> torch.Tensor:  # [B, S], [B, C] -> [B, W + C]
        scale, shift = self.modulation(code).chunk(2, dim=-1)
        return torch.cat([self.out(torch.addcmul(shift, self.state_in(state), scale + 1)), code], dim=-1)


@dataclass
class EncoderConfig:
    state_dim: int = setting(0, "0: the flattened normalized state history as-is; > 0: an MLP to this width")
    image_channels: list[int] = setting([32, 64, 128], "CNN channels per stage")
    image_feature_dim: int = setting(64, "features per camera and frame")
    pooling: str = setting("spatial_softmax", "spatial_softmax | avg", choices=("spatial_softmax", "avg"))
    num_keypoints: int = setting(32, "spatial-softmax keypoints")
    crop: int | None = setting(88, "random crop while training, centre crop at eval; null for none")
    share_image_encoder: bool = setting(False, "one CNN for every camera")
    stem_stride: int = setting(2, "stride of the first convolution (4: a patchify stem, 1/4 of the positions)")
    bottleneck: str = setting("none", "none | vib: the features pass through a variational information bottleneck "
                              "(ZPRL), a latent that `algo=steer algo.latent=bottleneck` steers",
                              choices=("none", "vib"))
    bottleneck_mean: str = setting("identity", "vib: identity: the latent's mean is the features themselves (the "
                                   "latent has their width; an MLP learns each feature's noise, whose KL limits "
                                   "what it carries) | learned: an MLP maps the features to a bottleneck_dim latent",
                                   choices=("identity", "learned"))
    bottleneck_dim: int = setting(32, "vib, bottleneck_mean learned: width of the Gaussian latent (the features the "
                                      "policy sees)")
    bottleneck_hidden: int = setting(256, "vib: width of the MLP from the features to the latent's log-variance "
                                     "(and mean, when learned); 0: one linear layer")
    bottleneck_beta: float = setting(1.0e-5, "vib: weight of KL(q(z | obs) || N(0, I)) in the training loss")
    film_key: str | None = setting(None, "a low-dim observation key (a goal or task code) that scales and shifts "
                                         "the other state features per dimension (FiLM) before the denoiser; null: "
                                         "none")
    film_dim: int = setting(256, "film_key: width of the modulated state features")


class ObservationEncoder(nn.Module):
    """Encodes an observation history into one vector [B, F].

    Low-dim keys (every non-image `observation.*`) are concatenated per frame and flattened over time
    ("b t d -> b (t d)"), optionally through an MLP (`state_dim > 0`). Each camera gets its own CNN (or one
    shared CNN with `share_image_encoder`); per-frame image features are flattened over time and concatenated
    after the state features. With `bottleneck: vib` they then pass through a Gaussian latent q(z | obs) =
    N(mu, sigma^2) (sampled while training, its mean at eval), whose KL to N(0, I) the policy's loss adds
    (`encode_with_kl`): a smooth latent that a steering method can perturb. Its mean is the features themselves
    (`bottleneck_mean: identity`) or an MLP of them of width `bottleneck_dim` (`learned`, ZPRL's compact latent).
    """

    def __init__(self, features: Mapping[str, Mapping], n_obs_steps: int, cfg: EncoderConfig):
        super().__init__()
        obs_keys = sorted(k for k in features if k.startswith("observation."))
        self.image_keys = [k for k in obs_keys if k.startswith(IMAGE_PREFIX)]
        self.lowdim_keys = [k for k in obs_keys if k not in self.image_keys]
        if not obs_keys:
            raise ValueError("the policy's features have no observation.* key; it needs at least one.")
        self.crop = cfg.crop
        self.film_key = cfg.film_key
        self.film = None
        if self.film_key is not None:
            if self.film_key not in self.lowdim_keys:
                raise ValueError(f"encoder.film_key {self.film_key!r} is not a low-dim observation key of this "
                                 f"policy ({', '.join(self.lowdim_keys) or 'none'}).")
            self.lowdim_keys = [k for k in self.lowdim_keys if k != self.film_key]
            if not self.lowdim_keys:
                raise ValueError(f"encoder.film_key {self.film_key!r} leaves no other state feature to modulate.")
        lowdim = sum(int(features[k]["shape"][-1]) for k in self.lowdim_keys) * n_obs_steps
        state_dim = cfg.state_dim
        self.state_mlp = (
            nn.Sequential(nn.Linear(lowdim, state_dim), nn.Mish(), nn.Linear(state_dim, state_dim))
            if state_dim > 0 and lowdim > 0 else nn.Identity()
        )
        self.out_dim = state_dim if state_dim > 0 and lowdim > 0 else lowdim
        if self.film_key is not None:
            code_dim = int(features[self.film_key]["shape"][-1])
            self.film = FiLMStateEncoder(lowdim, code_dim, cfg.film_dim)
            self.state_mlp = nn.Identity()
            self.out_dim = cfg.film_dim + code_dim

        def image_encoder() -> ImageEncoder:
            return ImageEncoder(list(cfg.image_channels), cfg.image_feature_dim, cfg.pooling, cfg.num_keypoints,
                                cfg.stem_stride)

        self.share_image_encoder = cfg.share_image_encoder
        n_encoders = min(len(self.image_keys), 1) if self.share_image_encoder else len(self.image_keys)
        self.image_encoders = nn.ModuleList(image_encoder() for _ in range(n_encoders))
        self.out_dim += len(self.image_keys) * n_obs_steps * cfg.image_feature_dim
        self.bottleneck = cfg.bottleneck
        if self.bottleneck == "vib":
            # Any learned map between the state and the denoiser costs imitation, bottleneck or not (builtin/
            # pick_place, 50 expert demos, 6000 steps, 300 episodes: a learned mean 0.63-0.80 for beta 1e-4..1e-6
            # and width 32..128; a plain base with encoder.state_dim=256 0.67; the plain base 0.93-0.96; earlier, a
            # linear learned mean 0.47-0.65 at 3000 steps). So by default the latent's mean is the features
            # themselves and only its variance is learned: a noisy channel whose KL limits what each feature
            # carries, steered in the features' own units.
            hidden = cfg.bottleneck_hidden
            self.bottleneck_mean = cfg.bottleneck_mean
            dim = self.out_dim if self.bottleneck_mean == "identity" else cfg.bottleneck_dim
            outputs = dim if self.bottleneck_mean == "identity" else 2 * dim  # -> ([mu,] log variance)
            head = nn.Linear(hidden or self.out_dim, outputs)
            with torch.no_grad():  # start nearly deterministic (std ~0.14): the KL term widens q only as it pays
                head.bias[outputs - dim:].fill_(-4.0)
            self.vib = nn.Sequential(nn.Linear(self.out_dim, hidden), nn.Mish(), head) if hidden > 0 else head
            self.out_dim = dim

    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.encode_with_kl(obs)[0]

    def encode_with_kl(self, obs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [B, F], KL(q(z | obs) || N(0, I)) [B]; zeros without a bottleneck)."""
        features = self.features(obs)
        if self.bottleneck != "vib":
            return features, features.new_zeros(features.shape[0])
        if self.bottleneck_mean == "identity":
            mu, log_var = features, self.vib(features)
        else:
            mu, log_var = self.vib(features).chunk(2, dim=-1)
        log_var = log_var.clamp(-10.0, 4.0)
        kl = 0.5 * (mu.pow(2) + log_var.exp() - 1.0 - log_var).sum(-1)
        z = mu + (0.5 * log_var).exp() * torch.randn_like(mu) if self.training else mu
        return z, kl

    def features(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The concatenated state and image features, before any bottleneck."""
        parts = []
        if self.lowdim_keys:
            lowdim = torch.cat([obs[k] for k in self.lowdim_keys], dim=-1)  # [B, To, D]
            flat = rearrange(lowdim, "b t d -> b (t d)")
            parts.append(self.state_mlp(flat) if self.film is None else self.film(flat, obs[self.film_key][:, -1]))
        for i, key in enumerate(self.image_keys):
            images = obs[key]  # [B, To, 3, H, W]
            if self.crop:
                images = crop_images(images, int(self.crop), random=self.training)
            encoder = self.image_encoders[0 if self.share_image_encoder else i]
            feats = encoder(rearrange(images, "b t c h w -> (b t) c h w"))
            parts.append(rearrange(feats, "(b t) f -> b (t f)", b=images.shape[0]))
        return torch.cat(parts, dim=-1)
