"""Streaming generation (runtime/streaming.py) on the tiny fixtures.

The contract under test: the concatenated stream equals the offline `generate` output for the
same seed (SNR >= 60 dB; in practice ~145 dB, float rounding only), the first chunk arrives after
`chunk_frames + codec latency + max codebook delay` decoder steps (not after the whole
generation), audio prompts are emitted before the first step, extended generation streams window
by window, and a progressive WAV is readable after every chunk. Durations stay <= 2.3 s; tests
that need several windows shrink the window through the checkpoint's generation max_duration.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from generation_helpers import cached_pipe, melody_tones, prompt_audio, snr_db
from mlx_music.runtime.audio_io import ProgressiveWavWriter
from mlx_music.runtime.delay_pattern import codebook_delays
from mlx_music.runtime.streaming import plan_windows

PROMPT = "calm piano"


def _collect(pipe, *args, **kwargs) -> tuple[list[np.ndarray], list[int]]:
    """Stream; return the chunks and, per chunk, the decoder steps run before it arrived."""
    steps = [0]
    chunks, at = [], []
    single = isinstance(args[0], str)
    for chunk in pipe.stream(*args, on_step=lambda i, total: steps.__setitem__(0, i), **kwargs):
        # one prompt given as a string streams [channels, samples]; a list streams [B, channels, samples]
        assert chunk.ndim == (2 if single else 3)
        chunks.append(chunk[None] if single else chunk)
        at.append(steps[0])
    return chunks, at


def _check_chunk_sizes(pipe, chunks: list[np.ndarray], chunk_seconds: float, batch: int = 1) -> None:
    size = round(chunk_seconds * pipe.frame_rate) * 640
    for c in chunks:
        assert c.dtype == np.float32 and c.ndim == 3
        assert c.shape[:2] == (batch, pipe.audio_channels)
    assert all(c.shape[-1] == size for c in chunks[:-1])
    assert 0 < chunks[-1].shape[-1] <= size


ARCHS = ("mono", "stereo", "stereo-melody")


@pytest.mark.parametrize("chunk_seconds", [0.1, 0.5])
@pytest.mark.parametrize("arch", ARCHS)
def test_stream_equals_offline(mlx_folder, arch, chunk_seconds):
    pipe = cached_pipe(mlx_folder(arch))
    kw = dict(seed=11, melody=melody_tones(2.5) if arch.endswith("melody") else None)
    ref, _sr = pipe.generate(PROMPT, 1.5, **kw)
    chunks, at = _collect(pipe, PROMPT, 1.5, chunk_seconds=chunk_seconds, **kw)
    _check_chunk_sizes(pipe, chunks, chunk_seconds)
    got = np.concatenate(chunks, axis=-1)
    assert got.shape == ref.shape == (1, pipe.audio_channels, 75 * 640)
    snr = snr_db(ref, got)
    print(f"{arch} chunk {chunk_seconds}s: {len(chunks)} chunks, SNR {snr:.1f} dB")
    assert snr >= 60.0
    assert at == sorted(at) and at[0] < at[-1]  # chunks arrive during generation, not at the end


@pytest.mark.parametrize("chunk_seconds", [0.1, 0.5])
@pytest.mark.parametrize("arch", ["mono", "stereo"])
def test_first_chunk_after_chunk_plus_delay_steps(mlx_folder, arch, chunk_seconds):
    pipe = cached_pipe(mlx_folder(arch))
    latency = pipe.model.audio_encoder.stream_decoder().latency_frames
    max_delay = int(codebook_delays(pipe.num_codebooks, pipe.audio_channels).max())
    chunk_frames = round(chunk_seconds * pipe.frame_rate)
    steps: list[int] = []
    it = pipe.stream(PROMPT, 2.0, chunk_seconds=chunk_seconds, seed=3, on_step=lambda i, t: steps.append(i))
    assert steps == []  # nothing runs before the first chunk is asked for
    next(it)
    total = 1 + 100 + max_delay - 1  # positions after BOS
    # A frame is final max_delay steps after its first codebook; the codec holds `latency` back.
    assert len(steps) == chunk_frames + latency + max_delay < total
    rest = list(it)
    assert steps[-1] == total
    assert pipe.last_stats["first_chunk_steps"] == chunk_frames + latency + max_delay
    assert pipe.last_stats["steps"] == total
    assert len(rest) == -(-100 // chunk_frames) - 1


def test_audio_prompt_is_streamed_first(mlx_folder):
    pipe = cached_pipe(mlx_folder("mono"))
    prompt = prompt_audio(1.0)
    p = pipe.encode_audio(prompt).shape[-1]
    latency = pipe.model.audio_encoder.stream_decoder().latency_frames
    ref, _sr, codes = pipe.generate(PROMPT, 2.0, seed=5, audio_prompt=prompt, return_codes=True)
    chunks, at = _collect(pipe, PROMPT, 2.0, chunk_seconds=0.1, seed=5, audio_prompt=prompt)
    _check_chunk_sizes(pipe, chunks, 0.1)
    # Prompt frames are final before any step, except the last max_delay (their later codebooks
    # are written by the loop); all whole chunks of those come out at step 0.
    assert at.count(0) == (p - 3 - latency) // 5 > 0
    got = np.concatenate(chunks, axis=-1)
    assert got.shape == ref.shape == (1, 1, 100 * 640)
    assert snr_db(ref, got) >= 60.0


@pytest.mark.parametrize("arch", ["stereo", "stereo-melody"])
def test_extended_generation_streams_window_by_window(mlx_folder, arch):
    pipe = cached_pipe(mlx_folder(arch), window_s=1.0)  # 50-frame windows: 2.3 s needs 4 of them
    assert pipe.max_frames == 50
    kw = dict(seed=7, extend_stride=0.6, melody=melody_tones(2.5) if arch.endswith("melody") else None)
    ref, _sr, ref_codes = pipe.generate(PROMPT, 2.3, return_codes=True, **kw)
    chunks, at = _collect(pipe, PROMPT, 2.3, chunk_seconds=0.2, **kw)
    got = np.concatenate(chunks, axis=-1)
    assert got.shape == ref.shape == (1, 2, 115 * 640)
    snr = snr_db(ref, got)
    print(f"{arch} 2.3 windows: SNR {snr:.1f} dB")
    assert snr >= 60.0
    plan = plan_windows(50, 115, 0, 30, 7, 50)
    assert [(w.start, w.frames, w.keep) for w in plan] == [(0, 50, 0), (30, 50, 20), (60, 50, 20), (90, 25, 20)]
    # Steps per window: 50 + 3 for the first, (50 - 20) + 3 for the others, (25 - 20) + 3 last.
    window_ends = np.cumsum([53, 33, 33, 8])
    assert at[0] <= window_ends[0]  # first audio before the first window is done
    assert len({int(np.searchsorted(window_ends, a)) for a in at}) >= 3  # chunks from several windows
    assert pipe.last_stats["steps"] == window_ends[-1]


def test_prompt_longer_than_window_streams_then_continues(mlx_folder):
    """A prompt longer than one window is kept whole (emitted before any step), then extended."""
    pipe = cached_pipe(mlx_folder("mono"), window_s=1.0)
    prompt = prompt_audio(1.5)  # 75 frames, window 50
    latency = pipe.model.audio_encoder.stream_decoder().latency_frames
    ref, _sr, ref_codes = pipe.generate(PROMPT, 2.3, seed=6, extend_stride=0.6, audio_prompt=prompt,
                                        return_codes=True)
    chunks, at = _collect(pipe, PROMPT, 2.3, chunk_seconds=0.1, seed=6, extend_stride=0.6, audio_prompt=prompt)
    assert at.count(0) == (75 - latency) // 5  # the whole prompt is final before the first step
    got = np.concatenate(chunks, axis=-1)
    assert got.shape == ref.shape == (1, 1, 115 * 640)
    assert snr_db(ref, got) >= 60.0
    # Windows: the prompt (no steps), then 50-frame windows keeping 20 frames of context.
    assert pipe.last_stats["steps"] == (50 - 20 + 3) + (30 - 20 + 3)


def test_frame_stream_codes_equal_generate_codes(mlx_folder):
    """The codes behind the stream, window by window and with an audio prompt, equal generate's."""
    from mlx_music.runtime.streaming import FrameStream

    pipe = cached_pipe(mlx_folder("mono"), window_s=1.0)
    prompt = prompt_audio(0.5)
    _a, _sr, ref_codes = pipe.generate(PROMPT, 2.3, seed=9, extend_stride=0.6, audio_prompt=prompt,
                                       return_codes=True)
    fs = FrameStream(pipe, [PROMPT], 115, sampling=pipe.sampling_config(), seed=9, chroma=None,
                     prompt_codes=pipe.encode_audio(prompt), extend_stride=0.6)
    finals = []
    for steps in fs:
        finals.append(fs.final)
        assert steps == fs.steps
    assert finals == sorted(finals) and finals[-1] == 115
    assert fs.steps == fs.total_steps
    np.testing.assert_array_equal(fs.codes(), ref_codes)


def test_batch_stream(mlx_folder):
    pipe = cached_pipe(mlx_folder("mono"))
    prompts = [PROMPT, "80s pop with synths"]
    ref, _sr = pipe.generate(prompts, 1.0, seed=2)
    chunks, _ = _collect(pipe, prompts, 1.0, chunk_seconds=0.3, seed=2)
    _check_chunk_sizes(pipe, chunks, 0.3, batch=2)
    assert snr_db(ref, np.concatenate(chunks, axis=-1)) >= 60.0


def test_progressive_wav_readable_after_every_chunk(mlx_folder, tmp_path):
    pipe = cached_pipe(mlx_folder("stereo"))
    path = tmp_path / "stream.wav"
    written = []
    with ProgressiveWavWriter(path, pipe.sample_rate, pipe.audio_channels, subtype="FLOAT") as writer:
        for chunk in pipe.stream(PROMPT, 1.0, chunk_seconds=0.1, seed=4):
            writer.write(chunk)  # a string prompt streams [channels, samples]
            written.append(chunk)
            data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # file valid mid-stream
            assert sr == pipe.sample_rate
            np.testing.assert_array_equal(data.T, np.concatenate(written, axis=-1))
    assert len(written) == 10
    ref, _sr = pipe.generate(PROMPT, 1.0, seed=4)
    data, _ = sf.read(str(path), dtype="float32", always_2d=True)
    assert snr_db(ref[0], data.T) >= 60.0


def test_bad_arguments_fail_at_call_time(mlx_folder):
    pipe = cached_pipe(mlx_folder("mono"))
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="chunk-seconds"):
            pipe.stream(PROMPT, 1.0, chunk_seconds=bad)
    with pytest.raises(ValueError, match="duration"):
        pipe.stream(PROMPT, 0.5, audio_prompt=prompt_audio(1.0))
    with pytest.raises(ValueError, match="melody"):
        pipe.stream(PROMPT, 1.0, melody=melody_tones(2.5))
    with pytest.raises(ValueError, match="extend-stride"):
        pipe.stream(PROMPT, 6.0, extend_stride=10.0)


def test_runtime_streaming_never_imports_torch():
    src = (Path(__file__).parents[1] / "runtime" / "streaming.py").read_text()
    assert "import torch" not in src and "transformers" not in src
