"""What the vla policy's prefix is made of, shared by its own transformer (vla.py) and the pretrained backbones
(vla_backbone.py): the prefix before any layer, its cache, and the entities of the state."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn


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


class InstructionFiLM(nn.Module):
    """The instruction scales and shifts every state token per dimension (FiLM, as RT-1 conditions its image
    features on the instruction), before any attention layer.

    A few learned queries attention-pool the instruction's token states into a code [B, d]; an MLP maps it to a
    scale and a shift for each state entity token [B, E, d]. "The offset of the cube the instruction names" is a
    product of instruction and state: attention layers learn it only slowly, a per-token gate can switch the
    other entities' features off at once. The last layer starts at zero, so the tokens start unmodulated."""

    def __init__(self, text_width: int, d: int, n_entities: int, n_queries: int = 4):
        super().__init__()
        self.n_entities, self.d = n_entities, d
        self.keys = nn.Linear(text_width, d)
        self.values = nn.Linear(text_width, d)
        self.queries = nn.Parameter(0.02 * torch.randn(n_queries, d))
        self.modulation = nn.Sequential(nn.Linear(n_queries * d, d), nn.GELU(), nn.Linear(d, n_entities * 2 * d))
        nn.init.zeros_(self.modulation[-1].weight)
        nn.init.zeros_(self.modulation[-1].bias)

    def code(self, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """text [B, L, w], mask [B, L] (True: a real token) -> the pooled instruction [B, n_queries * d]."""
        scores = torch.einsum("qd,bld->bql", self.queries, self.keys(text)) / self.d ** 0.5
        weights = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1)
        return torch.einsum("bql,bld->bqd", weights, self.values(text)).flatten(1)

    def forward(self, entities: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """entities [B, E, d] -> the same, modulated by the instruction."""
        scale, shift = self.modulation(self.code(text, mask)).view(-1, self.n_entities, 2, self.d).unbind(2)
        return torch.addcmul(shift, entities, scale + 1)
