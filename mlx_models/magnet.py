"""MAGNeT's language model in MLX: MusicGen's decoder, non-causal, with restricted context.

MAGNeT (audiocraft ``models/lm_magnet.py``, ``MagnetLMModel``) has exactly MusicGen's weights
(K summed codebook embeddings with the mask token at id ``vocab_size``, pre-LN layers with
cross-attention to the projected T5 states, K heads); what differs is the self-attention mask:

* no causal mask: every position sees the whole clip;
* while codebook ``stage`` > 0 is being decoded, position i sees only positions j with
  ``|i - j| <= subcodes_context`` (5 on the released models; -1 turns the restriction off).

The decoding loop (which positions are masked, CFG, temperatures) is in
``runtime/magnet_generation.py``; this module is only the network and its masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import mlx.core as mx

from mlx_music.models.musicgen import MusicGen


@dataclass(frozen=True)
class MagnetArgs:
    """config.json["magnet"]: the settings the converter reads from xp.cfg."""

    subcodes_context: int = 5  # transformer_lm.subcodes_context; -1 = unrestricted
    span_len: int = 3  # masking.span_len: frames per masked span
    segment_frames: int = 500  # frame rate x dataset.segment_duration: the clip the model makes

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MagnetArgs":
        return cls(int(d["subcodes_context"]), int(d["span_len"]), int(d["segment_frames"]))


def restricted_context_mask(seq_len: int, context: int) -> mx.array:
    """(T, T) bool: True where ``|i - j| <= context`` (audiocraft's
    ``restricted_context_attn_mask``, which writes 0 there and -inf elsewhere)."""
    pos = mx.arange(seq_len)
    return mx.abs(pos[:, None] - pos[None, :]) <= context


def stage_attention_mask(stage: int, seq_len: int, context: int) -> mx.array | None:
    """The self-attention mask while decoding codebook ``stage``: None (attend everywhere) for
    stage 0 or ``context == -1``, else `restricted_context_mask` (``_stage_attn_mask``)."""
    if stage == 0 or context < 0:
        return None
    return restricted_context_mask(seq_len, context)


class MagnetModel(MusicGen):
    """`MusicGen` (same weights, same T5 and EnCodec) with MAGNeT's non-causal stage forward."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        if not self.decoder_args.cross_attention:
            raise ValueError("config mismatch: MAGNeT models condition on text by cross-attention")
        self.magnet = MagnetArgs.from_dict(config["magnet"])

    def stage_mask(self, stage: int) -> int | None:
        """The decoder's ``attention_mask`` for ``stage``: None (everywhere) or the band width
        ``subcodes_context``, which the decoder computes as banded attention (11 scores per query
        instead of T): the same attention as `stage_attention_mask`."""
        restricted = stage > 0 and self.magnet.subcodes_context >= 0
        return self.magnet.subcodes_context if restricted else None

    def stage_logits(self, codes: mx.array, stage: int, text_states: mx.array, text_mask: mx.array | None,
                     all_heads: bool = False, positions: mx.array | None = None) -> mx.array:
        """Logits of one decoding pass: codes (B, K, T) (``vocab_size`` = masked) with text states
        (B, S, h) / mask (B, S) → (B, 1, T, vocab) of codebook ``stage`` (all_heads: (B, K, T, vocab),
        what audiocraft's ``LMModel.forward(..., stage=stage)`` returns). ``positions`` (B, M): only
        those positions' logits, (B, 1, M, vocab)."""
        return self.decoder(codes, encoder_states=text_states, encoder_mask=text_mask,
                            attention_mask=self.stage_mask(stage),
                            codebook=None if all_heads else stage, logit_positions=positions)

    def __call__(self, codes: mx.array, text_states: mx.array | None = None,
                 text_mask: mx.array | None = None, chroma: mx.array | None = None, *, stage: int = 0) -> mx.array:
        """Forward of all heads (B, K, T, vocab) with the mask of ``stage``."""
        return self.stage_logits(codes, stage, text_states, text_mask, all_heads=True)
