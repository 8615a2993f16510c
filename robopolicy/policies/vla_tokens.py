"""What the vla policy's prefix is made of, shared by its own transformer (vla.py) and the pretrained backbones
(vla_backbone.py): the prefix before any layer, its cache, and the entities of the state."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


def state_entities(key: str, spec: Mapping, mode: str) -> list[tuple[str, list[int]]]:
    """Groups of a low-dim feature's dimensions, one per entity its names describe: the name up to its first dot,
    trailing digits dropped (`joint3.vel` -> `joint`). Unnamed features, and mode "one", give one group."""
    size = int(torch.tensor(spec["shape"]).prod())
    names = spec.get("names")
    if mode == "one" or not names or len(names) != size:
        return [(key, list(range(size)))]
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(str(name).split(".")[0].rstrip("0123456789") or str(name), []).append(i)
    return [(key, idx) for idx in groups.values()]


@dataclass
class PrefixCache:
    """Per layer the prefix's keys and values [B, heads, P, e], its key mask [B, P] and final states [B, P, d];
    `allowed`: the action tokens' attention mask [B, 1, 1, P + H] (None when no prefix token is padding);
    `summary`: what is added to every action token [B, 1, d] (zero without `prefix_summary`)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    hidden: torch.Tensor
    allowed: torch.Tensor | None = None
    summary: torch.Tensor | float = 0.0
    suffix: torch.Tensor | None = None  # tokens leading the suffix [B, S, d] (on a backbone: the state tokens)

    def pooled(self) -> torch.Tensor:
        """The mean of the final states over the real prefix tokens [B, d]."""
        weights = self.mask.to(self.hidden.dtype)[..., None]
        return (self.hidden * weights).sum(1) / weights.sum(1)


@dataclass
class PrefixTokens:
    """The prefix before any layer (the uncached path recomputes everything from it at every flow step)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    suffix: torch.Tensor | None = None  # tokens leading the suffix [B, S, d] (on a backbone: the state tokens)
