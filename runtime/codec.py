"""Codes ↔ audio through EnCodec, for mono and stereo checkpoints.

Stereo checkpoints interleave codebooks ``[L0, R0, L1, R1, ...]``; the mono codec encodes and
decodes each channel's codebooks separately (transformers' ``MusicgenForConditionalGeneration``
does the same), and the channels are stacked on axis 1.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_music.models.encodec import EncodecModel


class Codec:
    """The checkpoint's EnCodec seen as ``audio_channels`` mono streams."""

    def __init__(self, encodec: EncodecModel, audio_channels: int):
        self.encodec = encodec
        self.channels = audio_channels
        self.hop = encodec.hop_length

    def _split(self, codes: np.ndarray | mx.array) -> list[mx.array]:
        codes = mx.array(codes)
        return [codes[:, c::self.channels] for c in range(self.channels)]

    def encode(self, wav: np.ndarray) -> np.ndarray:
        """float32 audio (channels, samples) at the codec rate → codes (K, frames) int32."""
        codes = np.array(self.encodec.encode(mx.array(wav[:, None, :])))  # (C, nq, F)
        out = np.empty((codes.shape[0] * codes.shape[1], codes.shape[2]), np.int32)
        for c in range(self.channels):
            out[c::self.channels] = codes[c]
        return out

    def decode(self, codes: np.ndarray | mx.array) -> np.ndarray:
        """Codes (B, K, F) → float32 audio (B, channels, F * hop)."""
        audio = mx.concatenate([self.encodec.decode(c) for c in self._split(codes)], axis=1)
        return np.array(audio.astype(mx.float32))

    def decode_blocks(self, codes: np.ndarray | mx.array) -> np.ndarray:
        """Codes (B, K, F) → float32 audio (B, channels, F * hop) through the block decoder:
        the same maths as `decode`, computed in the fixed blocks `StreamDecoder` uses, so a
        stream of the same codes gives identical samples however it was chunked."""
        audio = mx.concatenate([self.encodec.decode_blocks(c) for c in self._split(codes)], axis=1)
        return np.array(audio.astype(mx.float32))

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Incremental decode: the concatenated outputs equal `Codec.decode` of all the codes.

    ``latency_frames``: frames the codec holds back until it sees what follows them.
    """

    def __init__(self, codec: Codec):
        self.codec = codec
        self.decoders = [codec.encodec.stream_decoder() for _ in range(codec.channels)]
        self.latency_frames = self.decoders[0].latency_frames

    def push(self, codes: np.ndarray) -> np.ndarray:
        """More codes (B, K, n) → the audio (B, channels, samples) that is now final."""
        parts = [d.push(c) for d, c in zip(self.decoders, self.codec._split(codes))]
        return np.array(mx.concatenate(parts, axis=1).astype(mx.float32))

    def flush(self) -> np.ndarray:
        """End of the codes: the held-back audio, with the codec's end-of-signal padding."""
        parts = [d.flush() for d in self.decoders]
        return np.array(mx.concatenate(parts, axis=1).astype(mx.float32))
