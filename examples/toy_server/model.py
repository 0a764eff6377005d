"""A random-weight, Llama-shaped decoder with a paged KV cache.

Not a useful language model: its weights are random (seeded; no weights can be downloaded
here). It does the work a real one does per token: grouped-query attention with rotary
position embeddings, RMSNorm, a SwiGLU MLP, in bf16 on a GPU, with attention fused through
torch's `scaled_dot_product_attention` over a KV cache kept in fixed-size blocks of a local
pool, so an engine can swap contexts out and in block by block.

Two configurations: `tiny` (the default; runs on a CPU, for tests and the demo) and
`llama3-8b` (Llama-3-8B's shapes: 32 layers, 32 query heads, 8 KV heads, head dim 128,
128 KiB of KV per token, ~16 GB of bf16 weights; one GPU).

`Decoder.forward` runs one ragged batch: any number of sequences, each with a chunk of new
tokens (a prefill chunk or one decode token) at its own position, in one pass: the matrix
products run on all the batch's tokens at once, attention on the padded batch with one SDPA
call per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

BLOCK_TOKENS = 16  # tokens per KV block
VOCAB_OFFSET = 32  # byte-level vocabulary over printable ASCII 32..126
BYTE_VOCAB = 95


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 512
    vocab: int = BYTE_VOCAB
    max_context: int = 8192
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads}), and n_heads of "
                f"n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"the head dimension ({self.head_dim}) must be even for rotary embeddings")
        if self.vocab < BYTE_VOCAB:
            raise ValueError(f"vocab ({self.vocab}) must hold the {BYTE_VOCAB} byte-level tokens")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return self.n_layers * 2 * self.n_kv_heads * self.head_dim * dtype.itemsize

    def n_params(self) -> int:
        d, hd = self.d_model, self.head_dim
        per_layer = d * (self.n_heads + 2 * self.n_kv_heads) * hd + self.n_heads * hd * d + 3 * d * self.d_ff + 2 * d
        return 2 * self.vocab * d + self.n_layers * per_layer + d


# Llama-3-8B: 32 layers, d_model 4096, 32 query heads and 8 KV heads of 128, SwiGLU 14336,
# vocabulary 128256, rope theta 500000. Context up to 16,384 tokens here.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(),
    "llama3-8b": ModelConfig(
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        d_ff=14336,
        vocab=128256,
        max_context=16384,
        rope_theta=500000.0,
    ),
}


def preset(name: str, **overrides: int) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v})


def encode(text: str) -> list[int]:
    """Printable ASCII -> token ids; anything else maps to '?'."""
    return [
        c - VOCAB_OFFSET if VOCAB_OFFSET <= c < VOCAB_OFFSET + BYTE_VOCAB else ord("?") - VOCAB_OFFSET
        for c in text.encode("ascii", "replace")
    ]


def decode(tokens: list[int]) -> str:
    """Token ids -> text; ids beyond the byte-level range (a large vocabulary) show as `<id>`."""
    return "".join(chr(t + VOCAB_OFFSET) if t < BYTE_VOCAB else f"<{t}>" for t in tokens)


@dataclass(frozen=True)
class Chunk:
    """One sequence's part of a batch: `tokens` at positions `start`.., its KV in `blocks`
    (enough blocks for start + len(tokens) tokens)."""

    tokens: list[int]
    start: int
    blocks: list[int]


class Decoder:
    """Weights as plain tensors (no autograd). The KV pool is
    `[num_blocks, n_layers, 2 (K, V), BLOCK_TOKENS, n_kv_heads, head_dim]`: one block (one row)
    holds every layer's K and V of BLOCK_TOKENS tokens, contiguous, so a context swaps as rows."""

    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        meta = device.type == "meta"
        g = None if meta else torch.Generator(device=device).manual_seed(cfg.seed)

        def w(*shape: int, scale: float) -> torch.Tensor:
            if meta:
                return torch.empty(*shape, device=device, dtype=dtype)
            return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

        d, hd, f = cfg.d_model, cfg.head_dim, cfg.d_ff
        qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * hd
        out_scale = 1 / math.sqrt(2 * cfg.n_layers)  # keep the residual stream bounded over depth
        self.embed = w(cfg.vocab, d, scale=1.0)
        self.layers = [
            {
                "attn_norm": torch.ones(d, device=device, dtype=dtype),
                "wqkv": w(d, qkv, scale=1 / math.sqrt(d)),
                "wo": w(cfg.n_heads * hd, d, scale=out_scale / math.sqrt(cfg.n_heads * hd)),
                "mlp_norm": torch.ones(d, device=device, dtype=dtype),
                "w13": w(d, 2 * f, scale=1 / math.sqrt(d)),  # gate and up, side by side
                "w2": w(f, d, scale=out_scale / math.sqrt(f)),
            }
            for _ in range(cfg.n_layers)
        ]
        self.norm = torch.ones(d, device=device, dtype=dtype)
        self.lm_head = w(d, cfg.vocab, scale=4 / math.sqrt(d))
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        angles = torch.outer(torch.arange(cfg.max_context, dtype=torch.float64), inv)
        self.cos = angles.cos().to(device=device, dtype=torch.float32)  # [max_context, hd/2]
        self.sin = angles.sin().to(device=device, dtype=torch.float32)

    def block_shape(self) -> tuple[int, ...]:
        """One KV block: every layer's K and V for BLOCK_TOKENS tokens."""
        c = self.cfg
        return (c.n_layers, 2, BLOCK_TOKENS, c.n_kv_heads, c.head_dim)

    def block_bytes(self) -> int:
        return math.prod(self.block_shape()) * self.dtype.itemsize

    def new_pool(self, num_blocks: int) -> torch.Tensor:
        return torch.zeros((num_blocks, *self.block_shape()), dtype=self.dtype, device=self.device)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.norm_eps)).to(x.dtype) * weight

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [N, heads, hd]; rotate-half convention (Llama's)."""
        xf = x.float()
        half = xf.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    @torch.inference_mode()
    def forward(self, batch: list[Chunk], pool: torch.Tensor) -> torch.Tensor:
        """Run every chunk of the batch in one pass; write the new tokens' K/V into their
        blocks; return the logits of each chunk's last token ([len(batch), vocab], float32)."""
        c, dev = self.cfg, self.device
        if not batch:
            raise ValueError("empty batch")
        lens = [len(ch.tokens) for ch in batch]
        totals = [ch.start + n for ch, n in zip(batch, lens, strict=True)]
        for ch, total in zip(batch, totals, strict=True):
            if not ch.tokens:
                raise ValueError("a chunk without tokens")
            if total > c.max_context:
                raise ValueError(f"context of {total} tokens is longer than the model's {c.max_context}")
            if len(ch.blocks) * BLOCK_TOKENS < total:
                raise ValueError(f"{len(ch.blocks)} blocks do not hold {total} tokens")
        b, n, t_max = len(batch), sum(lens), max(lens)
        nb_max = max(-(-total // BLOCK_TOKENS) for total in totals)
        kv_len = nb_max * BLOCK_TOKENS
        # host-built index tensors, one transfer each
        ids, pos, wblk, woff, qrow = [], [], [], [], []
        table = torch.zeros((b, nb_max), dtype=torch.long)
        for i, (ch, t) in enumerate(zip(batch, lens, strict=True)):
            ids += ch.tokens
            p = range(ch.start, ch.start + t)
            pos += p
            wblk += [ch.blocks[x // BLOCK_TOKENS] for x in p]
            woff += [x % BLOCK_TOKENS for x in p]
            qrow += [i * t_max + j for j in range(t)]
            used = ch.blocks[: -(-(ch.start + t) // BLOCK_TOKENS)]
            table[i, : len(used)] = torch.tensor(used)
        as_dev = lambda xs: torch.tensor(xs, dtype=torch.long).to(dev, non_blocking=True)  # noqa: E731
        ids_t, pos_t, wblk_t, woff_t, qrow_t = map(as_dev, (ids, pos, wblk, woff, qrow))
        table_d = table.to(dev, non_blocking=True).reshape(-1)
        start_t = torch.tensor([ch.start for ch in batch]).to(dev, non_blocking=True)
        len_t = torch.tensor(lens).to(dev, non_blocking=True)
        # mask[i, j, k]: query j of sequence i sees key k (causal from its start; padded query
        # rows see key 0 only, so no row is empty)
        j = torch.arange(t_max, device=dev)
        k = torch.arange(kv_len, device=dev)
        see = k[None, None, :] <= (start_t[:, None, None] + j[None, :, None])
        pad_q = j[None, :, None] >= len_t[:, None, None]
        mask = torch.where(pad_q, k[None, None, :] == 0, see)  # [B, t_max, kv_len]
        group = c.n_heads // c.n_kv_heads
        mask = mask[:, None].expand(b, group, t_max, kv_len).reshape(b, 1, group * t_max, kv_len)
        cos, sin = self.cos[pos_t][:, None, :], self.sin[pos_t][:, None, :]
        layer_t = torch.arange(c.n_layers, device=dev)
        hd, nkv, nh = c.head_dim, c.n_kv_heads, c.n_heads

        x = self.embed[ids_t]  # [N, d]
        for li, layer in enumerate(self.layers):
            h = self._norm(x, layer["attn_norm"])
            qkv = h @ layer["wqkv"]
            q = self._rope(qkv[:, : nh * hd].view(n, nh, hd), cos, sin)
            kk = self._rope(qkv[:, nh * hd : (nh + nkv) * hd].view(n, nkv, hd), cos, sin)
            vv = qkv[:, (nh + nkv) * hd :].view(n, nkv, hd)
            # one scatter into the (contiguous) pool: every index a tensor, so no strided view
            # is indexed (that would copy the whole layer on some paths)
            pool[wblk_t, layer_t[li : li + 1], :, woff_t] = torch.stack([kk, vv], dim=1)
            kvl = pool[:, li]  # [blocks, 2, BT, KV, hd] (a strided view)
            keys = kvl[:, 0].index_select(0, table_d).view(b, kv_len, nkv, hd).transpose(1, 2)  # [B, KV, T, hd]
            vals = kvl[:, 1].index_select(0, table_d).view(b, kv_len, nkv, hd).transpose(1, 2)
            # queries padded to [B, t_max], each KV head's query heads stacked along the length
            qp = q.new_zeros(b * t_max, nh, hd)
            qp[qrow_t] = q
            qp = qp.view(b, t_max, nkv, group, hd).permute(0, 2, 3, 1, 4).reshape(b, nkv, group * t_max, hd)
            a = F.scaled_dot_product_attention(qp, keys, vals, attn_mask=mask)  # [B, KV, G*t_max, hd]
            a = a.view(b, nkv, group, t_max, hd).permute(0, 3, 1, 2, 4).reshape(b * t_max, nh * hd)[qrow_t]
            x = x + a @ layer["wo"]
            h = self._norm(x, layer["mlp_norm"])
            gate, up = (h @ layer["w13"]).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ layer["w2"]
        last = torch.tensor([sum(lens[: i + 1]) - 1 for i in range(b)]).to(dev, non_blocking=True)
        h = self._norm(x[last], self.norm)
        return (h @ self.lm_head).float()
