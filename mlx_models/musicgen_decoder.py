"""The MusicGen audio-token decoder (a pre-LayerNorm transformer over K parallel codebooks), in MLX.

At each time step the decoder sees K codebook tokens (K = 4 mono, 8 stereo). Their K embeddings
are summed into one vector, a sinusoidal position is added, and N pre-LayerNorm layers
(self-attention, optional cross-attention to the text, GELU MLP) follow. K separate heads
predict the next token of each codebook: logits (B, K, T, 2048).

Two conditioning styles exist:
  * text-to-music (`cross_attention=True`): each layer cross-attends to the projected T5 states;
  * melody (`cross_attention=False`): the conditioning (chroma projection then text projection) is
    *prepended* to the decoder input as a prefix; positions count from the start of the prefix.

Generation uses a preallocated key/value cache (`DecoderCache`) so that a single-token step has
fixed shapes and can be wrapped in `mx.compile` without retracing:

    cache = decoder.make_cache(batch_size, max_len)            # zeros, offset 0
    decoder.set_cross_attention(cache, text_states, text_mask)  # once per generation (text models)
    logits = decoder(codes_prompt, cache)                       # prefill: (B, K, T) codes
    logits = decoder(next_codes, cache)                         # step:    (B, K, 1) codes

Each call writes its keys/values at `cache.offset` (an mx.array) and advances it. See
`MusicgenDecoder.__call__` for the exact contract and `DecoderCache` for compiling a step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import mlx.core as mx
import mlx.nn as nn


@dataclass
class DecoderArgs:
    vocab_size: int = 2048
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    ffn_dim: int = 4096
    num_codebooks: int = 4
    audio_channels: int = 1
    max_position_embeddings: int = 2048
    pad_token_id: int = 2048
    bos_token_id: int = 2048
    layer_norm_eps: float = 1e-5
    cross_attention: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DecoderArgs":
        """Build from config.json["decoder"]; unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def sinusoidal_positions(positions: mx.array, dim: int) -> mx.array:
    """Fixed sinusoidal embeddings (T, dim) in float32 for integer `positions` (T,).

    The tensor2tensor variant MusicGen was trained with: cosines first, then sines, with
    frequencies exp(-ln(10000) * i / (dim/2 - 1)). Computed on the fly, so any length works.
    """
    half = dim // 2
    freqs = mx.exp(mx.arange(half, dtype=mx.float32) * -(math.log(10000.0) / (half - 1)))
    angles = positions.astype(mx.float32)[:, None] * freqs[None, :]
    emb = mx.concatenate([mx.cos(angles), mx.sin(angles)], axis=-1)
    if dim % 2:
        emb = mx.concatenate([emb, mx.zeros((emb.shape[0], 1), mx.float32)], axis=-1)
    return emb


class DecoderCache:
    """Preallocated attention state of one generation.

    Everything lives in the dict `self.state` (lists of arrays + the offset) so that a step can be
    compiled with the cache captured as state (mx.compile swaps the entries of that dict, so
    attributes outside it would not be seen; never replace `state` itself):

        step = mx.compile(lambda codes: decoder(codes, cache), inputs=cache.state,
                          outputs=cache.state)

    state["keys"][i], state["values"][i]: layer i self-attention K/V, (B, heads, max_len, head_dim).
    state["offset"]: int32 scalar array, number of positions already written.
    state["cross_keys"][i], state["cross_values"][i]: layer i cross-attention K/V
        (B, heads, S, head_dim), set once by `MusicgenDecoder.set_cross_attention`.
    state["cross_mask"]: (B, 1, 1, S) bool, which encoder positions may be attended to.

    `max_len` must cover every position written (prefix + prompt + generated steps); writes past
    the end are not checked (checking would force a device sync per step).
    """

    def __init__(self, state: dict[str, Any]):
        self.state = state

    @property
    def offset(self) -> mx.array:
        return self.state["offset"]

    @offset.setter
    def offset(self, value: mx.array) -> None:
        self.state["offset"] = value

    @property
    def keys(self) -> list[mx.array]:
        return self.state["keys"]

    @property
    def values(self) -> list[mx.array]:
        return self.state["values"]

    @property
    def max_len(self) -> int:
        return self.state["keys"][0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.state["keys"][0].shape[0]

    @property
    def has_cross_attention(self) -> bool:
        return "cross_keys" in self.state


def _split_heads(x: mx.array, num_heads: int) -> mx.array:
    B, T, _ = x.shape
    return x.reshape(B, T, num_heads, -1).transpose(0, 2, 1, 3)


def _merge_heads(x: mx.array) -> mx.array:
    B, H, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)


class _Packed:
    """Weights of several same-shaped projections packed into one matrix (rows concatenated).

    A decode step at batch 2 is bound by per-kernel launch/encode cost, not by FLOPs, so one
    matmul over the packed rows replaces several (q/k/v, the K codebook heads, the K embedding
    lookups). The modules' own parameters are replaced by row *views* of the packed arrays, so
    nothing is duplicated and `parameters()` / saved weights are unchanged. `valid()` notices a
    later `load_weights`/`update` (the views are no longer the module's arrays) and the caller
    then falls back to the per-module path.
    """

    def __init__(self, mods: list[nn.Module]):
        names = ("weight", "scales", "biases") if isinstance(mods[0], nn.QuantizedLinear) else ("weight",)
        self.quantized = len(names) == 3
        if self.quantized:
            m0 = mods[0]
            self.group_size, self.bits = m0.group_size, m0.bits
            self.mode = getattr(m0, "mode", "affine")
        packed = {n: mx.concatenate([getattr(m, n) for m in mods], axis=0) for n in names}
        mx.eval(packed)
        rows = [m.weight.shape[0] for m in mods]
        self.arrays = packed
        self.members: list[tuple[nn.Module, dict[str, mx.array]]] = []
        start = 0
        for m, r in zip(mods, rows):
            views = {n: packed[n][start:start + r] for n in names}
            mx.eval(views)
            m.update(views)
            self.members.append((m, views))
            start += r

    @staticmethod
    def compatible(mods: list[nn.Module]) -> bool:
        kinds = {type(m) for m in mods}
        if len(kinds) != 1 or kinds.pop() not in (nn.Linear, nn.QuantizedLinear, nn.Embedding):
            return False
        if any("bias" in m for m in mods):
            return False
        m0 = mods[0]
        if isinstance(m0, nn.QuantizedLinear):
            return all((m.group_size, m.bits, getattr(m, "mode", "affine")) ==
                       (m0.group_size, m0.bits, getattr(m0, "mode", "affine")) for m in mods)
        return len({(m.weight.shape[1], m.weight.dtype) for m in mods}) == 1

    def valid(self) -> bool:
        return all(m[n] is v for m, views in self.members for n, v in views.items())

    def __call__(self, x: mx.array) -> mx.array:
        a = self.arrays
        if self.quantized:
            return mx.quantized_matmul(x, a["weight"], scales=a["scales"], biases=a["biases"], transpose=True,
                                       group_size=self.group_size, bits=self.bits, mode=self.mode)
        return x @ a["weight"].T


def _packed(owner: Any, name: str) -> "_Packed | None":
    """The owner's packed weights if still current (set by `MusicgenDecoder.pack_for_decode`)."""
    p = owner.__dict__.get(name)
    return p if p is not None and p.valid() else None


class Attention(nn.Module):
    """Multi-head attention without biases (names as in the checkpoint: q/k/v/out_proj)."""

    def __init__(self, dims: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dims // num_heads) ** -0.5
        self.q_proj = nn.Linear(dims, dims, bias=False)
        self.k_proj = nn.Linear(dims, dims, bias=False)
        self.v_proj = nn.Linear(dims, dims, bias=False)
        self.out_proj = nn.Linear(dims, dims, bias=False)

    def keys_values(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """K and V of `x` (B, S, dims), each (B, heads, S, head_dim)."""
        return _split_heads(self.k_proj(x), self.num_heads), _split_heads(self.v_proj(x), self.num_heads)

    def queries_keys_values(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Q, K, V of `x` (B, T, dims), each (B, heads, T, head_dim); one matmul when packed."""
        packed = _packed(self, "_qkv")
        if packed is None:
            return (_split_heads(self.q_proj(x), self.num_heads), *self.keys_values(x))
        B, T, _ = x.shape
        # (B, T, 3h) -> (3, B, heads, T, head_dim): reshape of a contiguous result + a view.
        qkv = packed(x).reshape(B, T, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def attend(self, x: mx.array, keys: mx.array, values: mx.array,
               mask: mx.array | str | None, q: mx.array | None = None) -> mx.array:
        """Queries from `x` (B, T, dims) (or given, (B, heads, T, head_dim)) attend to given
        keys/values; returns (B, T, dims)."""
        if q is None:
            q = _split_heads(self.q_proj(x), self.num_heads)
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=self.scale, mask=mask)
        return self.out_proj(_merge_heads(out))


class DecoderLayer(nn.Module):
    def __init__(self, args: DecoderArgs):
        super().__init__()
        h, eps = args.hidden_size, args.layer_norm_eps
        self.self_attn_layer_norm = nn.LayerNorm(h, eps=eps)
        self.self_attn = Attention(h, args.num_heads)
        if args.cross_attention:
            self.encoder_attn_layer_norm = nn.LayerNorm(h, eps=eps)
            self.encoder_attn = Attention(h, args.num_heads)
        self.final_layer_norm = nn.LayerNorm(h, eps=eps)
        self.fc1 = nn.Linear(h, args.ffn_dim, bias=False)
        self.fc2 = nn.Linear(args.ffn_dim, h, bias=False)

    def __call__(self, x: mx.array, self_mask: mx.array | str | None,
                 cache: DecoderCache | None, index: int,
                 cross: tuple[mx.array, mx.array, mx.array | None] | None) -> mx.array:
        # Self-attention. With a cache, this call's K/V are written at the offset and the queries
        # attend to the whole fixed-size buffer; `self_mask` hides the slots not yet written.
        h = self.self_attn_layer_norm(x)
        q, k, v = self.self_attn.queries_keys_values(h)
        if cache is not None:
            start = cache.offset.reshape(1)
            k = mx.slice_update(cache.keys[index], k.astype(cache.keys[index].dtype), start, axes=(2,))
            v = mx.slice_update(cache.values[index], v.astype(cache.values[index].dtype), start, axes=(2,))
            cache.keys[index], cache.values[index] = k, v
        x = x + self.self_attn.attend(h, k, v, self_mask, q=q)

        if cross is not None:
            ck, cv, cmask = cross
            x = x + self.encoder_attn.attend(self.encoder_attn_layer_norm(x), ck, cv, cmask)

        # GELU MLP; nn.gelu is the exact erf form, as in the reference.
        return x + self.fc2(nn.gelu(self.fc1(self.final_layer_norm(x))))


def _cross_mask(encoder_mask: mx.array | None) -> mx.array | None:
    """(B, S) 0/1 mask -> (B, 1, 1, S) bool for attention.

    A row with no valid position (the null condition of classifier-free guidance) would make a
    softmax over nothing. The reference adds a large finite negative to every score instead, which
    spreads the weight uniformly over all positions; we reproduce that by letting such rows attend
    everywhere. (Their encoder states are zero, so the projected values and the output are zero.)
    """
    if encoder_mask is None:
        return None
    keep = encoder_mask.astype(mx.bool_)
    keep = mx.logical_or(keep, mx.logical_not(keep.any(axis=-1, keepdims=True)))
    return keep[:, None, None, :]


class MusicgenDecoder(nn.Module):
    """Token embeddings, N decoder layers, final LayerNorm and K codebook heads."""

    def __init__(self, args: DecoderArgs):
        super().__init__()
        self.args = args
        # vocab_size + 1 rows: id 2048 is the pad/BOS token that fills the delay pattern.
        self.embed_tokens = [nn.Embedding(args.vocab_size + 1, args.hidden_size)
                             for _ in range(args.num_codebooks)]
        self.layers = [DecoderLayer(args) for _ in range(args.num_layers)]
        self.layer_norm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.lm_heads = [nn.Linear(args.hidden_size, args.vocab_size, bias=False)
                         for _ in range(args.num_codebooks)]

    # ----------------------------------------------------------------- cache
    def make_cache(self, batch_size: int, max_len: int, dtype: mx.Dtype | None = None) -> DecoderCache:
        """An empty cache for `batch_size` rows and `max_len` positions (prefix + prompt + steps)."""
        a = self.args
        dtype = dtype or self.layers[0].self_attn.k_proj.weight.dtype
        shape = (batch_size, a.num_heads, max_len, a.head_dim)
        return DecoderCache({
            "keys": [mx.zeros(shape, dtype) for _ in range(a.num_layers)],
            "values": [mx.zeros(shape, dtype) for _ in range(a.num_layers)],
            "offset": mx.array(0, dtype=mx.int32),
        })

    def set_cross_attention(self, cache: DecoderCache, encoder_states: mx.array,
                            encoder_mask: mx.array | None = None) -> None:
        """Project the encoder states (B, S, h) to every layer's cross K/V once and store them.

        `encoder_mask` (B, S) is 1 for real text tokens, 0 for padding (and all 0 for the null
        condition); the states are expected to be already multiplied by it (`MusicGen.encode_text`).
        """
        if not self.args.cross_attention:
            raise ValueError("this decoder has no cross-attention (melody models take a prefix)")
        keys, values = [], []
        for layer in self.layers:
            k, v = layer.encoder_attn.keys_values(encoder_states)
            keys.append(k)
            values.append(v)
        cache.state["cross_keys"] = keys
        cache.state["cross_values"] = values
        mask = _cross_mask(encoder_mask)
        cache.state["cross_mask"] = mask if mask is not None else mx.ones(
            (encoder_states.shape[0], 1, 1, encoder_states.shape[1]), dtype=mx.bool_)

    # --------------------------------------------------------------- forward
    def pack_for_decode(self) -> None:
        """Pack q/k/v of every self-attention, the K heads and the K embedding tables into one
        matrix each (no extra memory; see `_Packed`). Idempotent; call outside `mx.compile`."""
        def pack(owner: Any, name: str, mods: list[nn.Module]) -> None:
            if _packed(owner, name) is None and _Packed.compatible(mods):
                owner.__dict__[name] = _Packed(mods)

        for layer in self.layers:
            a = layer.self_attn
            pack(a, "_qkv", [a.q_proj, a.k_proj, a.v_proj])
        pack(self, "_heads", list(self.lm_heads))
        pack(self, "_embed", list(self.embed_tokens))

    def embed_codes(self, codes: mx.array) -> mx.array:
        """Sum of the K codebook embeddings: codes (B, K, T) -> (B, T, h)."""
        packed = _packed(self, "_embed")
        if packed is not None:  # one gather from the stacked tables, codebook k at rows k*(V+1)...
            rows = self.args.vocab_size + 1
            offsets = (mx.arange(self.args.num_codebooks, dtype=codes.dtype) * rows)[None, :, None]
            return packed.arrays["weight"][codes + offsets].sum(axis=1)
        x = self.embed_tokens[0](codes[:, 0])
        for k in range(1, self.args.num_codebooks):
            x = x + self.embed_tokens[k](codes[:, k])
        return x

    def logits(self, hidden: mx.array) -> mx.array:
        """Final-norm'd hidden states (B, T, h) -> logits (B, K, T, vocab)."""
        packed = _packed(self, "_heads")
        if packed is not None:  # (B, T, K*V) from one matmul -> (B, K, T, V)
            B, T, _ = hidden.shape
            out = packed(hidden).reshape(B, T, self.args.num_codebooks, self.args.vocab_size)
            return out.transpose(0, 2, 1, 3)
        return mx.stack([head(hidden) for head in self.lm_heads], axis=1)

    def __call__(self, codes: mx.array, cache: DecoderCache | None = None, *,
                 encoder_states: mx.array | None = None, encoder_mask: mx.array | None = None,
                 prefix: mx.array | None = None) -> mx.array:
        """Run the decoder on codes (B, K, T) and return logits (B, K, T, vocab) for those codes.

        Without a cache this is a plain causal forward over `[prefix, codes]` from position 0;
        cross-attention then uses `encoder_states` (B, S, h) / `encoder_mask` (B, S) directly.

        With a cache, the inputs occupy positions offset .. offset+P+T-1 (P = prefix length, 0
        unless given): their keys/values are written into the cache, every query attends to all
        cached positions up to itself, cross-attention uses the K/V stored by
        `set_cross_attention`, and the offset advances by P+T. Call it once with the prompt
        (prefill, T >= 1, any length; melody models pass `prefix` here) and then once per new
        frame with T = 1 (step). A step has fixed shapes and a traced offset, so it compiles once.

        `prefix` (B, P, h): melody conditioning embeddings (see `MusicGen.melody_prefix`);
        no logits are returned for its positions.
        """
        a = self.args
        x = self.embed_codes(codes)
        P = 0
        if prefix is not None:
            P = prefix.shape[1]
            x = mx.concatenate([prefix.astype(x.dtype), x], axis=1)
        L = x.shape[1]

        if cache is None:
            positions = mx.arange(L)
            self_mask: mx.array | str | None = "causal" if L > 1 else None
        else:
            positions = cache.offset + mx.arange(L)
            # Slot j of the buffer is visible to the query at absolute position p iff j <= p;
            # slots beyond the newest position hold stale zeros and are hidden.
            self_mask = mx.arange(cache.max_len)[None, :] <= positions[:, None]
        x = x + sinusoidal_positions(positions, a.hidden_size).astype(x.dtype)

        cross_for = self._cross_attention_inputs(cache, encoder_states, encoder_mask)
        for i, layer in enumerate(self.layers):
            x = layer(x, self_mask, cache, i, cross_for(i))
        if cache is not None:
            cache.offset = cache.offset + L

        x = self.layer_norm(x[:, P:] if P else x)
        return self.logits(x)

    def _cross_attention_inputs(self, cache: DecoderCache | None, encoder_states: mx.array | None,
                                encoder_mask: mx.array | None):
        """Return i -> (keys, values, mask) of layer i's cross-attention, or None for melody."""
        if not self.args.cross_attention:
            if encoder_states is not None:
                raise ValueError("melody decoders take conditioning as `prefix`, not encoder_states")
            return lambda i: None
        if encoder_states is not None:
            mask = _cross_mask(encoder_mask)
            return lambda i: (*self.layers[i].encoder_attn.keys_values(encoder_states), mask)
        if cache is not None and cache.has_cross_attention:
            s = cache.state
            return lambda i: (s["cross_keys"][i], s["cross_values"][i], s["cross_mask"])
        raise ValueError("cross-attention needs encoder_states, or a cache prepared with "
                         "set_cross_attention()")
