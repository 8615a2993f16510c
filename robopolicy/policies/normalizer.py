"""Normalization that travels with the policy weights.

Every key is normalized as `(x - center) * scale` and un-normalized as `x / scale + center`; `center` and
`scale` are buffers, so they are saved in the same safetensors file as the weights and a checkpoint can never
lose them. Modes:
- `min_max`: maps [min, max] to [-1, 1] (diffusion's clipping and the noise scale assume this range);
  dimensions whose range is below `eps` keep scale 1 so a constant input is centred, not blown up.
- `mean_std`: zero mean, unit variance (std floored at `eps`).
- images (uint8 HWC) are first scaled to [0, 1]; `mean_std` then uses the per-channel statistics and
  `unit` maps [0, 1] to [-1, 1] without statistics.

`state_bound` (the policy config's `normalization.state_bound`, not a buffer: it travels in config.yaml) clamps
the normalized low-dimensional observations to [-b, b]: statistics from a few demonstrations can scale a feature
that hardly moved in them by hundreds (min_max on a cube's quaternion from 15 demos: 200-400x), so a state outside
their range would otherwise reach the network as values of +-250.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from robopolicy.data.spec import OBSERVATION_PREFIX, is_image_key

NORM_MODES = ("min_max", "mean_std", "unit", "identity")


class NormalizationError(ValueError):
    """Statistics missing or of the wrong shape for a feature."""


def _module_name(key: str) -> str:
    # nn.ModuleDict names may not contain "."; feature keys always do.
    return key.replace(".", "__")


class _KeyNorm(nn.Module):
    def __init__(self, center: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("center", center)
        self.register_buffer("scale", scale)


class Normalizer(nn.Module):
    """Per-key affine normalization with statistics stored as buffers.

    `modes` maps feature key -> mode. With `stats=None` the buffers are placeholders (identity); loading a
    checkpoint's state dict then fills them. `state_bound`: the clamp of the normalized low-dim observations
    (None: none).
    """

    def __init__(
        self,
        features: Mapping[str, Mapping],
        modes: Mapping[str, str],
        stats: Mapping[str, Mapping[str, np.ndarray]] | None,
        eps: float = 1e-4,
        state_bound: float | None = None,
    ):
        super().__init__()
        self.modes = dict(modes)
        self.image_keys = {k for k in modes if is_image_key(k)}
        self.state_keys = {k for k in modes if k.startswith(OBSERVATION_PREFIX) and k not in self.image_keys}
        self.state_bound = state_bound
        self.norms = nn.ModuleDict()
        for key, mode in self.modes.items():
            if mode not in NORM_MODES:
                raise NormalizationError(
                    f"normalization mode {mode!r} for {key!r} is unknown; use one of {', '.join(NORM_MODES)}."
                )
            # Images are normalized per channel; everything else per dimension.
            dims = 3 if key in self.image_keys else int(np.prod(features[key]["shape"]))
            center, scale = torch.zeros(dims), torch.ones(dims)
            if mode == "unit":
                center, scale = torch.full((dims,), 0.5), torch.full((dims,), 2.0)
            elif mode in ("min_max", "mean_std") and stats is not None:
                center, scale = _center_scale(key, mode, stats, dims, eps)
            self.norms[_module_name(key)] = _KeyNorm(center, scale)

    def _get(self, key: str) -> _KeyNorm:
        return self.norms[_module_name(key)]

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """Low-dim [..., D] float -> normalized; images uint8 [..., H, W, 3] -> float [..., 3, H, W]."""
        norm = self._get(key)
        if key in self.image_keys:
            x = x.float().div(255.0)
            x = (x - norm.center) * norm.scale  # broadcast over the channel (last) axis
            return x.movedim(-1, -3)  # "... h w c -> ... c h w"
        x = (x.float() - norm.center) * norm.scale
        if self.state_bound is not None and key in self.state_keys:
            x = x.clamp(-self.state_bound, self.state_bound)
        return x

    def unnormalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        norm = self._get(key)
        return x / norm.scale + norm.center


def _center_scale(
    key: str, mode: str, stats: Mapping[str, Mapping[str, np.ndarray]], dims: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if key not in stats:
        raise NormalizationError(
            f"normalization statistics for {key!r} are missing; compute the store's stats "
            f"(robopolicy data stats) or set its normalization mode to 'identity'."
        )
    needed = ("min", "max") if mode == "min_max" else ("mean", "std")
    values = {}
    for name in needed:
        if name not in stats[key]:
            raise NormalizationError(f"statistics for {key!r} have no {name!r} entry (mode {mode!r} needs it).")
        array = np.asarray(stats[key][name], dtype=np.float64).reshape(-1)
        if array.size != dims:
            raise NormalizationError(
                f"statistics {key!r}/{name!r} have {array.size} values but the feature has {dims} dimensions; "
                f"recompute the stats for this store."
            )
        if not np.all(np.isfinite(array)):
            raise NormalizationError(f"statistics {key!r}/{name!r} contain NaN or inf; recompute the stats.")
        values[name] = array
    if mode == "min_max":
        low, high = values["min"], values["max"]
        span = high - low
        center = (high + low) / 2
        scale = np.where(span > eps, 2.0 / np.maximum(span, eps), 1.0)
    else:
        center = values["mean"]
        scale = 1.0 / np.maximum(values["std"], eps)
    return torch.as_tensor(center, dtype=torch.float32), torch.as_tensor(scale, dtype=torch.float32)
