"""The vla action expert on a pretrained vision-language backbone (`vla.backbone: smolvlm | paligemma`), as pi0
(PaliGemma) and SmolVLA (SmolVLM) are built, loaded with transformers from a local folder (`vla.backbone_path`),
never from a hub.

    prefix  = [image features of each camera (the VLM's vision tower and connector) | instruction tokens]
              run through the VLM's language model once per chunk: its per-layer keys and values are the cache
    suffix  = [state tokens | one token per action of the chunk x_t, with the flow time]   (pi0: state in the suffix)

The action expert has one layer per language-model layer (pi0's joint attention on every layer): the suffix
attends to that layer's prefix keys and values and to itself, with the backbone's head count and head width (its
key/value heads repeated for grouped-query attention), its own smaller width and weights. The prefix sees only
itself, through the language model's own (causal) mask, so its keys and values are computed once per chunk and
reused at every flow step; the uncached path (`kv_cache = False`) recomputes them at every step and gives the same
chunk. The backbone is frozen by default (`train_backbone: false`): it is then not part of the policy's weights,
and a checkpoint needs the same `backbone_path` to load; trained, its weights are saved with the policy.

Images enter as the policy normalizes them, resized to the vision tower's input size. No pretrained VLM weights
could be downloaded where this was written: the whole path (build, train, save, load, sample, cached = uncached) is
tested on tiny randomly initialised configs that transformers' own `save_pretrained` writes (tests/test_vla_backbone.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from robopolicy.data.spec import IMAGE_PREFIX
from robopolicy.policies.base import PolicyConfigError
from robopolicy.policies.unet1d import SinusoidalEmbedding
from robopolicy.policies.vla_tokens import (
    InstructionFiLM,
    PrefixCache,
    PrefixTokens,
    drop_instruction,
    make_pointer,
    state_entities,
)

BACKBONES = ("smolvlm", "paligemma")


def load_backbone(kind: str, path: str | Path | None) -> tuple[nn.Module, object]:
    """(the VLM's base model: vision tower, connector, language model; its tokenizer) from a local folder."""
    if kind not in BACKBONES:
        raise PolicyConfigError(f"vla backbone {kind!r} is unknown; use one of {', '.join(BACKBONES)} or none.")
    if not path or not (Path(path) / "config.json").exists():
        raise PolicyConfigError(f"vla backbone_path {path!r} holds no config.json: pass the folder a {kind} model was "
                                "saved to (save_pretrained), with its tokenizer files.")
    try:
        from transformers import (
            AutoTokenizer,
            PaliGemmaForConditionalGeneration,
            SmolVLMForConditionalGeneration,
        )
    except ImportError:
        raise PolicyConfigError("a vla backbone needs transformers: install the `vla` extra.") from None
    model_class = SmolVLMForConditionalGeneration if kind == "smolvlm" else PaliGemmaForConditionalGeneration
    model = model_class.from_pretrained(str(path), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model.model, tokenizer


class ExpertBlock(nn.Module):
    """One action-expert layer: attention with the backbone's heads and head width, the expert's own width."""

    def __init__(self, d: int, n_heads: int, head_dim: int, mlp_ratio: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * n_heads * head_dim), nn.Linear(n_heads * head_dim, d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(), nn.Linear(mlp_ratio * d, d))

    def forward(self, y: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor,
                allowed: torch.Tensor) -> torch.Tensor:
        b, t, _ = y.shape  # "b t (three h e) -> three b h t e"
        q, k, v = self.qkv(self.norm1(y)).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, torch.cat([k_prefix, k], 2), torch.cat([v_prefix, v], 2),
                                                  attn_mask=allowed)
        y = y + self.proj(attended.transpose(1, 2).flatten(2))  # "b h t e -> b t (h e)"
        return y + self.mlp(self.norm2(y))


class BackboneVLA(nn.Module):
    """Prefix on the VLM (`prefix_tokens`, `cache_prefix`), the action expert (`expert`): what VLAPolicy calls on
    its own transformer, so training and sampling are unchanged."""

    def __init__(self, features: Mapping[str, Mapping], n_obs_steps: int, cfg, action_dim: int, horizon: int):
        super().__init__()
        vlm, self.tokenizer = load_backbone(cfg.backbone, cfg.backbone_path)
        self.kind, self.train_backbone = cfg.backbone, cfg.train_backbone
        if self.train_backbone:
            self.vlm = vlm
        else:  # not a submodule: its weights stay out of the policy's checkpoint and optimizer
            object.__setattr__(self, "_frozen_vlm", vlm.requires_grad_(False).eval())
        lm = self.language_model
        text_cfg = lm.config
        self.n_heads = text_cfg.num_attention_heads
        self.head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // self.n_heads
        self.kv_repeat = self.n_heads // text_cfg.num_key_value_heads
        vision_cfg = vlm.config.vision_config
        self.image_size = int(vision_cfg.image_size)
        self.max_text_tokens = cfg.max_text_tokens
        self.image_keys = sorted(k for k in features if k.startswith(IMAGE_PREFIX))
        state_keys = sorted(k for k in features if k.startswith("observation.") and k not in self.image_keys)

        d = cfg.d_model
        self.state_groups = [g for k in state_keys for g in state_entities(k, features[k], cfg.state_tokens)]
        self.state_in = nn.ModuleList(
            nn.Sequential(nn.Linear(n_obs_steps * len(idx), d), nn.GELU(), nn.Linear(d, d))
            for _, idx in self.state_groups)
        self.instruction_film = (InstructionFiLM(text_cfg.hidden_size, d, len(self.state_groups))
                                 if cfg.instruction_film and self.state_groups else None)
        self.pointer, self.pointer_groups = None, []
        if cfg.pointer and state_keys:  # entity names embedded as the instruction is: the VLM's input embeddings
            self.pointer, self.pointer_groups = make_pointer(features, state_keys, n_obs_steps, d,
                                                             text_cfg.hidden_size, self._embed_text,
                                                             cfg.pointer_selection, cfg.pointer_learned_match)
        self.action_in = nn.Linear(action_dim, d)
        self.time_in = nn.Sequential(SinusoidalEmbedding(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.action_pos = nn.Parameter(0.02 * torch.randn(horizon, d))
        self.expert_layers = nn.ModuleList(ExpertBlock(d, self.n_heads, self.head_dim, cfg.mlp_ratio)
                                           for _ in range(text_cfg.num_hidden_layers))
        self.action_out = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, action_dim))
        self.out_dim = text_cfg.hidden_size  # encode(): the mean of the language model's final prefix states

    @property
    def backbone(self) -> nn.Module:
        return self.vlm if self.train_backbone else self._frozen_vlm

    @property
    def language_model(self) -> nn.Module:
        return self.backbone.text_model if self.kind == "smolvlm" else self.backbone.language_model

    def _apply(self, fn, recurse: bool = True):  # .to(device) / .float() move a frozen backbone too
        if not self.train_backbone:
            self._frozen_vlm._apply(fn, recurse)
        return super()._apply(fn, recurse)

    # ---- the prefix ----------------------------------------------------------------------------------------
    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized images [B, 3, H, W] -> the VLM's image tokens [B, n, hidden]."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False)
        if self.kind == "smolvlm":  # one image per sample: [B, 1, 3, S, S]; pooled output is a list per image
            return torch.stack(list(self.backbone.get_image_features(images[:, None]).pooler_output))
        return self.backbone.get_image_features(images).pooler_output

    def prefix_tokens(self, obs: Mapping[str, torch.Tensor], instructions: list[str],
                      instruction_dropout: float = 0.0) -> PrefixTokens:
        """obs normalized -> the language model's input embeddings [B, P, hidden] and mask [B, P] (and the state
        tokens of the suffix, computed here once per chunk); `instruction_dropout`: drop_instruction's rate."""
        device = self.action_pos.device
        parts = [self._image_features(obs[key][:, -1]) for key in self.image_keys]
        masks = [torch.ones(p.shape[:2], dtype=torch.bool, device=device) for p in parts]
        text = self.tokenizer(instructions, padding=True, truncation=True, max_length=self.max_text_tokens,
                              return_tensors="pt")
        parts.append(self.language_model.get_input_embeddings()(text["input_ids"].to(device)))
        masks.append(text["attention_mask"].to(device).bool())
        state = (torch.stack([embed(obs[key][..., idx].flatten(1))
                              for (key, idx), embed in zip(self.state_groups, self.state_in)], 1)
                 if self.state_groups else None)
        if self.instruction_film is not None:  # on the instruction's input embeddings (the VLM's run later)
            state = self.instruction_film(state, parts[-1], masks[-1])
        if self.pointer is not None:  # the pointer tokens join the state tokens at the head of the suffix
            pointed = self.pointer([obs[key][..., idx].flatten(1) for key, idx in self.pointer_groups], parts[-1],
                                   masks[-1])
            state = pointed if state is None else torch.cat([state, pointed], 1)
        # the prefix is images and instruction (the state is in the suffix): without images nothing is dropped
        masks[-1] = drop_instruction(masks[-1], instruction_dropout, bool(self.image_keys))
        return PrefixTokens(torch.cat(parts, 1), torch.cat(masks, 1), suffix=state)

    def _embed_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Phrases -> the language model's input embeddings [n, L, hidden] and mask [n, L]."""
        text = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_text_tokens,
                              return_tensors="pt")
        return self.language_model.get_input_embeddings()(text["input_ids"]), text["attention_mask"].bool()

    def cache_prefix(self, prefix: PrefixTokens) -> PrefixCache:
        """One pass of the language model over the prefix: every layer's keys and values (GQA heads repeated)."""
        out = self.language_model(inputs_embeds=prefix.tokens, attention_mask=prefix.mask.long(), use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values  # transformers renames it (5.40)
        keys = [layer.keys.repeat_interleave(self.kv_repeat, dim=1) for layer in cache.layers]
        values = [layer.values.repeat_interleave(self.kv_repeat, dim=1) for layer in cache.layers]
        n_suffix = self.action_pos.shape[0] + (prefix.suffix.shape[1] if prefix.suffix is not None else 0)
        ones = torch.ones(prefix.mask.shape[0], n_suffix, dtype=torch.bool, device=prefix.mask.device)
        allowed = torch.cat([prefix.mask, ones], dim=1)[:, None, None, :]
        return PrefixCache(keys, values, prefix.mask, out.last_hidden_state, allowed, suffix=prefix.suffix)

    # ---- the action expert ---------------------------------------------------------------------------------
    def expert(self, x_t: torch.Tensor, timestep: torch.Tensor, prefix: PrefixCache | PrefixTokens) -> torch.Tensor:
        """The denoiser: x_t [B, H, A], timestep [B] -> [B, H, A]; a PrefixTokens (uncached path) is run through
        the language model again at this step."""
        if isinstance(prefix, PrefixTokens):
            prefix = self.cache_prefix(prefix)
        y = self.action_in(x_t) + self.time_in(timestep)[:, None] + self.action_pos
        if prefix.suffix is not None:
            y = torch.cat([prefix.suffix, y], dim=1)
        for layer, k_prefix, v_prefix in zip(self.expert_layers, prefix.keys, prefix.values):
            y = layer(y, k_prefix, v_prefix, prefix.allowed)
        return self.action_out(y[:, y.shape[1] - self.action_pos.shape[0]:])
