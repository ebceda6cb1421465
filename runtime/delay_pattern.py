"""MusicGen's codebook delay pattern and its inverse.

Codebook level q is delayed by q steps, so at sequence position s the model predicts level 0 of
frame s-1, level 1 of frame s-2, ... Stereo checkpoints interleave channels ([L0, R0, L1, R1, ...]):
both channels of a level share its delay. Position 0 holds BOS for every codebook; positions before
a codebook's first frame and after its last hold the pad token (MusicGen uses one id for both).
"""

from __future__ import annotations

import numpy as np


def codebook_delays(num_codebooks: int, audio_channels: int) -> np.ndarray:
    """Delay of each codebook: mono [0,1,2,3]; stereo [0,0,1,1,2,2,3,3]."""
    return np.arange(num_codebooks) // audio_channels


def pattern_length(num_frames: int, num_codebooks: int, audio_channels: int) -> int:
    """Sequence positions (including BOS at 0) needed to hold `num_frames` frames."""
    return 1 + num_frames + int(codebook_delays(num_codebooks, audio_channels).max())


def build_pattern(num_frames: int, num_codebooks: int, audio_channels: int, pad_id: int,
                  prompt: np.ndarray | None = None, batch: int = 1) -> np.ndarray:
    """(B, K, S) int32 sequence: known values (BOS/pad/prompt frames) and -1 where to generate.

    `prompt`: (B, K, P) codes of frames 0..P-1 already known (audio continuation).
    """
    delays = codebook_delays(num_codebooks, audio_channels)
    seq_len = pattern_length(num_frames, num_codebooks, audio_channels)
    if prompt is not None:
        batch = prompt.shape[0]
    out = np.full((batch, num_codebooks, seq_len), pad_id, dtype=np.int32)
    for k, d in enumerate(delays):
        out[:, k, 1 + d: 1 + d + num_frames] = -1
        if prompt is not None and prompt.shape[-1]:
            p = min(prompt.shape[-1], num_frames)
            out[:, k, 1 + d: 1 + d + p] = prompt[:, k, :p]
    return out


def apply_pattern(codes: np.ndarray, audio_channels: int, pad_id: int) -> np.ndarray:
    """(B, K, F) frames → (B, K, S) delayed sequence with BOS/pad filled in."""
    b, k, f = codes.shape
    return build_pattern(f, k, audio_channels, pad_id, prompt=codes, batch=b)


def revert_pattern(seq: np.ndarray, num_frames: int, audio_channels: int) -> np.ndarray:
    """(B, K, S) delayed sequence → (B, K, num_frames) frame-aligned codes."""
    b, k, _ = seq.shape
    delays = codebook_delays(k, audio_channels)
    return np.stack([seq[:, i, 1 + d: 1 + d + num_frames] for i, d in enumerate(delays)], axis=1)


def first_free_position(pattern: np.ndarray) -> int:
    """First position where any codebook is still to be generated (what can be prefilled before)."""
    free = np.argwhere((pattern == -1).any(axis=(0, 1)))
    return int(free[0, 0]) if len(free) else pattern.shape[-1]
