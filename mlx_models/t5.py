"""The T5 text encoder that conditions MusicGen (encoder half of t5-base), in MLX.

T5 differs from the textbook transformer in four ways that all matter for parity:
  * positions enter only as a learned *relative* bias added to the attention scores; the bias
    table lives in block 0 and every block reuses the same bias;
  * attention scores are NOT scaled by 1/sqrt(d_kv) (the scale is folded into the init);
  * the norm is RMSNorm (no mean subtraction, no bias), applied before each sub-layer;
  * no linear layer has a bias, and the FFN is ReLU(x W_i) W_o.

Parameter names (prefix `text_encoder.` in the full model) follow notes/SPEC.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import mlx.core as mx
import mlx.nn as nn


@dataclass
class T5Args:
    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    max_text_tokens: int = 512

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "T5Args":
        """Build from config.json["text_encoder"]; unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def relative_position_buckets(query_len: int, key_len: int, num_buckets: int,
                              max_distance: int) -> mx.array:
    """Bucket index (query_len, key_len) of every (query, key) pair, bidirectional as in T5.

    Half of the buckets hold keys after the query, half keys before it. Within each half, small
    distances get one bucket each and larger ones share logarithmically wider buckets up to
    `max_distance`, beyond which everything lands in the last bucket.
    """
    rel = mx.arange(key_len)[None, :] - mx.arange(query_len)[:, None]  # key - query
    half = num_buckets // 2
    buckets = (rel > 0).astype(mx.int32) * half
    dist = mx.abs(rel)
    max_exact = half // 2
    # Computed in float32 like the reference so that boundary cases fall into the same bucket.
    scaled = mx.log(mx.maximum(dist, 1).astype(mx.float32) / max_exact)
    scaled = scaled / math.log(max_distance / max_exact) * (half - max_exact)
    large = mx.minimum(max_exact + scaled.astype(mx.int32), half - 1)
    return buckets + mx.where(dist < max_exact, dist, large)


class T5Attention(nn.Module):
    def __init__(self, args: T5Args):
        super().__init__()
        self.num_heads = args.num_heads
        self.d_kv = args.d_kv
        inner = args.num_heads * args.d_kv
        self.q = nn.Linear(args.d_model, inner, bias=False)
        self.k = nn.Linear(args.d_model, inner, bias=False)
        self.v = nn.Linear(args.d_model, inner, bias=False)
        self.o = nn.Linear(inner, args.d_model, bias=False)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        """`bias` (B or 1, heads, T, T) is the relative position bias plus the padding mask."""
        B, T, _ = x.shape

        def heads(t: mx.array) -> mx.array:
            return t.reshape(B, T, self.num_heads, self.d_kv).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=bias.astype(q.dtype))
        return self.o(out.transpose(0, 2, 1, 3).reshape(B, T, -1))


class T5FeedForward(nn.Module):
    def __init__(self, args: T5Args):
        super().__init__()
        self.wi = nn.Linear(args.d_model, args.d_ff, bias=False)
        self.wo = nn.Linear(args.d_ff, args.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.wo(nn.relu(self.wi(x)))


class T5Block(nn.Module):
    def __init__(self, args: T5Args):
        super().__init__()
        # mx.fast.rms_norm accumulates in float32 even for half inputs, as T5's norm requires.
        self.attn_norm = nn.RMSNorm(args.d_model, eps=args.layer_norm_epsilon)
        self.attn = T5Attention(args)
        self.ffn_norm = nn.RMSNorm(args.d_model, eps=args.layer_norm_epsilon)
        self.ffn = T5FeedForward(args)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        x = x + self.attn(self.attn_norm(x), bias)
        return x + self.ffn(self.ffn_norm(x))


class T5Encoder(nn.Module):
    """T5 encoder stack: token embedding -> N pre-norm blocks -> final RMSNorm."""

    def __init__(self, args: T5Args):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.d_model)
        self.relative_attention_bias = nn.Embedding(args.relative_attention_num_buckets,
                                                    args.num_heads)
        self.blocks = [T5Block(args) for _ in range(args.num_layers)]
        self.final_norm = nn.RMSNorm(args.d_model, eps=args.layer_norm_epsilon)

    def position_bias(self, length: int) -> mx.array:
        """Relative position bias (1, heads, length, length), shared by every block."""
        buckets = relative_position_buckets(length, length, self.args.relative_attention_num_buckets,
                                            self.args.relative_attention_max_distance)
        return self.relative_attention_bias(buckets).transpose(2, 0, 1)[None]

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        """Encode token ids (B, T) -> hidden states (B, T, d_model).

        `attention_mask` (B, T) is 1 for real tokens and 0 for padding; padded keys are ignored.
        Hidden states at padded positions are meaningless (callers multiply them by the mask).
        """
        x = self.embed_tokens(input_ids)
        bias = self.position_bias(input_ids.shape[1])  # float32
        if attention_mask is not None:
            # A large finite negative (not -inf) keeps fully padded rows finite, like the reference.
            neg = mx.array(-1e9 if x.dtype != mx.float16 else -3e4, mx.float32)
            keep = attention_mask.astype(mx.bool_)[:, None, None, :]
            bias = bias + mx.where(keep, mx.array(0.0, mx.float32), neg)
        for block in self.blocks:
            x = block(x, bias)
        return self.final_norm(x)
