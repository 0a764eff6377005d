"""A small random-weight decoder-only transformer with a paged KV cache.

Not a useful language model: its weights are random (seeded). It does the work a real one
does per token (embeddings, causal attention over the cached context, MLP), with the KV cache
kept in fixed-size blocks of a local pool, so a server can swap contexts out and in block by
block. Small enough for a CPU; the same code runs on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BLOCK_TOKENS = 16  # tokens per KV block
VOCAB_OFFSET = 32  # byte-level vocabulary over printable ASCII 32..126
VOCAB = 95


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512
    max_context: int = 8192
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def encode(text: str) -> list[int]:
    """Printable ASCII -> token ids; anything else maps to '?'."""
    return [
        c - VOCAB_OFFSET if VOCAB_OFFSET <= c < VOCAB_OFFSET + VOCAB else ord("?") - VOCAB_OFFSET
        for c in text.encode("ascii", "replace")
    ]


def decode(tokens: list[int]) -> str:
    return bytes(t + VOCAB_OFFSET for t in tokens).decode("ascii")


class TinyDecoder:
    """Weights as plain tensors (no autograd); `forward` runs one chunk of one sequence."""

    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        g = torch.Generator().manual_seed(cfg.seed)

        def w(*shape: int, scale: float) -> torch.Tensor:
            return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

        d, f = cfg.d_model, cfg.d_ff
        self.embed = w(VOCAB, d, scale=1.0)
        self.layers = [
            {
                "wqkv": w(d, 3 * d, scale=1 / math.sqrt(d)),
                "wo": w(d, d, scale=1 / math.sqrt(d)),
                "w1": w(d, f, scale=1 / math.sqrt(d)),
                "w2": w(f, d, scale=1 / math.sqrt(f)),
            }
            for _ in range(cfg.n_layers)
        ]
        pos = torch.arange(cfg.max_context).unsqueeze(1)
        div = torch.exp(torch.arange(0, d, 2) * (-math.log(10000.0) / d))
        pe = torch.zeros(cfg.max_context, d)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div)
        self.pos = pe.to(device=device, dtype=dtype)

    def block_shape(self) -> tuple[int, ...]:
        """One KV block: every layer's K and V for BLOCK_TOKENS tokens."""
        c = self.cfg
        return (c.n_layers, 2, c.n_heads, BLOCK_TOKENS, c.head_dim)

    @torch.inference_mode()
    def forward(self, tokens: list[int], start: int, pool: torch.Tensor, blocks: list[int]) -> torch.Tensor:
        """Run `tokens` at positions start.. of a sequence whose KV lives in `pool[blocks]`
        (positions < start already cached); write their K/V into the blocks; return the
        logits of the last token."""
        c = self.cfg
        t = len(tokens)
        if start + t > c.max_context:
            raise ValueError(f"context of {start + t} tokens is longer than the model's {c.max_context}")
        ids = torch.tensor(tokens, device=self.device)
        x = self.embed[ids] + self.pos[start : start + t]
        idx = torch.tensor(blocks, device=self.device)
        kv = pool.index_select(0, idx)  # [nb, L, 2, H, BT, hd]
        total = start + t
        mask = (
            torch.arange(total, device=self.device)[None, :] <= (start + torch.arange(t, device=self.device))[:, None]
        )
        for li, layer in enumerate(self.layers):
            h = F.layer_norm(x, (c.d_model,))
            q, k, v = (h @ layer["wqkv"]).view(t, 3, c.n_heads, c.head_dim).permute(1, 2, 0, 3)  # [H, t, hd] each
            past_k = kv[:, li, 0].permute(1, 0, 2, 3).reshape(c.n_heads, -1, c.head_dim)[:, :start]
            past_v = kv[:, li, 1].permute(1, 0, 2, 3).reshape(c.n_heads, -1, c.head_dim)[:, :start]
            keys = torch.cat([past_k, k], dim=1)
            vals = torch.cat([past_v, v], dim=1)
            a = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask)  # [H, t, hd]
            x = x + a.permute(1, 0, 2).reshape(t, c.d_model) @ layer["wo"]
            h = F.layer_norm(x, (c.d_model,))
            x = x + F.gelu(h @ layer["w1"]) @ layer["w2"]
            # write the new K/V into their blocks
            for bi in range(start // BLOCK_TOKENS, (total - 1) // BLOCK_TOKENS + 1):
                lo, hi = max(start, bi * BLOCK_TOKENS), min(total, (bi + 1) * BLOCK_TOKENS)
                dst = slice(lo - bi * BLOCK_TOKENS, hi - bi * BLOCK_TOKENS)
                pool[blocks[bi], li, 0, :, dst] = k[:, lo - start : hi - start]
                pool[blocks[bi], li, 1, :, dst] = v[:, lo - start : hi - start]
        h = F.layer_norm(x[-1], (c.d_model,))
        return (h @ self.embed.T).float() / math.sqrt(c.d_model)
