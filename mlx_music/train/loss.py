"""MusicGen's training loss: labels in the delay pattern, per-codebook cross-entropy, text dropout.

Labels are built as the public dreambooth script (ylacombe/musicgen-dreamboothing,
``dreambooth_musicgen.py``) builds them: the frames (K, F) go through the delay pattern
(`mlx_music.runtime.delay_pattern`), the BOS column is dropped and the sequence is cut to F steps,
so ``labels[k, s] = code(k, s - delay_k)`` for ``s >= delay_k`` and the pad id before; the last
``delay_k`` frames of codebook k are never trained. Shorter rows of a batch are padded with -100.
The decoder inputs are transformers' ``shift_tokens_right`` of the labels (start id first, -100 ->
pad id). The loss is transformers' ``MusicgenForCausalLM`` loss: cross-entropy per codebook, mean
over its tokens that are neither -100 nor the pad id, then the mean over the K codebooks.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_music.runtime.delay_pattern import apply_pattern

IGNORE = -100


def build_labels(codes: list[np.ndarray], audio_channels: int, pad_id: int) -> np.ndarray:
    """Frames of each row (K, F_i) int -> labels (B, K, F_max) int32 (dreambooth's layout, -100 padded)."""
    k = codes[0].shape[0]
    f_max = max(c.shape[1] for c in codes)
    out = np.full((len(codes), k, f_max), IGNORE, np.int32)
    for i, c in enumerate(codes):
        f = c.shape[1]
        out[i, :, :f] = apply_pattern(np.asarray(c, np.int32)[None], audio_channels, pad_id)[0, :, 1:f + 1]
    return out


def decoder_inputs(labels: np.ndarray, pad_id: int, start_id: int) -> np.ndarray:
    """transformers' ``shift_tokens_right`` on labels (B, K, T): (B, K, T) int32 decoder inputs."""
    out = np.empty_like(labels)
    out[..., 0] = start_id
    out[..., 1:] = labels[..., :-1]
    out[out == IGNORE] = pad_id
    return out.astype(np.int32)


def musicgen_loss(logits: mx.array, labels: mx.array, pad_id: int) -> mx.array:
    """logits (B, K, T, V), labels (B, K, T) -> scalar float32: per-codebook token-mean CE over labels
    that are neither -100 nor `pad_id`, averaged over the K codebooks (transformers' formula)."""
    logits = logits.astype(mx.float32)
    valid = (labels != IGNORE) & (labels != pad_id)
    target = mx.where(valid, labels, 0)
    picked = mx.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
    ce = mx.logsumexp(logits, axis=-1) - picked  # (B, K, T)
    w = valid.astype(mx.float32)
    per_k = (ce * w).sum(axis=(0, 2)) / mx.maximum(w.sum(axis=(0, 2)), 1.0)
    return per_k.mean()


def drop_text(states: mx.array, mask: mx.array, drop: mx.array) -> tuple[mx.array, mx.array]:
    """Classifier-free-guidance dropout: rows where `drop` (B,) is true get the null condition the
    runtime uses for CFG (zero states, all-zero mask), so the unconditional branch keeps training."""
    keep = mx.logical_not(drop)
    return states * keep[:, None, None].astype(states.dtype), mask * keep[:, None].astype(mask.dtype)


def batch_loss(model, inputs: mx.array, labels: mx.array, text: mx.array, text_mask: mx.array,
               drop: mx.array, chroma: mx.array | None = None) -> mx.array:
    """The loss of one batch through `model` (a fused MusicGen, possibly with LoRA layers).

    inputs/labels (B, K, T) int32 (`decoder_inputs`, `build_labels`); text (B, S, d_t5) float32:
    the frozen T5's last hidden states (cached by the data preparation), text_mask (B, S);
    drop (B,) bool: rows conditioned on nothing (`drop_text`); chroma (B, Tc, 12) for melody models
    (the caller puts the null chroma in dropped rows). The projection runs here, so a LoRA on
    ``enc_to_dec_proj`` trains; then states * mask, as transformers does."""
    mask = text_mask.astype(mx.int32)
    states = model.enc_to_dec_proj(text) * mask[..., None].astype(text.dtype)
    states, mask = drop_text(states, mask, drop)
    pad_id = model.decoder_args.pad_token_id
    if model.is_melody:
        logits = model(inputs, states, mask, chroma=chroma)
    else:
        logits = model(inputs, states, mask)
    return musicgen_loss(logits, labels, pad_id)


__all__ = ["IGNORE", "batch_loss", "build_labels", "decoder_inputs", "drop_text", "musicgen_loss"]
