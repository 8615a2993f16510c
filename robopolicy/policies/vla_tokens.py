"""What the vla policy's prefix is made of, shared by its own transformer (vla.py) and the pretrained backbones
(vla_backbone.py): the prefix before any layer, its cache, and the entities of the state."""

from __future__ import annotations

from collections.abc import Callable, Mapping
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


def entity_layout(spec: Mapping, idx: list[int]) -> tuple[str, ...]:
    """What an entity's dimensions are, whatever the entity: the names after its first dot (`cube_red.dx` -> `dx`);
    entities of one layout (cube_red, cube_green) hold the same quantities of different objects."""
    names = spec.get("names") or []
    return tuple(str(names[i]).split(".", 1)[1] if i < len(names) and "." in str(names[i]) else f"#{i}" for i in idx)


def entity_phrase(key: str, spec: Mapping, idx: list[int]) -> str:
    """An entity's name as words (`cube_red.x` -> "cube red"), which the text encoder embeds as its identity."""
    names = spec.get("names") or []
    if not names or idx[0] >= len(names):
        return key.split(".")[-1].replace("_", " ")
    return str(names[idx[0]]).split(".")[0].rstrip("0123456789").replace("_", " ") or str(names[idx[0]])


class EntityPointer(nn.Module):
    """The instruction points at state entities and reads out their features: K tokens ("the named cube", "the
    named pad") added to the prefix, as instruction-queried object tokens in object-centric language policies.

    Each of K learned queries attention-pools the instruction's token states into a code; the code is compared
    with every entity's key (the text encoder's embedding of its name, e.g. "cube red", projected, plus a learned
    slot embedding); the softmax over entities weights their values, which a layout-shared MLP makes from the
    entity's own features (cube_red and cube_green share one), so that a pointer token means "the cube the
    instruction names" whatever its colour: for the action expert, one object to act on instead of a choice."""

    def __init__(self, text_width: int, d: int, names: torch.Tensor, layouts: list[int], sizes: list[int],
                 n_queries: int = 4):
        super().__init__()
        self.d, self.layouts = d, layouts
        self.register_buffer("names", names, persistent=False)  # [E, text_width]: recomputed from the names at build
        self.name_key = nn.Linear(text_width, d)
        self.slot = nn.Parameter(torch.zeros(len(layouts), d))
        self.text_key = nn.Linear(text_width, d)
        self.text_value = nn.Linear(text_width, d)
        self.pool = nn.Parameter(0.02 * torch.randn(n_queries, d))
        self.query = nn.Linear(d, d)
        n_layouts = max(layouts) + 1
        size_of = {layout: size for layout, size in zip(layouts, sizes)}
        self.value = nn.ModuleList(nn.Sequential(nn.Linear(size_of[i], d), nn.GELU(), nn.Linear(d, d))
                                   for i in range(n_layouts))
        self.out = nn.Linear(d, d)
        self.position = nn.Parameter(0.02 * torch.randn(n_queries, d))

    def weights(self, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """text [B, L, w], mask [B, L] -> each query's weights over the entities [B, K, E]."""
        scores = torch.einsum("qd,bld->bql", self.pool, self.text_key(text)) / self.d ** 0.5
        code = torch.einsum("bql,bld->bqd", scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1),
                            self.text_value(text))
        keys = self.name_key(self.names) + self.slot  # [E, d]
        return (torch.einsum("bqd,ed->bqe", self.query(code), keys) / self.d ** 0.5).softmax(-1)

    def forward(self, features: list[torch.Tensor], text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """features: each entity's normalized features [B, n_e] -> the pointer tokens [B, K, d]."""
        values = torch.stack([self.value[layout](x) for layout, x in zip(self.layouts, features)], dim=1)  # [B, E, d]
        return self.out(torch.einsum("bqe,bed->bqd", self.weights(text, mask), values)) + self.position


def make_pointer(features: Mapping[str, Mapping], state_keys: list[str], n_obs_steps: int, n_queries: int, d: int,
                 text_width: int, embed_names: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]
                 ) -> tuple[EntityPointer, list[tuple[str, list[int]]]]:
    """The entity pointer over the state keys' entities, and those entities (key, indices). `embed_names`: phrases
    -> token states [E, L, text_width] and mask [E, L], the same text space as the instruction's; an entity's
    identity is the mean of its name's token states. Entities with the same layout of names share a value MLP."""
    groups = [g for k in state_keys for g in state_entities(k, features[k], "entity")]
    with torch.no_grad():
        states, mask = embed_names([entity_phrase(k, features[k], idx) for k, idx in groups])
    weights = mask.to(states.dtype)[..., None]
    names = ((states * weights).sum(1) / weights.sum(1)).float()
    layout_ids: dict[tuple[str, ...], int] = {}
    layouts = [layout_ids.setdefault(entity_layout(features[k], idx), len(layout_ids)) for k, idx in groups]
    pointer = EntityPointer(text_width, d, names, layouts, [n_obs_steps * len(idx) for _, idx in groups], n_queries)
    return pointer, groups
