"""What the vla policy's prefix is made of, shared by its own transformer (vla.py) and the pretrained backbones
(vla_backbone.py): the prefix before any layer, its cache, and the entities of the state."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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


def entity_kind(key: str, spec: Mapping, idx: list[int]) -> tuple[str, tuple[str, ...]]:
    """Entities of one kind are members of a named family with one layout: the name but its last `_` word, and the
    names after the dot (`cube_red.dx`, `cube_green.dx` -> ("cube", (..., "dx"))). A name without `_` is a kind of
    its own (`ee.x` and `target.x` share a layout, not a family)."""
    phrase = entity_phrase(key, spec, idx).split(" ")
    return " ".join(phrase[:-1]) or " ".join(phrase) + "#", entity_layout(spec, idx)


def entity_phrase(key: str, spec: Mapping, idx: list[int]) -> str:
    """An entity's name as words (`cube_red.x` -> "cube red"), which the text encoder embeds as its identity."""
    names = spec.get("names") or []
    if not names or idx[0] >= len(names):
        return key.split(".")[-1].replace("_", " ")
    return str(names[idx[0]]).split(".")[0].rstrip("0123456789").replace("_", " ") or str(names[idx[0]])


class EntityPointer(nn.Module):
    """The instruction picks, among the state entities of one kind, the one it names, and reads out its features: one
    token per kind with several members ("the named cube" among cube_red, cube_green, cube_blue; "the named pad"),
    added to the prefix, as instruction-queried object tokens in object-centric language policies.

    Entities are of one kind when their names are one family with one layout (`cube_red.dx`, `cube_green.dx`:
    `entity_kind`).
    An entity's score is how much the instruction mentions it: the best match over the instruction's tokens of the
    text encoder's embedding of its name ("cube red"), as a scaled cosine (a prior that already prefers the named
    one), plus with `learned_match` a learned bilinear term that starts at zero (it can drift from the names and
    confuse two colours under a phrasing it was not trained on). A softmax over the kind's members weights their
    values, which the kind's MLP makes from each member's own features, so the token means "the cube the
    instruction names" whatever its colour: for the action expert, one object to act on instead of a choice to
    make. `selection` "hard" passes on the best-scored member's value alone (straight-through: the softmax's
    gradient still trains the scores), so the token is exactly one object's, never a blend of two."""

    def __init__(self, text_width: int, d: int, names: torch.Tensor, kinds: list[int], sizes: list[int],
                 scale: float = 20.0, selection: str = "soft", learned_match: bool = True):
        super().__init__()
        self.d, self.selection = d, selection
        members: dict[int, list[int]] = {}
        for entity, kind in enumerate(kinds):
            members.setdefault(kind, []).append(entity)
        self.kinds = [m for m in members.values() if len(m) > 1]  # entity indices of each kind with several members
        self.register_buffer("names", names, persistent=False)  # [E, text_width]: recomputed from the names at build
        self.log_scale = nn.Parameter(torch.tensor(float(scale)).log())
        self.name_key = self.text_key = None
        if learned_match:
            self.name_key = nn.Linear(text_width, d)
            self.text_key = nn.Linear(text_width, d)
            nn.init.zeros_(self.text_key.weight)
            nn.init.zeros_(self.text_key.bias)
        self.value = nn.ModuleList(nn.Sequential(nn.Linear(sizes[m[0]], d), nn.GELU(), nn.Linear(d, d))
                                   for m in self.kinds)
        self.position = nn.Parameter(0.02 * torch.randn(len(self.kinds), d))

    def scores(self, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """text [B, L, w], mask [B, L] (True: a real token) -> how much it mentions each entity [B, E]."""
        cosine = torch.einsum("ew,blw->bel", F.normalize(self.names, dim=-1), F.normalize(text, dim=-1))
        match = self.log_scale.exp() * cosine
        if self.text_key is not None:
            match = match + torch.einsum("ed,bld->bel", self.name_key(self.names), self.text_key(text)) / self.d ** 0.5
        return match.masked_fill(~mask[:, None], float("-inf")).amax(-1)

    def weights(self, text: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Per kind, the weights over its members [B, n_members]: the softmax of their scores, or (hard) its
        argmax one-hot in the forward pass and the softmax's gradient in the backward one."""
        scores = self.scores(text, mask)
        soft = [scores[:, kind].softmax(-1) for kind in self.kinds]
        if self.selection == "soft":
            return soft
        # (w - w.detach()) is exactly 0 in the forward pass, so the weights are exactly one-hot: 1 + w - w is not
        return [(w - w.detach()) + F.one_hot(w.argmax(-1), w.shape[-1]).to(w.dtype) for w in soft]

    def forward(self, features: list[torch.Tensor], text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """features: each entity's normalized features [B, n_e] -> one pointer token per kind [B, K, d]."""
        tokens = []
        for kind, weights, value in zip(self.kinds, self.weights(text, mask), self.value):
            values = torch.stack([value(features[e]) for e in kind], dim=1)  # [B, n_members, d]
            tokens.append(torch.einsum("bm,bmd->bd", weights, values))
        return torch.stack(tokens, dim=1) + self.position


def make_pointer(features: Mapping[str, Mapping], state_keys: list[str], n_obs_steps: int, d: int, text_width: int,
                 embed_names: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]], selection: str = "soft",
                 learned_match: bool = True) -> tuple[EntityPointer | None, list[tuple[str, list[int]]]]:
    """The entity pointer over the state keys' entities, and those entities (key, indices); None when no kind of
    entity has several members (nothing to choose). `embed_names`: phrases -> token states [E, L, text_width] and
    mask [E, L], in the instruction's text space; an entity's identity is the mean of its name's token states.
    `selection`, `learned_match`: EntityPointer's."""
    groups = [g for k in state_keys for g in state_entities(k, features[k], "entity")]
    kind_ids: dict[tuple[str, tuple[str, ...]], int] = {}
    kinds = [kind_ids.setdefault(entity_kind(k, features[k], idx), len(kind_ids)) for k, idx in groups]
    if len(kind_ids) == len(groups):  # no kind with several members: nothing to choose, no pointer
        return None, []
    with torch.no_grad():
        states, mask = embed_names([entity_phrase(k, features[k], idx) for k, idx in groups])
    weights = mask.to(states.dtype)[..., None]
    names = ((states * weights).sum(1) / weights.sum(1)).float()
    return EntityPointer(text_width, d, names, kinds, [n_obs_steps * len(idx) for _, idx in groups],
                         selection=selection, learned_match=learned_match), groups


def drop_instruction(text_mask: torch.Tensor, rate: float, others: bool) -> torch.Tensor:
    """Instruction dropout: text_mask [B, L] with every token of a sample masked out, with probability `rate` per
    sample, so that the layers after it learn to act from what the pointer read of the instruction rather than
    from its phrasing. `others`: whether the prefix holds other tokens; without any, nothing is dropped (a sample's
    prefix is never all masked)."""
    if rate <= 0.0 or not others:
        return text_mask
    keep = torch.rand(text_mask.shape[0], device=text_mask.device) >= rate
    return text_mask & keep[:, None]
