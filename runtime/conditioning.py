"""What the decoder is conditioned on, per window: text states, melody chroma, and their CFG nulls.

Text is encoded once per generation (it is the same in every window). A melody is prepared once
(channel mean, resampled to the chroma rate) and sliced per window by audiocraft's rule
(``models/genmodel.py``, ``_generate_tokens``): every window of a long generation, the last
shorter one too, sees ``window`` seconds of melody starting at the window's start time, wrapping
around a shorter melody. A generation that fits one window uses the whole melody, as transformers'
``MusicgenMelodyFeatureExtractor`` does (the model tiles its projection to ``chroma_length``).

The CFG null condition is built here and only here: zero text states with an all-zero mask, and
for melody models the chroma one-hot on bin 0.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import mlx.core as mx
import numpy as np

from mlx_music.models.musicgen import MusicGen
from mlx_music.runtime.audio_io import decode_audio_input
from mlx_music.runtime.chroma import ChromaExtractor, sinc_resample
from mlx_music.runtime.text import TextTokenizer
from mlx_music.runtime.token_loop import Conditioning

AudioInput = Any  # a file path, or a (waveform, sample_rate) tuple

# Seconds of melody decoded past the ``max_seconds`` used: the resampler's filter reads past its
# last output (at most one reduced-rate block, which is under 1 s, plus the filter's half-width).
_RESAMPLE_MARGIN_S = 3.0


def melody_waveform(item: AudioInput, target_sr: int, max_seconds: float | None = None) -> np.ndarray:
    """A melody (path or (waveform, sr)) → mono float64 (S,) at ``target_sr``.

    ``max_seconds``: only that many seconds are kept (at most ``ceil(max_seconds * target_sr)``
    samples); only a few seconds more are decoded (never the rest of a long file), so memory and
    time follow those seconds, whatever the file's header says. The kept samples equal those of
    the whole melody resampled. Resampled with the chroma module's sinc resampler (the reference
    extractor's), not soxr: a different resampler moves energy between FFT bins and can flip
    near-tie chroma frames. Raises `AudioInputError` (a ValueError) naming the file: unreadable,
    silent, a sample rate outside `audio_io.MIN_SAMPLE_RATE`-`MAX_SAMPLE_RATE`, ...
    """
    decode_s = None if max_seconds is None else max_seconds + _RESAMPLE_MARGIN_S
    wav, sr, _ = decode_audio_input(item, require_signal=True, max_seconds=decode_s)
    mono = wav.astype(np.float64).mean(axis=0)  # channel mean first, as the reference does
    max_out = None if max_seconds is None else max(1, math.ceil(max_seconds * target_sr))
    return sinc_resample(mono, sr, target_sr, max_out=max_out)


class Conditioner:
    """Builds a window's `Conditioning` for a batch of rows (each with its own text and melody)."""

    def __init__(self, model: MusicGen, tokenizer: TextTokenizer, config: dict):
        self.model = model
        self.tokenizer = tokenizer
        self.frame_rate = int(config["frame_rate"])
        self.melody = config.get("melody") if model.is_melody else None
        self.extractor = ChromaExtractor.from_config(self.melody) if self.melody else None

    def text(self, prompts: Sequence[str], cfg: bool) -> tuple[mx.array, mx.array]:
        """T5 states (rows, S, h) and mask (rows, S); with CFG the null rows follow (zero states).

        Text models: S is the longest prompt's token count; null rows have an all-zero mask.
        Melody models: the text sits in the decoder prefix, so S is the model's text limit
        (``tokenizer.max_tokens``) whatever the batch: every row has the same slot layout alone or
        batched, and the mask tells the decoder which slots each row keeps (its own tokens; a null
        row keeps as many zero states as its conditional row has tokens, as the reference does
        for a prompt alone), so a row's codes do not depend on the other prompts of its batch.
        """
        ids, mask = self.tokenizer(list(prompts))
        if self.extractor is not None and ids.shape[1] < self.tokenizer.max_tokens:
            pad = ((0, 0), (0, self.tokenizer.max_tokens - ids.shape[1]))
            ids = np.pad(ids, pad, constant_values=self.tokenizer.pad_id)
            mask = np.pad(mask, pad)
        states, m = self.model.encode_text(mx.array(ids), mx.array(mask))
        if cfg:
            states = mx.concatenate([states, mx.zeros_like(states)], axis=0)
            m = mx.concatenate([m, m if self.extractor is not None else mx.zeros_like(m)], axis=0)
        return states, m

    def window(self, text: tuple[mx.array, mx.array], melodies: Sequence[np.ndarray | None], cfg: bool,
               start_frame: int, window_frames: int, whole: bool | Sequence[bool]) -> Conditioning:
        """Conditioning of the window starting at global frame ``start_frame``.

        ``melodies``: one mono waveform at the chroma rate per row, or None (null melody).
        ``whole``: the generation fits one window, so each melody is used whole; one flag per row,
        or one for all (a row that fits one window uses its melody whole, as it would alone).
        """
        states, mask = text
        if self.extractor is None:
            return Conditioning(states, mask)
        sr = int(self.melody["sampling_rate"])
        t0 = start_frame / self.frame_rate
        length = int(window_frames / self.frame_rate * sr)
        null = self._null_chroma()
        rows = []
        wholes = [whole] * len(melodies) if isinstance(whole, bool) else list(whole)
        for wav, whole_row in zip(melodies, wholes):
            if wav is None:
                rows.append(null)
                continue
            if not whole_row:  # audiocraft: wav[(int(t0 * sr) + arange(window)) % len(wav)]
                wav = wav[(int(t0 * sr) + np.arange(length)) % wav.shape[-1]]
            rows.append(self.extractor([wav], sr)[0])
        if cfg:
            rows += [null] * len(melodies)
        return Conditioning(states, mask, mx.array(_tile_rows(rows, self.model.chroma_length)))

    def _null_chroma(self) -> np.ndarray:
        c = np.zeros((1, int(self.melody["num_chroma"])), np.float32)
        c[:, 0] = 1.0
        return c


def _tile_rows(rows: list[np.ndarray], chroma_length: int) -> np.ndarray:
    """Stack (T_i, 12) chroma rows to (B, chroma_length, 12), tiling or cutting each row.

    The model tiles a short chroma to ``chroma_length`` and cuts a long one; doing it here gives
    every row the prefix it would get alone, in a shape that does not depend on the batch.
    """
    t = chroma_length
    return np.stack([np.tile(r, (-(-t // r.shape[0]), 1))[:t] for r in rows]).astype(np.float32)
