"""LoRA layers over the decoder's (fused) Linear and QuantizedLinear modules, for training.

The runtime decoder runs a fused layout (`mlx_music.models.musicgen_decoder`): one ``qkv_proj``
per self-attention, one ``kv_proj`` per cross-attention and one ``lm_head`` for the K heads. A
LoRA target, though, is a checkpoint module (``q_proj``, ``lm_heads.2``...), the unit PEFT and the
MLX adapter format (`mlx_music.runtime.adapters`) name. `LoRALinear` (and `LoRAEmbedding` for the
fused codebook embeddings) therefore wraps one runtime
module whose output rows are a sequence of *parts* (checkpoint modules, in order) and gives each
targeted part its own factors:

    y = base(x) + concat_p( scale * (dropout(x) @ a_p^T) @ b_p^T )      (zeros for untargeted parts)

``a_p`` (rank, in) and ``b_p`` (rows_p, rank) are in PEFT's ``lora_A.weight`` / ``lora_B.weight``
layout, which is also the MLX adapter layout (``W += scale * b @ a``), so saving needs no
transposes. ``scale = alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA), peft's ``scaling``.
The base may be an ``nn.QuantizedLinear`` (QLoRA, as mlx-lm's tuner): it stays packed and frozen,
only the float32 factors train. Init as peft's ``init_lora_weights=True``: ``a ~ U(+-1/sqrt(in))``
(kaiming-uniform with a=sqrt(5)), ``b = 0``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mlx_music.models.musicgen import MusicGen

# The LoRA targets a user may name (PEFT's names for transformers' MusicGen modules).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
SELECTABLE = DEFAULT_TARGETS + ("lm_heads", "embed_tokens", "enc_to_dec_proj", "audio_enc_to_dec_proj")
_GROUPS = ("lm_heads", "embed_tokens")  # one name for all K codebook modules


@dataclass(frozen=True)
class LoraSettings:
    """rank > 0, alpha > 0, dropout in [0, 1), rslora: scale = alpha/sqrt(rank) instead of alpha/rank."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank

    def check(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"--rank {self.rank!r}: expected a positive integer")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"--alpha {self.alpha!r}: expected a positive number")
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"--lora-dropout {self.dropout!r}: expected a number in [0, 1)")


def _in_dims(base: nn.Module) -> int:
    w = base.weight
    if isinstance(base, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return w.shape[1] * 32 // base.bits  # packed uint32 columns
    return w.shape[1]


class _PartFactors:
    """What LoRALinear and LoRAEmbedding share: the targeted parts and their factors."""

    _targets: tuple[str, ...]
    lora_a: list[mx.array]
    lora_b: list[mx.array]

    @property
    def targets(self) -> tuple[str, ...]:
        return self._targets

    def factors(self) -> dict[str, tuple[mx.array, mx.array]]:
        """checkpoint module name -> (a (rank, in), b (rows, rank)); ``in`` is the input features
        of a linear layer, the dims of an embedding."""
        return {t: (a, b) for t, a, b in zip(self._targets, self.lora_a, self.lora_b)}


class LoRALinear(_PartFactors, nn.Module):
    """A frozen Linear / QuantizedLinear plus trainable low-rank updates of some of its row parts.

    parts: the checkpoint module names of the base's output rows, in order, with their row counts;
    targets: the names (a subset of parts) that get factors. Parameters: ``lora_a[i]`` (rank, in),
    ``lora_b[i]`` (rows_i, rank) for the i-th targeted part, float32.
    """

    def __init__(self, base: nn.Module, parts: list[tuple[str, int]], targets: list[str], settings: LoraSettings,
                 key: mx.array | None = None):
        super().__init__()
        base.freeze()
        self.linear = base
        self._parts = tuple(parts)
        self._targets = tuple(p for p, _ in parts if p in targets)
        self._scale = settings.scale
        self._dropout = settings.dropout
        cols = _in_dims(base)
        bound = 1.0 / math.sqrt(cols)
        keys = mx.random.split(key, len(self._targets)) if key is not None else [None] * len(self._targets)
        rows = dict(parts)
        self.lora_a = [mx.random.uniform(-bound, bound, (settings.rank, cols), key=k) for k in keys]
        self.lora_b = [mx.zeros((rows[t], settings.rank)) for t in self._targets]

    # The base's arrays, read through: the runtime inspects weight / scales dtypes (token_loop).
    @property
    def weight(self) -> mx.array:
        return self.linear.weight

    @property
    def scales(self) -> mx.array:
        if "scales" not in self.linear:
            raise AttributeError("scales")
        return self.linear.scales

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        h = x.astype(mx.float32)
        if self._dropout > 0 and self.training:
            keep = mx.random.bernoulli(1.0 - self._dropout, h.shape)
            h = mx.where(keep, h / (1.0 - self._dropout), 0.0)
        factors = self.factors()
        pieces = []
        for name, rows in self._parts:
            if name in factors:
                a, b = factors[name]
                pieces.append(((h @ a.T) @ b.T) * self._scale)
            else:
                pieces.append(mx.zeros((*x.shape[:-1], rows), mx.float32))
        delta = pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=-1)
        return y + delta.astype(y.dtype)


class LoRAEmbedding(_PartFactors, nn.Module):
    """A frozen Embedding / QuantizedEmbedding whose rows are K part tables (the decoder's fused
    codebook embeddings), with trainable low-rank updates of some parts.

    Per targeted part: ``table += scale * b @ a`` with ``b`` (rows, rank) and ``a`` (rank, dims),
    the MLX adapter layout of an embedding (peft's ``lora_embedding_A`` is ``b^T``,
    ``lora_embedding_B`` is ``a^T``). Init as peft's: ``b = 0``, ``a ~ N(0, 1)``; no dropout (peft
    applies none on embeddings)."""

    def __init__(self, base: nn.Module, parts: list[tuple[str, int]], targets: list[str], settings: LoraSettings,
                 key: mx.array | None = None):
        super().__init__()
        base.freeze()
        self.embedding = base
        self._parts = tuple(parts)
        self._targets = tuple(p for p, _ in parts if p in targets)
        self._scale = settings.scale
        dims = _in_dims(base)
        keys = mx.random.split(key, len(self._targets)) if key is not None else [None] * len(self._targets)
        rows = dict(parts)
        self.lora_a = [mx.random.normal((settings.rank, dims), key=k) for k in keys]
        self.lora_b = [mx.zeros((rows[t], settings.rank)) for t in self._targets]

    @property
    def weight(self) -> mx.array:
        return self.embedding.weight

    def __call__(self, ids: mx.array) -> mx.array:
        y = self.embedding(ids)
        factors = self.factors()
        delta = None
        start = 0
        for name, rows in self._parts:
            if name in factors:
                a, b = factors[name]
                inside = (ids >= start) & (ids < start + rows)
                d = (mx.take(b, mx.clip(ids - start, 0, rows - 1), axis=0) @ a) * self._scale
                d = mx.where(inside[..., None], d, 0.0)
                delta = d if delta is None else delta + d
            start += rows
        return y if delta is None else y + delta.astype(y.dtype)


# ------------------------------------------------------------------ where the targets live
def _runtime_modules(model: MusicGen) -> list[tuple[str, list[str]]]:
    """(runtime module path, its parts' checkpoint names) for every LoRA-able module of a fused model."""
    if not model.decoder.fused:
        raise ValueError("the model must be in its runtime (fused) layout; load it with mlx_music.runtime.load")
    out: list[tuple[str, list[str]]] = []
    for i, layer in enumerate(model.decoder.layers):
        p = f"decoder.layers.{i}"
        out.append((f"{p}.self_attn.qkv_proj", [f"{p}.self_attn.{n}_proj" for n in "qkv"]))
        out.append((f"{p}.self_attn.out_proj", [f"{p}.self_attn.out_proj"]))
        if "encoder_attn" in layer:
            out.append((f"{p}.encoder_attn.q_proj", [f"{p}.encoder_attn.q_proj"]))
            out.append((f"{p}.encoder_attn.kv_proj", [f"{p}.encoder_attn.{n}_proj" for n in "kv"]))
            out.append((f"{p}.encoder_attn.out_proj", [f"{p}.encoder_attn.out_proj"]))
        out.append((f"{p}.fc1", [f"{p}.fc1"]))
        out.append((f"{p}.fc2", [f"{p}.fc2"]))
    out.append(("decoder.lm_head", [f"decoder.lm_heads.{k}" for k in range(model.decoder_args.num_codebooks)]))
    out.append(("decoder.embed", [f"decoder.embed_tokens.{k}" for k in range(model.decoder_args.num_codebooks)]))
    out.append(("enc_to_dec_proj", ["enc_to_dec_proj"]))
    if model.is_melody:
        out.append(("audio_enc_to_dec_proj", ["audio_enc_to_dec_proj"]))
    return out


def _matches(module: str, target: str) -> bool:
    """PEFT's list matching: the module's full name equals the target or ends with "." + target."""
    return module == target or module.endswith("." + target)


def resolve_targets(model: MusicGen, targets: list[str] | tuple[str, ...]) -> list[str]:
    """Checkpoint module names selected by PEFT-style `targets` (``lm_heads`` / ``embed_tokens``
    select all K codebook modules; ``lm_heads.2`` one).

    Raises ValueError naming a target the model does not have (e.g. ``audio_enc_to_dec_proj`` on a
    text model, or a T5 module: T5 is frozen and its states cached, so it is not adapted)."""
    if not targets:
        raise ValueError("--targets: expected at least one module name")
    names = [n for _, parts in _runtime_modules(model) for n in parts]
    chosen: set[str] = set()
    for t in targets:
        t = t.strip()
        pattern = re.compile(rf"{t}(\.\d+)?") if t in _GROUPS else None
        hit = [n for n in names if _matches(n, t) or (pattern and pattern.fullmatch(n.split("decoder.")[-1]))]
        if not hit:
            raise ValueError(f"--targets {t}: not a module of this model that LoRA can train; expected names "
                             f"from {', '.join(SELECTABLE)} (or a full path such as decoder.layers.0.fc1)")
        chosen.update(hit)
    return [n for n in names if n in chosen]


def _get(model: nn.Module, path: str) -> nn.Module:
    m = model
    for part in path.split("."):
        m = m[int(part)] if part.isdigit() else m[part]
    return m


def _set(model: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    owner = _get(model, parent) if parent else model
    owner[name] = value


def _rows(module: nn.Module, n: int) -> int:
    return module.weight.shape[0] // n


def apply_lora(model: MusicGen, targets: list[str] | tuple[str, ...], settings: LoraSettings,
               seed: int = 0) -> dict[str, LoRALinear | LoRAEmbedding]:
    """Freeze `model` and wrap every runtime module holding a target in a `LoRALinear`, in place.

    Returns runtime path -> LoRALinear. Only the LoRA factors are trainable afterwards
    (``model.trainable_parameters()``). Deterministic for a given `seed`."""
    settings.check()
    chosen = set(resolve_targets(model, targets))
    model.freeze()
    key = mx.random.key(seed)
    wrapped: dict[str, LoRALinear | LoRAEmbedding] = {}
    for path, parts in _runtime_modules(model):
        if not chosen.intersection(parts):
            continue
        base = _get(model, path)
        key, sub = mx.random.split(key)
        kind = LoRAEmbedding if isinstance(base, (nn.Embedding, nn.QuantizedEmbedding)) else LoRALinear
        layer = kind(base, [(p, _rows(base, len(parts))) for p in parts], sorted(chosen), settings, sub)
        _set(model, path, layer)
        wrapped[path] = layer
    mx.eval(model.trainable_parameters())
    return wrapped


def grad_checkpoint(model: MusicGen) -> None:
    """Recompute each decoder layer's activations in the backward pass (``mx.checkpoint``): less
    activation memory for more compute. Done per instance (mlx-lm patches the layer class), so
    other models in the process are untouched; the cached decode path is not affected."""
    for layer in model.decoder.layers:
        base = type(layer)
        if getattr(base, "_checkpointed", False):
            continue

        def call(self, x, self_mask, cache, cross, pending=None, _base=base):
            if cache is not None:
                return _base.__call__(self, x, self_mask, cache, cross, pending)

            def inner(params, x, cross, pending):
                self.update(params)
                return _base.__call__(self, x, self_mask, None, cross, pending)

            return mx.checkpoint(inner)(self.trainable_parameters(), x, cross, pending)

        layer.__class__ = type(f"Checkpointed{base.__name__}", (base,), {"__call__": call, "_checkpointed": True})


def lora_factors(wrapped: dict[str, LoRALinear]) -> dict[str, tuple[mx.array, mx.array]]:
    """checkpoint module name -> (a, b) over all wrapped layers."""
    out: dict[str, tuple[mx.array, mx.array]] = {}
    for layer in wrapped.values():
        out.update(layer.factors())
    return out


def set_lora_factors(wrapped: dict[str, LoRALinear], factors: dict[str, tuple[mx.array, mx.array]]) -> None:
    """Assign factors (checkpoint module name -> (a, b)); shapes must match. Raises ValueError."""
    seen = set()
    for layer in wrapped.values():
        for i, t in enumerate(layer.targets):
            if t not in factors:
                raise ValueError(f"adapter: module {t}: no factors given")
            a, b = factors[t]
            if tuple(a.shape) != tuple(layer.lora_a[i].shape) or tuple(b.shape) != tuple(layer.lora_b[i].shape):
                raise ValueError(f"adapter: module {t}: shapes {list(a.shape)}/{list(b.shape)} do not fit "
                                 f"{list(layer.lora_a[i].shape)}/{list(layer.lora_b[i].shape)}")
            layer.lora_a[i] = mx.array(a).astype(mx.float32)
            layer.lora_b[i] = mx.array(b).astype(mx.float32)
            seen.add(t)
    extra = sorted(set(factors) - seen)
    if extra:
        raise ValueError(f"adapter: module {extra[0]}: not trained here")


__all__ = ["DEFAULT_TARGETS", "LoRAEmbedding", "LoRALinear", "LoraSettings", "SELECTABLE", "apply_lora", "grad_checkpoint", "lora_factors",
           "resolve_targets", "set_lora_factors"]
