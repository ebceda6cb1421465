"""Streaming generation (MusicGenPipeline.stream over runtime/generation.py) on the tiny fixtures.

The contract under test: the concatenated stream equals the offline `generate` output for the
same seed sample for sample (both decode with the same block decoder), the first chunk arrives after
`chunk_frames + codec latency + max codebook delay` decoder steps (not after the whole
generation), audio prompts are emitted before the first step, extended generation streams window
by window, and a progressive WAV is readable after every chunk. Durations stay <= 2.3 s; tests
that need several windows shrink the window through the checkpoint's generation max_duration.
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from generation_helpers import cached_pipe, gen, melody_tones, prompt_audio
from mlx_music.runtime.audio_io import ProgressiveWavWriter
from mlx_music.runtime.delay_pattern import codebook_delays
from mlx_music.runtime.generation import Request, plan_windows

PROMPT = "calm piano"


def _collect(pipe, *args, **kwargs) -> tuple[list[np.ndarray], list[int]]:
    """Stream; return the chunks as [B, channels, samples] and, per chunk, the decoder steps run
    before it arrived. The last chunk's stats are kept in `_collect.stats`."""
    chunks, at = [], []
    start = 0
    for chunk in pipe.stream(*args, **kwargs):
        assert all(a.ndim == 2 and a.shape[0] == pipe.audio_channels for a in chunk.audio)
        assert chunk.start == start and chunk.sample_rate == pipe.sample_rate
        chunks.append(np.stack(chunk.audio))
        start += chunks[-1].shape[-1]
        at.append(chunk.stats.steps)
        _collect.stats = chunk.stats
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
    ref, _sr, _ = gen(pipe, PROMPT, 1.5, **kw)
    chunks, at = _collect(pipe, PROMPT, 1.5, chunk_seconds=chunk_seconds, **kw)
    _check_chunk_sizes(pipe, chunks, chunk_seconds)
    got = np.concatenate(chunks, axis=-1)
    assert got.shape == ref.shape == (1, pipe.audio_channels, 75 * 640)
    np.testing.assert_array_equal(got, ref)
    assert at == sorted(at) and at[0] < at[-1]  # chunks arrive during generation, not at the end


@pytest.mark.parametrize("chunk_seconds", [0.1, 0.5])
@pytest.mark.parametrize("arch", ["mono", "stereo"])
def test_first_chunk_after_chunk_plus_delay_steps(mlx_folder, arch, chunk_seconds):
    pipe = cached_pipe(mlx_folder(arch))
    latency = pipe.model.audio_encoder.stream_decoder().latency_frames
    max_delay = int(codebook_delays(pipe.num_codebooks, pipe.audio_channels).max())
    chunk_frames = round(chunk_seconds * pipe.frame_rate)
    it = pipe.stream(PROMPT, 2.0, chunk_seconds=chunk_seconds, seed=3)
    first = next(it)
    total = 1 + 100 + max_delay - 1  # positions after BOS
    # A frame is final max_delay steps after its first codebook; the codec holds `latency` back.
    assert first.stats.steps == first.stats.first_audio_steps == chunk_frames + latency + max_delay < total
    rest = list(it)
    assert rest[-1].stats.steps == total
    assert len(rest) == -(-100 // chunk_frames) - 1


def test_audio_prompt_is_streamed_first(mlx_folder):
    pipe = cached_pipe(mlx_folder("mono"))
    prompt = prompt_audio(1.0)
    p = pipe.encode_audio(prompt).shape[-1]
    latency = pipe.model.audio_encoder.stream_decoder().latency_frames
    ref, _sr, codes = gen(pipe, PROMPT, 2.0, seed=5, audio_prompt=prompt)
    chunks, at = _collect(pipe, PROMPT, 2.0, chunk_seconds=0.1, seed=5, audio_prompt=prompt)
    _check_chunk_sizes(pipe, chunks, 0.1)
    # Prompt frames are final before any step, except the last max_delay (their later codebooks
    # are written by the loop); all whole chunks of those come out at step 0.
    assert at.count(0) == (p - 3 - latency) // 5 > 0
    got = np.concatenate(chunks, axis=-1)
    assert got.shape == ref.shape == (1, 1, 100 * 640)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("arch", ["stereo", "stereo-melody"])
def test_extended_generation_streams_window_by_window(mlx_folder, arch):
    pipe = cached_pipe(mlx_folder(arch), window_s=1.0)  # 50-frame windows: 2.3 s needs 4 of them
    assert pipe.max_frames == 50
    kw = dict(seed=7, extend_stride=0.6, melody=melody_tones(2.5) if arch.endswith("melody") else None)
    ref, _sr, ref_codes = gen(pipe, PROMPT, 2.3, **kw)
    chunks, at = _collect(pipe, PROMPT, 2.3, chunk_seconds=0.2, **kw)
    got = np.concatenate(chunks, axis=-1)
    assert got.shape == ref.shape == (1, 2, 115 * 640)
    np.testing.assert_array_equal(got, ref)
    plan = plan_windows(50, 115, 0, 30)
    assert [(w.start, w.frames, w.keep) for w in plan] == [(0, 50, 0), (30, 50, 20), (60, 50, 20), (90, 25, 20)]
    # Steps per window: 50 + 3 for the first, (50 - 20) + 3 for the others, (25 - 20) + 3 last.
    window_ends = np.cumsum([53, 33, 33, 8])
    assert at[0] <= window_ends[0]  # first audio before the first window is done
    assert len({int(np.searchsorted(window_ends, a)) for a in at}) >= 3  # chunks from several windows
    assert _collect.stats.steps == window_ends[-1]


def test_prompt_longer_than_window_streams_then_continues(mlx_folder):
    """A prompt longer than one window is kept whole (emitted before any step), then extended."""
    pipe = cached_pipe(mlx_folder("mono"), window_s=1.0)
    prompt = prompt_audio(1.5)  # 75 frames, window 50
    latency = pipe.model.audio_encoder.stream_decoder().latency_frames
    ref, _sr, ref_codes = gen(pipe, PROMPT, 2.3, seed=6, extend_stride=0.6, audio_prompt=prompt)
    chunks, at = _collect(pipe, PROMPT, 2.3, chunk_seconds=0.1, seed=6, extend_stride=0.6, audio_prompt=prompt)
    assert at.count(0) == (75 - latency) // 5  # the whole prompt is final before the first step
    got = np.concatenate(chunks, axis=-1)
    assert got.shape == ref.shape == (1, 1, 115 * 640)
    np.testing.assert_array_equal(got, ref)
    # Windows: the prompt (no steps), then 50-frame windows keeping 20 frames of context.
    assert _collect.stats.steps == (50 - 20 + 3) + (30 - 20 + 3)


def test_frame_stream_codes_equal_generate_codes(mlx_folder):
    """The codes behind the stream, window by window and with an audio prompt, equal generate's."""
    pipe = cached_pipe(mlx_folder("mono"), window_s=1.0)
    prompt = prompt_audio(0.5)
    _a, _sr, ref_codes = gen(pipe, PROMPT, 2.3, seed=9, extend_stride=0.6, audio_prompt=prompt)
    fs = pipe.frames([Request(PROMPT, 2.3, seed=9, audio_prompt=prompt)], extend_stride=0.6)
    finals = []
    for final in fs:
        finals.append(final)
        assert final == fs.final
    assert finals == sorted(finals) and finals[-1] == 115
    assert fs.steps == fs.total_steps
    np.testing.assert_array_equal(fs.codes(), ref_codes)


def test_batch_stream(mlx_folder):
    pipe = cached_pipe(mlx_folder("mono"))
    prompts = [PROMPT, "80s pop with synths"]
    ref, _sr, _ = gen(pipe, prompts, 1.0, seed=2)
    chunks, _ = _collect(pipe, prompts, 1.0, chunk_seconds=0.3, seed=2)
    _check_chunk_sizes(pipe, chunks, 0.3, batch=2)
    np.testing.assert_array_equal(np.concatenate(chunks, axis=-1), ref)


def test_progressive_wav_readable_after_every_chunk(mlx_folder, tmp_path):
    pipe = cached_pipe(mlx_folder("stereo"))
    path = tmp_path / "stream.wav"
    written = []
    with ProgressiveWavWriter(path, pipe.sample_rate, pipe.audio_channels, subtype="FLOAT") as writer:
        for chunk in pipe.stream(PROMPT, 1.0, chunk_seconds=0.1, seed=4):
            writer.write(chunk.audio[0])  # [channels, samples] of the only row
            written.append(chunk.audio[0])
            data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # file valid mid-stream
            assert sr == pipe.sample_rate
            np.testing.assert_array_equal(data.T, np.concatenate(written, axis=-1))
    assert len(written) == 10
    ref, _sr, _ = gen(pipe, PROMPT, 1.0, seed=4)
    data, _ = sf.read(str(path), dtype="float32", always_2d=True)
    np.testing.assert_array_equal(data.T, ref[0])


def test_bad_arguments_fail_at_call_time(mlx_folder):
    pipe = cached_pipe(mlx_folder("mono"))
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="chunk_seconds"):
            pipe.stream(PROMPT, 1.0, chunk_seconds=bad)
    with pytest.raises(ValueError, match="duration"):
        pipe.stream(PROMPT, 0.5, audio_prompt=prompt_audio(1.0))
    with pytest.raises(ValueError, match="melody"):
        pipe.stream(PROMPT, 1.0, melody=melody_tones(2.5))
    with pytest.raises(ValueError, match="extend_stride"):
        pipe.stream(PROMPT, 6.0, extend_stride=10.0)


def test_uneven_batch_rows_equal_each_row_alone(mlx_folder):
    """A batch of rows with their own durations, seeds and settings: each row's codes and audio
    equal the row generated alone, streamed or not (a shorter row's chunks end early)."""
    pipe = cached_pipe(mlx_folder("stereo"), window_s=1.0)
    rows = [Request(PROMPT, 2.3, seed=3), Request("80s pop", 1.5, seed=5, temperature=0.7, top_k=50),
            Request("drums", 0.6, seed=7, guidance_scale=1.0, top_p=0.9), Request("x", 1.0, seed=1, greedy=True),
            Request("y", 1.5, seed=2, top_k=0)]  # same length as row 1: decoded apart all the same
    batch = pipe.generate_batch(rows, extend_stride=0.6)
    streamed = list(pipe.stream_batch(rows, chunk_seconds=0.4, extend_stride=0.6))
    for i, row in enumerate(rows):
        alone = pipe.generate_batch([row], extend_stride=0.6)
        assert batch.codes[i].shape == (8, round(row.duration * 50))
        np.testing.assert_array_equal(batch.codes[i], alone.codes[0])
        np.testing.assert_array_equal(batch.audio[i], alone.audio[0])
        np.testing.assert_array_equal(np.concatenate([c.audio[i] for c in streamed], axis=-1), alone.audio[0])
    assert len({c.tobytes() for c in batch.codes}) == 5  # rows differ
