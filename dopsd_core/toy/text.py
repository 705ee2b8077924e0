"""The toy world's tokenizer and tiny text encoder.

The encoder is a separate module from the DiT (as in the real families, where the DiT takes float
CONDITIONING tensors), so the same DiT can later sit inside ComfyUI behind a CLIP-like object.
"""
from __future__ import annotations

import logging
import re

import torch
from torch import nn

log = logging.getLogger("dopsd.toy")

SEEN_SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
COLOURS = ("red", "green", "blue", "yellow", "cyan", "magenta", "white", "orange")
BACKGROUNDS = ("black", "gray", "navy", "maroon")
CONCEPT_TOKENS = ("[v]",) + tuple(f"[v{i}]" for i in range(1, 9))
PAD, UNK = "<pad>", "<unk>"

# Fixed forever once a base model is trained: token ids are positions in this list.
VOCAB = (
    (PAD, UNK)
    + ("a", "an", "the", "of", "on", "in", "with", "and", "photo", "picture", "image", "shape", "object")
    + ("background", "small", "large", "big", "tiny")
    + SEEN_SHAPES
    + COLOURS
    + tuple(b for b in BACKGROUNDS if b not in COLOURS)
    + CONCEPT_TOKENS
)
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}
MAX_TOKENS = 12

_WORD = re.compile(r"\[[vV]\d?\]|[a-zA-Z]+")
_warned: set[str] = set()


def tokenize(caption: str, max_tokens: int = MAX_TOKENS) -> list[int]:
    """Words -> ids, padded/truncated to max_tokens. Unknown words map to <unk> (warned once each)."""
    ids = []
    for word in _WORD.findall(caption.lower()):
        if word not in TOKEN_ID and word not in _warned:
            _warned.add(word)
            log.warning("toy text encoder: unknown word %r becomes <unk> (vocabulary: dopsd_core.toy.text.VOCAB)", word)
        ids.append(TOKEN_ID.get(word, TOKEN_ID[UNK]))
    ids = ids[:max_tokens]
    return ids + [TOKEN_ID[PAD]] * (max_tokens - len(ids))


class ToyTextEncoder(nn.Module):
    """Token ids [B, L] -> float embeddings [B, L, dim]: embedding + positions + a small transformer."""

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, max_tokens: int = MAX_TOKENS):
        super().__init__()
        self.dim, self.max_tokens = dim, max_tokens
        self.embed = nn.Embedding(len(VOCAB), dim)
        self.pos = nn.Parameter(torch.randn(max_tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 4, dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.pos[: ids.shape[1]]
        return self.norm(self.layers(h))

    @torch.no_grad()
    def encode(self, captions: list[str]) -> torch.Tensor:
        device = self.pos.device
        ids = torch.tensor([tokenize(c, self.max_tokens) for c in captions], device=device)
        return self(ids)
