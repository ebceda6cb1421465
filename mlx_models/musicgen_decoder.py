"""The MusicGen audio-token decoder (a pre-LayerNorm transformer over K parallel codebooks), in MLX.

At each time step the decoder sees K codebook tokens (K = 4 mono, 8 stereo). Their K embeddings
are summed into one vector, a sinusoidal position is added, and N pre-LayerNorm layers
(self-attention, optional cross-attention to the text, GELU MLP) follow. K separate heads
predict the next token of each codebook: logits (B, K, T, 2048).

Two conditioning styles exist:
  * text-to-music (`cross_attention=True`): each layer cross-attends to the projected T5 states;
  * melody (`cross_attention=False`): the conditioning (chroma projection then text projection) is
    *prepended* to the decoder input as a prefix; positions count from the start of the prefix.

The module tree as constructed is the checkpoint's (q_proj/k_proj/v_proj, embed_tokens.k,
lm_heads.k); after the weights are set, `MusicgenDecoder.fuse()` (called by `MusicGen.load_weights`)
merges q/k/v, the K embedding tables and the K heads into one module each, and the forward runs
only that fused layout.

Generation uses a preallocated key/value cache (`DecoderCache`: one fixed-size `KVCache` per
layer, mlx-lm style `update_and_fetch`) so that a single-token step has fixed shapes and can be
wrapped in `mx.compile` without retracing:

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

from mlx_music.models.kernels import add_layer_norm, cuda_kernels_enabled, decode_attention, linear


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


class KVCache:
    """One decoder layer's attention cache, fixed size (mlx-lm's `update_and_fetch` interface).

    The arrays live in the shared `DecoderCache.state` (this layer's dict is
    `state["layers"][index]`, the write position is `state["offset"]`) and are read through it
    on every call, so the leaves that `mx.compile` swaps in that tree are always the ones used.

    state["layers"][i]["kv"]: self-attention keys and values in one buffer,
        (2, B, heads, max_len, head_dim) (one `slice_update` per layer and step);
    state["layers"][i]["cross_kv"]: cross-attention keys and values (2, B, heads, S, head_dim),
        present once `MusicgenDecoder.set_cross_attention` has run (text models).
    """

    def __init__(self, root: dict[str, Any], index: int):
        self._root = root
        self.index = index

    @property
    def state(self) -> dict[str, mx.array]:
        return self._root["layers"][self.index]

    @property
    def offset(self) -> mx.array:
        return self._root["offset"]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Write keys/values (B, heads, T, head_dim) at the offset; return the whole buffers.

        The offset is not advanced here: all layers write at the same position, and
        `MusicgenDecoder.__call__` advances the shared offset once per call. Slots past the newest
        position hold stale values; the caller's mask must hide them.
        """
        kv = self.update_stacked(mx.stack([keys, values]))
        return kv[0], kv[1]

    def update_stacked(self, kv: mx.array) -> mx.array:
        """Write stacked keys and values (2, B, heads, T, head_dim) at the offset in one update;
        return the whole buffer (2, B, heads, max_len, head_dim)."""
        st = self.state
        st["kv"] = mx.slice_update(st["kv"], kv.astype(st["kv"].dtype), self.offset.reshape(1), axes=(3,))
        return st["kv"]

    def set_cross(self, keys: mx.array, values: mx.array) -> None:
        self.state["cross_kv"] = mx.stack([keys, values])

    def cross(self) -> tuple[mx.array, mx.array, mx.array]:
        """(keys, values, mask) of this layer's cross-attention."""
        kv = self.state["cross_kv"]
        return kv[0], kv[1], self._root["cross_mask"]


class DecoderCache:
    """The preallocated attention state of one generation: one `KVCache` per layer.

    Every mutable array lives in the dict `self.state` (never replace `state` itself), so a step
    compiles with the cache captured as state:

        step = mx.compile(lambda codes: model.step(codes, cache), inputs=cache.state,
                          outputs=cache.state)

    state["offset"]: int32 scalar array, number of positions already written; set it to
        mx.array(0, dtype=mx.int32) to reuse the cache for a new generation (stale slots are
        hidden by the mask and overwritten before they are read).
    state["layers"][i]: layer i's arrays (see `KVCache`).
    state["cross_mask"]: (B, 1, 1, S) bool, which encoder positions may be attended to (text
        models, after `MusicgenDecoder.set_cross_attention`).
    state["keep"], state["shift"]: (B, max_len) bool slots that may be attended to, and (B,) int32
        slots left out before the codes (melody models, after a prefill with `prefix_mask`): row b's
        code in slot j sits at position j - shift[b].

    `max_len` must cover every position written (prefix + prompt + generated steps); writes past
    the end are not checked (checking would force a device sync per step).
    """

    def __init__(self, state: dict[str, Any]):
        self.state = state
        self.layers = [KVCache(state, i) for i in range(len(state["layers"]))]

    @classmethod
    def empty(cls, num_layers: int, batch_size: int, num_heads: int, max_len: int, head_dim: int,
              dtype: mx.Dtype) -> "DecoderCache":
        shape = (2, batch_size, num_heads, max_len, head_dim)
        return cls({
            "layers": [{"kv": mx.zeros(shape, dtype)} for _ in range(num_layers)],
            "offset": mx.array(0, dtype=mx.int32),
        })

    @property
    def offset(self) -> mx.array:
        return self.state["offset"]

    @offset.setter
    def offset(self, value: mx.array) -> None:
        self.state["offset"] = value

    @property
    def max_len(self) -> int:
        return self.state["layers"][0]["kv"].shape[3]

    @property
    def batch_size(self) -> int:
        return self.state["layers"][0]["kv"].shape[1]

    @property
    def has_cross_attention(self) -> bool:
        return "cross_mask" in self.state


def _split_heads(x: mx.array, num_heads: int) -> mx.array:
    B, T, _ = x.shape
    return x.reshape(B, T, num_heads, -1).transpose(0, 2, 1, 3)


def _split_stacked(x: mx.array, n: int, num_heads: int) -> list[mx.array]:
    """(B, T, n*dims) of n concatenated projections -> n arrays (B, heads, T, head_dim)."""
    B, T, _ = x.shape
    parts = x.reshape(B, T, n, num_heads, -1).transpose(2, 0, 3, 1, 4)  # a view, no copy
    return [parts[i] for i in range(n)]


def _merge_heads(x: mx.array) -> mx.array:
    B, H, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)


# On MLX's CUDA backend a quantized matmul of 8 or more rows runs a tensor-core kernel (`qmm`)
# that, at 8-32 rows, costs more GPU time than reading bf16 weights (H200, musicgen-medium q8:
# 156.6 steps/s at 2 rows, 49.5 at 32; bf16 83-104). Caches of at least this many rows therefore
# give each quantized linear a dequantized copy (`MusicgenDecoder.make_cache`), CUDA only.
DENSE_ROWS_CUDA = 8


class _DenseCopy:
    """A quantized linear's dequantized weight, transposed to (in, out) for `x @ weight_t`.
    A plain object, so it is not a parameter (never saved, fused or adapted). It remembers the
    packed array it was made from: new weights (`load_weights`) make it stale, hence unused."""

    def __init__(self, m: nn.QuantizedLinear):
        self.source = self._packed(m)
        self.weight_t = mx.contiguous(float_weight(m).T)
        self.bias = m.bias if "bias" in m else None
        mx.eval(self.weight_t)

    @staticmethod
    def _packed(m: nn.Module) -> list[mx.array]:
        return [m[n] for n in ("weight", "scales", "biases", "bias") if n in m]

    @classmethod
    def of(cls, m: nn.Module) -> "_DenseCopy | None":
        """m's copy if it has one made from its current arrays."""
        dense = getattr(m, "_dense", None)
        current = cls._packed(m)
        if dense is None or len(current) != len(dense.source):
            return None
        return dense if all(a is b for a, b in zip(current, dense.source)) else None


def _linear(m: nn.Module, x: mx.array) -> mx.array:
    """m(x); quantized layers see the rows flattened to one matrix, or use their dense copy.

    MLX's CUDA quantized matmul treats a (B, 1, in) input as B separate products of one row each
    (re-reading the weights per row once B >= 8); as (B, in) it is one product of B rows. With
    `DENSE_ROWS_CUDA` rows or more, a layer that has a `_DenseCopy` multiplies by that instead.
    """
    if type(m) is nn.Linear:  # the opt-in small-row GEMV on CUDA, else m(x) (`kernels.linear`)
        return linear(x, m.weight, m.get("bias"))
    if not isinstance(m, nn.QuantizedLinear):
        return m(x)
    flat = x.reshape(-1, x.shape[-1])
    dense = _DenseCopy.of(m)
    if dense is not None and flat.shape[0] >= DENSE_ROWS_CUDA:
        y = flat @ dense.weight_t if dense.bias is None else mx.addmm(dense.bias, flat, dense.weight_t)
    else:
        y = m(flat)
    return y.reshape(*x.shape[:-1], -1)


def _norm(m: nn.LayerNorm, x: mx.array, d: mx.array | None) -> tuple[mx.array, mx.array]:
    """(x + d, m(x + d)) with one fused kernel where available (d None: no residual)."""
    return add_layer_norm(x, d, m.weight, m.bias, m.eps)


# ------------------------------------------------------------------- fusing at load time
_ROWS = ("weight", "scales", "biases", "bias")  # the row-indexed arrays of the fusable modules


def _quant_key(m: nn.Module) -> tuple | None:
    if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return (m.group_size, m.bits, getattr(m, "mode", "affine"), "biases" in m)
    return None


def float_weight(m: nn.Module) -> mx.array:
    """The float weight of a Linear/Embedding, quantized or not: (out, in) / (rows, dims) in the
    dtype of the scales (per group ``scale * q + bias``, MLX's `dequantize`)."""
    if _quant_key(m) is None:
        return m.weight
    return mx.dequantize(m.weight, m.scales, m.get("biases"), group_size=m.group_size, bits=m.bits,
                         mode=getattr(m, "mode", "affine")).astype(m.scales.dtype)


def _new_like(kind: str, quant: tuple | None) -> nn.Module:
    """An empty (tiny) module of the right class; its arrays are assigned by the caller."""
    if quant is None:
        m = nn.Linear(1, 1, bias=False) if kind == "linear" else nn.Embedding(1, 1)
    else:
        gs, bits, mode, _ = quant
        m = (nn.QuantizedLinear(gs, 1, bias=False, group_size=gs, bits=bits, mode=mode) if kind == "linear"
             else nn.QuantizedEmbedding(1, gs, group_size=gs, bits=bits, mode=mode))
    for n in _ROWS:
        if n in m:
            del m[n]
    return m


def fuse_rows(mods: list[nn.Module]) -> nn.Module:
    """One module whose output rows are those of `mods` in order (Linear: outputs concatenated on
    the last axis; Embedding: tables stacked, member k's id i is row k*rows + i).

    Float members give an nn.Linear / nn.Embedding, quantized members with one group size, bit
    width and mode give a QuantizedLinear / QuantizedEmbedding (weight, scales and biases rows
    concatenated: bit-identical per-row quantization). A mixed group (never produced by the
    converter, which quantizes a layer's q/k/v and all heads alike) is dequantized to float.
    """
    kind = "embedding" if isinstance(mods[0], (nn.Embedding, nn.QuantizedEmbedding)) else "linear"
    quants = {_quant_key(m) for m in mods}
    quant = quants.pop() if len(quants) == 1 else None
    names = [n for n in ("weight", "scales", "biases") if n in mods[0]] if quant else ["weight"]
    arrays = {n: mx.concatenate([getattr(m, n) if quant else float_weight(m) for m in mods], axis=0)
              for n in names}
    if any("bias" in m for m in mods):
        arrays["bias"] = mx.concatenate([m.bias if "bias" in m else mx.zeros((m.weight.shape[0],), m.weight.dtype)
                                         for m in mods])
    mx.eval(arrays)  # materialise now, so the members' arrays can be freed
    fused = _new_like(kind, quant)
    for n, a in arrays.items():
        fused[n] = a
    return fused


def split_rows(fused: nn.Module, n: int) -> list[nn.Module]:
    """Inverse of `fuse_rows` for n equal members (copies of the row slices)."""
    kind = "embedding" if isinstance(fused, (nn.Embedding, nn.QuantizedEmbedding)) else "linear"
    rows = fused.weight.shape[0] // n
    out = []
    for i in range(n):
        m = _new_like(kind, _quant_key(fused))
        for name in _ROWS:
            if name in fused:
                m[name] = mx.array(fused[name][i * rows:(i + 1) * rows])
        out.append(m)
    mx.eval([m.parameters() for m in out])
    return out


def banded_attention(q: mx.array, k: mx.array, v: mx.array, width: int, scale: float) -> mx.array:
    """Attention where query i sees keys j with |i - j| <= width: (B, H, T, D) each -> (B, H, T, D).

    The same as scaled_dot_product_attention with that band as a mask, but it computes only the
    2 * width + 1 scores of each query (MAGNeT's restricted context: 11 of T), not T x T."""
    B, H, T, D = k.shape
    n = 2 * width + 1

    def windows(x: mx.array) -> mx.array:  # (B, H, T, n, D): row t holds positions t - width .. t + width
        x = mx.contiguous(mx.pad(x, [(0, 0), (0, 0), (width, width), (0, 0)]))
        L = T + 2 * width
        return mx.as_strided(x, (B, H, T, n, D), (H * L * D, L * D, D, D, 1))

    scores = (q[:, :, :, None, :] * windows(k)).sum(axis=-1) * scale  # (B, H, T, n)
    pos = mx.arange(T)[:, None] + mx.arange(n)[None, :] - width
    scores = mx.where((pos >= 0) & (pos < T), scores, -mx.inf)
    weights = mx.softmax(scores.astype(mx.float32), axis=-1).astype(v.dtype)
    out = (weights[..., None] * windows(v)).sum(axis=-2)  # (B, H, T, D)
    return _merge_heads(out)


# ------------------------------------------------------------------------------ modules
class Attention(nn.Module):
    """Multi-head attention without biases.

    As constructed, the projections are the checkpoint's q_proj/k_proj/v_proj/out_proj. `fuse`
    (run by `MusicgenDecoder.fuse` after the weights are loaded) merges them into fewer matmuls;
    the forward methods use only the fused layout.
    """

    def __init__(self, dims: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dims // num_heads) ** -0.5
        self.q_proj = nn.Linear(dims, dims, bias=False)
        self.k_proj = nn.Linear(dims, dims, bias=False)
        self.v_proj = nn.Linear(dims, dims, bias=False)
        self.out_proj = nn.Linear(dims, dims, bias=False)

    _FUSED: tuple[str, tuple[str, ...]] = ("", ())  # (fused name, checkpoint names) per subclass

    def fuse(self) -> None:
        name, parts = self._FUSED
        setattr(self, name, fuse_rows([getattr(self, p) for p in parts]))
        for p in parts:
            delattr(self, p)

    def unfuse(self) -> None:
        name, parts = self._FUSED
        for p, m in zip(parts, split_rows(getattr(self, name), len(parts))):
            setattr(self, p, m)
        delattr(self, name)

    def attend(self, q: mx.array, keys: mx.array, values: mx.array, mask: mx.array | str | int | None) -> mx.array:
        if isinstance(mask, int):  # a band |i - j| <= mask: only the band is computed
            out = banded_attention(q, keys, values, mask, self.scale)
        else:
            out = _merge_heads(mx.fast.scaled_dot_product_attention(q, keys, values, scale=self.scale, mask=mask))
        return _linear(self.out_proj, out)

    def attend_decode(self, q: mx.array, kv: mx.array, visible: mx.array, by_limit: bool) -> mx.array:
        """One query position per row over a stacked (2, B, heads, L, head_dim) K/V buffer."""
        out = decode_attention(q, kv, visible, by_limit=by_limit, scale=self.scale)
        return _linear(self.out_proj, out)


class SelfAttention(Attention):
    _FUSED = ("qkv_proj", ("q_proj", "k_proj", "v_proj"))

    def __call__(self, x: mx.array, mask: mx.array | str | None, cache: KVCache | None) -> mx.array:
        B, T, _ = x.shape
        qkv = _linear(self.qkv_proj, x).reshape(B, T, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        q = qkv[0]
        if cache is None:
            return self.attend(q, qkv[1], qkv[2], mask)
        kv = cache.update_stacked(qkv[1:])  # keys and values: one write into one buffer
        if T == 1:  # decode step: slot j is visible iff j <= offset (and, with a mask, kept)
            if mask is None:
                return self.attend_decode(q, kv, cache.offset, by_limit=True)
            return self.attend_decode(q, kv, mask, by_limit=False)
        return self.attend(q, kv[0], kv[1], mask)


class CrossAttention(Attention):
    _FUSED = ("kv_proj", ("k_proj", "v_proj"))

    def keys_values(self, states: mx.array) -> tuple[mx.array, mx.array]:
        """K and V of the encoder states (B, S, dims), each (B, heads, S, head_dim)."""
        k, v = _split_stacked(_linear(self.kv_proj, states), 2, self.num_heads)
        return k, v

    def __call__(self, x: mx.array, keys: mx.array, values: mx.array, mask: mx.array | None,
                 stacked: mx.array | None = None) -> mx.array:
        q = _split_heads(_linear(self.q_proj, x), self.num_heads)
        if stacked is not None and x.shape[1] == 1 and mask is not None:
            return self.attend_decode(q, stacked, mask.reshape(mask.shape[0], mask.shape[-1]), by_limit=False)
        return self.attend(q, keys, values, mask)


class DecoderLayer(nn.Module):
    def __init__(self, args: DecoderArgs):
        super().__init__()
        h, eps = args.hidden_size, args.layer_norm_eps
        self.self_attn_layer_norm = nn.LayerNorm(h, eps=eps)
        self.self_attn = SelfAttention(h, args.num_heads)
        if args.cross_attention:
            self.encoder_attn_layer_norm = nn.LayerNorm(h, eps=eps)
            self.encoder_attn = CrossAttention(h, args.num_heads)
        self.final_layer_norm = nn.LayerNorm(h, eps=eps)
        self.fc1 = nn.Linear(h, args.ffn_dim, bias=False)
        self.fc2 = nn.Linear(args.ffn_dim, h, bias=False)

    def __call__(self, x: mx.array, self_mask: mx.array | str | None, cache: KVCache | None,
                 cross: tuple | None, pending: mx.array | None = None) -> tuple[mx.array, mx.array]:
        """Returns (x, d): the layer's output is x + d. The last residual add is left to the
        caller (`pending` of the next layer, or the final norm), so that every residual add runs
        fused with the LayerNorm after it (`_norm`)."""
        # Self-attention. With a cache, this call's K/V are written at the offset and the queries
        # attend to the whole fixed-size buffer; `self_mask` / the offset hide unwritten slots.
        x, h = _norm(self.self_attn_layer_norm, x, pending)
        d = self.self_attn(h, self_mask, cache)
        if cross is not None:
            x, h = _norm(self.encoder_attn_layer_norm, x, d)
            d = self.encoder_attn(h, *cross)
        # GELU MLP; nn.gelu is the exact erf form, as in the reference.
        x, h = _norm(self.final_layer_norm, x, d)
        return x, _linear(self.fc2, nn.gelu(_linear(self.fc1, h)))


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


def _kept_positions(keep: mx.array) -> mx.array:
    """(B, L) positions of a row's slots counting only kept ones: kept slot j is at the number of
    kept slots before it (a left-out slot shares the next kept slot's position; it is never seen)."""
    k = keep.astype(mx.int32)
    return mx.cumsum(k, axis=1) - k


class _Tables:
    """Derived constant arrays (the position table); kept outside the module's parameters."""

    def __init__(self) -> None:
        self.cache: dict = {}


class MusicgenDecoder(nn.Module):
    """Token embeddings, N decoder layers, final LayerNorm and K codebook heads.

    Constructed with the checkpoint's layout (`embed_tokens.k`, `layers.i.self_attn.q_proj`, ...,
    `lm_heads.k`), which is what `load_weights` checks and loads. `fuse()` then rewrites it to the
    layout the forward runs (one matmul/gather where the checkpoint has several):

        embed_tokens.0..K-1                  -> embed      (K*(vocab+1) rows; codebook k at k*(vocab+1))
        layers.i.self_attn.{q,k,v}_proj      -> layers.i.self_attn.qkv_proj
        layers.i.encoder_attn.{k,v}_proj     -> layers.i.encoder_attn.kv_proj
        lm_heads.0..K-1                      -> lm_head    (K*vocab output rows)

    `unfuse()` restores the checkpoint layout. The forward requires the fused layout.
    """

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
        self._fused = False
        self._tables = _Tables()  # a plain object: not part of the parameter tree

    # ---------------------------------------------------------------- layout
    @property
    def fused(self) -> bool:
        return self._fused

    def fuse(self) -> None:
        """Checkpoint layout -> runtime layout (see the class docstring). Idempotent. Works on
        float and quantized (nn.quantize'd) members alike; the fused arrays are evaluated here."""
        if self._fused:
            return
        for layer in self.layers:
            layer.self_attn.fuse()
            if self.args.cross_attention:
                layer.encoder_attn.fuse()
        self.embed = fuse_rows(self.embed_tokens)
        self.lm_head = fuse_rows(self.lm_heads)
        del self.embed_tokens, self.lm_heads
        self._fused = True

    def unfuse(self) -> None:
        """Runtime layout -> checkpoint layout (row slices of the fused arrays). Idempotent."""
        if not self._fused:
            return
        for layer in self.layers:
            layer.self_attn.unfuse()
            if self.args.cross_attention:
                layer.encoder_attn.unfuse()
        self.embed_tokens = split_rows(self.embed, self.args.num_codebooks)
        self.lm_heads = split_rows(self.lm_head, self.args.num_codebooks)
        del self.embed, self.lm_head
        self._fused = False

    # ----------------------------------------------------------------- cache
    def make_cache(self, batch_size: int, max_len: int, dtype: mx.Dtype | None = None) -> DecoderCache:
        """An empty cache for `batch_size` rows and `max_len` positions (prefix + prompt + steps).
        dtype defaults to the float dtype of the decoder's norms."""
        a = self.args
        dtype = dtype or self.layer_norm.weight.dtype
        self._position_table(max_len, dtype)
        if batch_size >= DENSE_ROWS_CUDA and cuda_kernels_enabled():
            self.add_dense_copies()
        return DecoderCache.empty(a.num_layers, batch_size, a.num_heads, max_len, a.head_dim, dtype)

    def add_dense_copies(self) -> int:
        """Give every quantized linear of the layers and the heads a dequantized copy (see
        `DENSE_ROWS_CUDA`), used by calls with that many rows. Costs the float weights' memory
        on top of the packed ones. Returns the number of copies made (0 when all are current)."""
        self._check_fused()
        made = 0
        for _, m in self.named_modules():
            if isinstance(m, nn.QuantizedLinear) and _DenseCopy.of(m) is None:
                m._dense = _DenseCopy(m)
                made += 1
        return made

    def set_cross_attention(self, cache: DecoderCache, encoder_states: mx.array,
                            encoder_mask: mx.array | None = None) -> None:
        """Project the encoder states (B, S, h) to every layer's cross K/V once and store them.

        `encoder_mask` (B, S) is 1 for real text tokens, 0 for padding (and all 0 for the null
        condition); the states are expected to be already multiplied by it (`MusicGen.encode_text`).
        """
        if not self.args.cross_attention:
            raise ValueError("this decoder has no cross-attention (melody models take a prefix)")
        self._check_fused()
        for layer, layer_cache in zip(self.layers, cache.layers):
            layer_cache.set_cross(*layer.encoder_attn.keys_values(encoder_states))
        mask = _cross_mask(encoder_mask)
        cache.state["cross_mask"] = mask if mask is not None else mx.ones(
            (encoder_states.shape[0], 1, 1, encoder_states.shape[1]), dtype=mx.bool_)

    # --------------------------------------------------------------- forward
    def _check_fused(self) -> None:
        if not self._fused:
            raise RuntimeError("MusicgenDecoder runs in the fused layout: call fuse() after setting "
                               "weights (MusicGen.load_weights does it)")

    def embed_codes(self, codes: mx.array) -> mx.array:
        """Sum of the K codebook embeddings: codes (B, K, T) -> (B, T, h); one gather."""
        rows = self.args.vocab_size + 1
        offsets = (mx.arange(self.args.num_codebooks, dtype=codes.dtype) * rows)[None, :, None]
        return self.embed(codes + offsets).sum(axis=1)

    def logits(self, hidden: mx.array, codebook: int | None = None) -> mx.array:
        """Final-norm'd hidden states (B, T, h) -> logits (B, K, T, vocab); one matmul.
        ``codebook`` k: only that head's logits, (B, 1, T, vocab) (MAGNeT predicts one level)."""
        B, T, _ = hidden.shape
        if codebook is not None:
            v = self.args.vocab_size
            head = _new_like("linear", _quant_key(self.lm_head))
            for name in _ROWS:
                if name in self.lm_head:
                    head[name] = self.lm_head[name][codebook * v:(codebook + 1) * v]
            return _linear(head, hidden)[:, None]
        out = _linear(self.lm_head, hidden).reshape(B, T, self.args.num_codebooks, self.args.vocab_size)
        return out.transpose(0, 2, 1, 3)

    def __call__(self, codes: mx.array, cache: DecoderCache | None = None, *,
                 encoder_states: mx.array | None = None, encoder_mask: mx.array | None = None,
                 prefix: mx.array | None = None, attention_mask: mx.array | str | None = "causal",
                 codebook: int | None = None, prefix_mask: mx.array | None = None,
                 logit_positions: mx.array | None = None) -> mx.array:
        """Run the decoder on codes (B, K, T) and return logits (B, K, T, vocab) for those codes.

        Without a cache this is a plain causal forward over `[prefix, codes]` from position 0;
        cross-attention then uses `encoder_states` (B, S, h) / `encoder_mask` (B, S) directly.
        `attention_mask` replaces the causal self-attention mask there: None attends everywhere,
        a (T, T) bool array (True = visible) restricts it, an int w restricts it to |i - j| <= w
        and computes only that band (MAGNeT's stage masks, `banded_attention`). `codebook` k
        returns only that head's logits (B, 1, T, vocab); `logit_positions` (B, M) int only the logits
        of those positions (B, K or 1, M, vocab).

        With a cache, the inputs occupy positions offset .. offset+P+T-1 (P = prefix length, 0
        unless given): their keys/values are written into the cache, every query attends to all
        cached positions up to itself, cross-attention uses the K/V stored by
        `set_cross_attention`, and the offset advances by P+T. Call it once with the prompt
        (prefill, T >= 1, any length; melody models pass `prefix` here) and then once per new
        frame with T = 1 (step). A step has fixed shapes and a traced offset, so it compiles once.

        `prefix` (B, P, h): melody conditioning embeddings (see `MusicGen.melody_prefix`);
        no logits are returned for its positions.

        `prefix_mask` (B, P) bool: the prefix slots each row attends to (a cached call with it must
        start at offset 0). Left-out slots (a shorter prompt's padding) are hidden from every query
        and take no position: a row's kept slots count positions 0, 1, ... as if the others were
        not there, so each row computes what it would alone with its own prefix (bit for bit when
        the slot layout is the same). The cache keeps the row masks and shifts for later steps.
        """
        self._check_fused()
        x = self.embed_codes(codes)
        B = codes.shape[0]
        P = 0
        if prefix is not None:
            P = prefix.shape[1]
            x = mx.concatenate([prefix.astype(x.dtype), x], axis=1)
        L = x.shape[1]
        keep = None  # (B, L): slots of this call that may be attended to, when rows differ
        if prefix_mask is not None:
            if prefix is None or tuple(prefix_mask.shape) != (B, P):
                raise ValueError(f"prefix_mask must be (batch, prefix length) = {(B, P)}, "
                                 f"got {tuple(prefix_mask.shape)}")
            keep = mx.concatenate([prefix_mask.astype(mx.bool_), mx.ones((B, L - P), mx.bool_)], axis=1)

        self_mask: mx.array | str | None = None
        if cache is None:
            positions = mx.arange(L)
            self_mask = None if isinstance(attention_mask, str) and L == 1 else attention_mask
            layer_caches: list[KVCache | None] = [None] * len(self.layers)
            if keep is not None:
                positions = _kept_positions(keep)
                if isinstance(attention_mask, str):
                    attention_mask = mx.arange(L)[None, :] <= mx.arange(L)[:, None]
                visible = keep[:, None, None, :]
                self_mask = visible if attention_mask is None else attention_mask & visible
        else:
            slots = cache.offset + mx.arange(L)
            positions = slots
            if keep is not None:
                positions = _kept_positions(keep)
                cache.state["keep"] = mx.concatenate([keep, mx.ones((B, cache.max_len - L), mx.bool_)], axis=1)
                cache.state["shift"] = (L - keep.astype(mx.int32).sum(axis=1)).astype(mx.int32)
            elif prefix is not None:
                cache.state.pop("keep", None)  # a plain prefill: every slot counts again
                cache.state.pop("shift", None)
            elif "shift" in cache.state:
                positions = slots[None, :] - cache.state["shift"][:, None]  # (B, L)
            # Slot j of the buffer is visible to the query in slot p iff j <= p (and j is kept);
            # slots beyond the newest position hold stale values and are hidden. A single-position
            # step of unmasked rows needs no mask array: the attention reads the offset itself.
            kept = cache.state.get("keep")
            if L > 1:
                self_mask = mx.arange(cache.max_len)[None, :] <= slots[:, None]
                if kept is not None:
                    self_mask = self_mask[None, None] & kept[:, None, None, :]
            elif kept is not None:
                self_mask = kept & (mx.arange(cache.max_len) <= cache.offset)[None, :]
            layer_caches = cache.layers
        x = x + self._positions(positions, L, cache, x.dtype)

        cross_for = self._cross_attention_inputs(cache, encoder_states, encoder_mask)
        d = None
        for i, (layer, layer_cache) in enumerate(zip(self.layers, layer_caches)):
            x, d = layer(x, self_mask, layer_cache, cross_for(i), d)
        if cache is not None:
            cache.offset = cache.offset + L

        ln = self.layer_norm
        if P:
            x = self.layer_norm(x[:, P:] + d[:, P:])
        else:
            x = _norm(ln, x, d)[1]
        if logit_positions is not None:
            x = mx.take_along_axis(x, logit_positions[..., None].astype(mx.int32), axis=1)
        return self.logits(x, codebook)

    def _positions(self, positions: mx.array, L: int, cache: DecoderCache | None, dtype: mx.Dtype) -> mx.array:
        """Sinusoidal embeddings (L, h) of `positions` (L,) in `dtype`, or (B, L, h) of per-row
        positions (B, L). A decode step (L == 1) gathers one row of a table computed once per
        (length, dtype), one primitive instead of the arange/exp/cos/sin/concatenate/cast chain;
        other calls compute them directly."""
        h = self.args.hidden_size
        table = None if cache is None or L != 1 else self._tables.cache.get((cache.max_len, dtype))
        if table is not None:
            return mx.take(table, positions, axis=0)
        if positions.ndim == 2:
            return sinusoidal_positions(positions.reshape(-1), h).reshape(*positions.shape, h).astype(dtype)
        return sinusoidal_positions(positions, h).astype(dtype)  # (a cache not made by make_cache too)

    def _position_table(self, max_len: int, dtype: mx.Dtype) -> None:
        """Compute the decode-step position table for a cache of `max_len` (outside any trace)."""
        key = (max_len, dtype)
        if key not in self._tables.cache:
            table = sinusoidal_positions(mx.arange(max_len), self.args.hidden_size).astype(dtype)
            mx.eval(table)
            self._tables.cache = {key: table}  # one table at a time

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
            return lambda i: (*cache.layers[i].cross(), cache.layers[i].state["cross_kv"])
        raise ValueError("cross-attention needs encoder_states, or a cache prepared with "
                         "set_cross_attention()")
