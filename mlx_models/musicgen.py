"""MusicGen in MLX: T5 text encoder + projection(s) + audio-token decoder + EnCodec.

Data flow of one generation (the sampling loop itself lives in runtime/):

    text ids --T5--> (B, S, 768) --enc_to_dec_proj--> (B, S, h) * mask      `encode_text`
    text models:   decoder cross-attends to those states                    `prepare` / `prefill`
    melody models: prefix = [chroma one-hot -> audio_enc_to_dec_proj, tiled to chroma_length;
                             projected text states] is prepended to the codes `melody_prefix`
    codes (B, K, T) --decoder--> logits (B, K, T, 2048)                      `prefill` / `step`
    codes --EnCodec decoder--> waveform                                      `audio_encoder`

Classifier-free guidance (done by the caller) doubles the batch with a null condition: T5 output
replaced by zeros and an all-zero mask for text models (the projection's bias is then masked
away); zero text states and a chroma one-hot on bin 0 (`chroma=None`) for melody models.
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any, Mapping

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_music.models.musicgen_decoder import DecoderArgs, DecoderCache, MusicgenDecoder
from mlx_music.models.t5 import T5Args, T5Encoder

from mlx_music.models.encodec import EncodecArgs, EncodecModel


def checkpoint_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Flat checkpoint name -> shape of an unquantized checkpoint for `config` (notes/SPEC.md).

    The same as `tree_flatten(MusicGen(config).parameters())`: a freshly constructed model has
    the checkpoint layout; only `load_weights` (via `fuse`) changes it to the runtime layout.
    """
    return {k: tuple(v.shape) for k, v in tree_flatten(MusicGen(config).parameters())}


class MusicGen(nn.Module):
    """The full model.

    Two layouts of the same weights:
      * checkpoint layout (as constructed, and after `unfuse()`): parameter names match
        notes/SPEC.md and the converter's output; `nn.quantize(model, class_predicate=...)` with
        checkpoint module paths and `load_weights` work on this layout;
      * runtime layout (after `fuse()`, which `load_weights` calls): the decoder's q/k/v, the K
        embedding tables and the K heads are one module each (see `MusicgenDecoder`). Inference
        (`__call__`, `prefill`, `step`) needs it.
    """

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        # A read-only mapping, so nn.Module does not treat the config as a parameter tree.
        self.config = MappingProxyType(dict(config))
        self.is_melody = config.get("model_type") == "musicgen_melody"
        self.text_args = T5Args.from_dict(config["text_encoder"])
        self.decoder_args = DecoderArgs.from_dict(config["decoder"])
        h = self.decoder_args.hidden_size
        if self.decoder_args.cross_attention == self.is_melody:
            raise ValueError("config mismatch: melody models have no cross-attention and text "
                             "models need it (decoder.cross_attention vs model_type)")

        self.text_encoder = T5Encoder(self.text_args)
        self.enc_to_dec_proj = nn.Linear(self.text_args.d_model, h)
        if self.is_melody:
            melody = config.get("melody") or {}
            self.num_chroma = int(melody.get("num_chroma", 12))
            self.chroma_length = int(melody.get("chroma_length", 235))
            self.audio_enc_to_dec_proj = nn.Linear(self.num_chroma, h)
        self.decoder = MusicgenDecoder(self.decoder_args)
        self.audio_encoder = EncodecModel(EncodecArgs.from_dict(config["audio_encoder"]))

    # ------------------------------------------------------------- weights
    def load_weights(self, weights: Mapping[str, mx.array] | list[tuple[str, mx.array]],
                     strict: bool = True) -> "MusicGen":
        """Load flat SPEC-named (checkpoint layout) weights, then `fuse()`.

        A fused model is first unfused, so the names checked are always the checkpoint's (and is
        fused again if the check fails).
        strict=True: every parameter must be given, nothing extra, shapes equal; otherwise a
        ValueError names the missing / unexpected / mis-shaped keys. strict=False: unknown keys
        are ignored and absent ones keep their values; shapes are still checked.
        """
        weights = dict(weights)
        was_fused = self.decoder.fused
        self.unfuse()
        current = dict(tree_flatten(self.parameters()))
        missing = sorted(current.keys() - weights.keys())
        unexpected = sorted(weights.keys() - current.keys())
        misshaped = sorted(f"{k}: got {tuple(weights[k].shape)}, expected {tuple(current[k].shape)}"
                           for k in current.keys() & weights.keys()
                           if tuple(weights[k].shape) != tuple(current[k].shape))
        problems = [("mis-shaped", misshaped)]
        if strict:
            problems = [("missing", missing), ("unexpected", unexpected)] + problems
        report = [f"{len(keys)} {kind} key(s): " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else "")
                  for kind, keys in problems if keys]
        if report:
            if was_fused:
                self.fuse()
            raise ValueError("MusicGen.load_weights: " + "; ".join(report))
        self.update(tree_unflatten([(k, v) for k, v in weights.items() if k in current]))
        self.fuse()
        return self

    def fuse(self) -> "MusicGen":
        """Checkpoint layout -> runtime layout (idempotent; see `MusicgenDecoder.fuse`). Call it
        yourself only after setting weights without `load_weights` (e.g. random benchmark weights)."""
        self.decoder.fuse()
        return self

    def unfuse(self) -> "MusicGen":
        """Runtime layout -> checkpoint layout (idempotent), e.g. to save SPEC-named weights."""
        self.decoder.unfuse()
        return self

    # ---------------------------------------------------------- conditioning
    def encode_text(self, input_ids: mx.array,
                    attention_mask: mx.array | None = None) -> tuple[mx.array, mx.array]:
        """T5-encode and project to the decoder width: ids (B, S) -> (states (B, S, h), mask (B, S)).

        States at padded positions are zeroed (the reference multiplies by the mask after the
        projection, so padding contributes nothing, not even the projection bias).
        """
        if attention_mask is None:
            attention_mask = mx.ones(input_ids.shape, dtype=mx.int32)
        states = self.enc_to_dec_proj(self.text_encoder(input_ids, attention_mask))
        states = states * attention_mask[..., None].astype(states.dtype)
        return states, attention_mask

    def melody_prefix(self, text_states: mx.array | None, chroma: mx.array | None = None,
                      batch_size: int | None = None) -> mx.array:
        """Melody conditioning prepended to the decoder input: (B, chroma_length + S, h).

        chroma (B, Tc, num_chroma): one-hot chromagram, or None for the null melody (bin 0 on).
        Its projection is repeated until it covers chroma_length frames, then cut to exactly
        chroma_length. text_states (B, S, h) from `encode_text` follow (zeros for the null text);
        padded text positions stay in the prefix as zero vectors, as in the reference.
        """
        if not self.is_melody:
            raise ValueError("melody_prefix is only defined for musicgen_melody models")
        B = batch_size or (text_states.shape[0] if text_states is not None else chroma.shape[0])
        if chroma is None:
            chroma = mx.zeros((B, 1, self.num_chroma)).at[:, :, 0].add(1.0)
        audio = self.audio_enc_to_dec_proj(chroma.astype(self.audio_enc_to_dec_proj.weight.dtype))
        if audio.shape[1] < self.chroma_length:
            audio = mx.tile(audio, (1, math.ceil(self.chroma_length / audio.shape[1]), 1))
        audio = audio[:, : self.chroma_length]
        if text_states is None:
            return audio
        return mx.concatenate([audio, text_states.astype(audio.dtype)], axis=1)

    # ------------------------------------------------------------ decoding
    def make_cache(self, batch_size: int, max_len: int, dtype: mx.Dtype | None = None) -> DecoderCache:
        """Empty decoder cache. max_len = prefix length (melody: chroma_length + text length)
        + number of code frames that will be fed (prompt + generated)."""
        return self.decoder.make_cache(batch_size, max_len, dtype)

    def prefill(self, codes: mx.array, cache: DecoderCache, *, text_states: mx.array | None = None,
                text_mask: mx.array | None = None, chroma: mx.array | None = None) -> mx.array:
        """Start a generation: condition the cache and run the first frames (B, K, T >= 1).

        Text models: cross-attention K/V of `text_states`/`text_mask` are computed once here and
        stored in the cache. Melody models: the prefix (see `melody_prefix`; `chroma` None = null
        melody) is written into the cache ahead of the codes. Returns logits (B, K, T, vocab).
        """
        if self.is_melody:
            prefix = self.melody_prefix(text_states, chroma, batch_size=codes.shape[0])
            return self.decoder(codes, cache, prefix=prefix)
        if text_states is None:
            raise ValueError("text models need text_states (use zeros + a zero mask for no text)")
        self.decoder.set_cross_attention(cache, text_states, text_mask)
        return self.decoder(codes, cache)

    def step(self, codes: mx.array, cache: DecoderCache) -> mx.array:
        """One more frame (B, K, 1) after `prefill`; returns logits (B, K, 1, vocab).

        Shapes are fixed and the offset is an mx.array, so it compiles once, with the cache as
        state: `mx.compile(fn, inputs=cache.state, outputs=cache.state)`, built after `prefill`
        (which adds the cross-attention entries to the state).
        """
        return self.decoder(codes, cache)

    def __call__(self, codes: mx.array, text_states: mx.array | None = None,
                 text_mask: mx.array | None = None, chroma: mx.array | None = None) -> mx.array:
        """Full causal forward without a cache (tests, scoring): logits (B, K, T, vocab)."""
        if self.is_melody:
            prefix = self.melody_prefix(text_states, chroma, batch_size=codes.shape[0])
            return self.decoder(codes, prefix=prefix)
        return self.decoder(codes, encoder_states=text_states, encoder_mask=text_mask)
