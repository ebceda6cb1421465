"""Runtime pieces: delay pattern, sampler, seeded generation, API and CLI on the tiny checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf

from generation_helpers import gen  # noqa: E402
from mlx_music.runtime import load
from mlx_music.runtime.delay_pattern import apply_pattern, build_pattern, codebook_delays, revert_pattern
from mlx_music.runtime.sampling import (RowSampling, SamplingConfig, apply_cfg, filtered_logits, row_keys,
                                        select_tokens)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("channels,k", [(1, 4), (2, 8)])
def test_delay_pattern_round_trip(channels, k):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2048, size=(2, k, 11)).astype(np.int32)
    seq = apply_pattern(codes, channels, pad_id=2048)
    assert seq.shape == (2, k, 1 + 11 + 3)
    assert (seq[:, :, 0] == 2048).all()  # BOS for every codebook
    delays = codebook_delays(k, channels)
    assert list(delays) == ([0, 1, 2, 3] if channels == 1 else [0, 0, 1, 1, 2, 2, 3, 3])
    for i, d in enumerate(delays):
        assert (seq[:, i, 1 + d: 12 + d] == codes[:, i]).all()
        assert (seq[:, i, : 1 + d] == 2048).all() and (seq[:, i, 12 + d:] == 2048).all()
    np.testing.assert_array_equal(revert_pattern(seq, 11, channels), codes)
    free = build_pattern(11, k, channels, 2048, batch=2)
    assert ((free == -1).sum(axis=-1) == 11).all()


def _rs(*configs: SamplingConfig, vocab: int = 2048) -> RowSampling:
    return RowSampling.stack(list(configs), vocab)


def test_top_k_one_equals_greedy():
    logits = mx.random.normal((3, 8, 2048), key=mx.random.key(1))
    greedy, _ = select_tokens(logits, _rs(*[SamplingConfig(greedy=True)] * 3), row_keys([0, 1, 2]))
    assert mx.array_equal(greedy, mx.argmax(logits, axis=-1)).item()
    for seed in range(3):
        sampled, _ = select_tokens(logits, _rs(*[SamplingConfig(top_k=1, temperature=0.7)] * 3),
                                   row_keys([seed, seed + 1, seed + 2]))
        assert mx.array_equal(sampled, greedy).item()


def _kept(logits: mx.array, cfg: SamplingConfig) -> list[bool]:
    return np.isfinite(np.array(filtered_logits(logits[None], _rs(cfg, vocab=logits.shape[-1])))[0, 0]).tolist()


def test_top_p_on_hand_made_distribution():
    probs = np.array([0.5, 0.2, 0.15, 0.1, 0.05], dtype=np.float32)
    logits = mx.array(np.log(probs))[None]
    kept = lambda p: _kept(logits, SamplingConfig(top_k=0, top_p=p))  # noqa: E731
    assert kept(0.5) == [True, False, False, False, False]
    assert kept(0.6) == [True, True, False, False, False]
    assert kept(0.7) == [True, True, False, False, False]  # 0.5 + 0.2 reaches 0.7
    assert kept(0.71) == [True, True, True, False, False]
    assert kept(1.0) == [True] * 5
    # Shuffled vocabulary order: the same tokens survive.
    perm = np.array([3, 0, 4, 2, 1])
    assert _kept(mx.array(np.log(probs[perm]))[None], SamplingConfig(top_k=0, top_p=0.71)) == \
        [False, True, False, True, True]
    # Sampling never picks a filtered token.
    rs = _rs(SamplingConfig(top_k=0, top_p=0.6), vocab=5)
    draws = {int(select_tokens(logits[None], rs, row_keys([s]))[0][0, 0]) for s in range(200)}
    assert draws == {0, 1}


def test_top_k_filter_keeps_k():
    logits = mx.array(np.arange(10, dtype=np.float32))[None]
    assert _kept(logits, SamplingConfig(top_k=3)) == [False] * 7 + [True] * 3
    assert _kept(logits, SamplingConfig(top_k=10)) == [True] * 10  # k >= vocabulary: off


def test_rows_sample_independently_of_the_batch():
    """A row's tokens depend on its own logits, settings and key, not on its neighbours."""
    logits = mx.random.normal((3, 4, 2048), key=mx.random.key(2))
    cfgs = [SamplingConfig(temperature=0.5), SamplingConfig(greedy=True), SamplingConfig(top_k=0, top_p=0.8)]
    batch, _ = select_tokens(logits, _rs(*cfgs), row_keys([10, 11, 12]))
    for i, c in enumerate(cfgs):
        alone, _ = select_tokens(logits[i:i + 1], _rs(c), row_keys([10 + i]))
        assert mx.array_equal(alone[0], batch[i]).item()


def test_extreme_settings_have_defined_results():
    """Temperature far below what float32 can divide by → argmax; huge guidance → finite tokens."""
    logits = mx.random.normal((1, 4, 2048), key=mx.random.key(3)) * 30
    greedy = mx.argmax(logits, axis=-1)
    tiny_t, _ = select_tokens(logits, _rs(SamplingConfig(temperature=1e-39)), row_keys([0]))
    assert mx.array_equal(tiny_t, greedy).item()
    tiny_p, _ = select_tokens(logits, _rs(SamplingConfig(top_p=1e-12)), row_keys([0]))
    assert mx.array_equal(tiny_p, greedy).item()
    pair = mx.concatenate([logits, mx.random.normal((1, 4, 2048), key=mx.random.key(4))], axis=0)
    guided = apply_cfg(pair, mx.array([1e30], mx.float32))
    assert bool(mx.all(mx.isfinite(guided)).item())
    tok, _ = select_tokens(guided, _rs(SamplingConfig(guidance_scale=1e30)), row_keys([0]))
    assert np.unique(np.array(tok)).size > 1 and int(mx.max(tok).item()) > 3


@pytest.mark.parametrize("bad", [dict(top_k=-1), dict(top_p=1.5), dict(temperature=0.0),
                                 dict(guidance_scale=-1.0), dict(temperature=float("nan"))])
def test_sampling_config_rejects(bad):
    with pytest.raises(ValueError):
        SamplingConfig(**bad).validate()


def test_seeded_sampling_is_reproducible_and_varies(mlx_folder):
    pipe = load(mlx_folder("stereo"))
    a1, sr, c1 = gen(pipe, ["80s pop with synths"], duration=0.4, seed=5)
    a2, _, c2 = gen(pipe, ["80s pop with synths"], duration=0.4, seed=5)
    _, _, c3 = gen(pipe, ["80s pop with synths"], duration=0.4, seed=6)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(a1, a2)
    assert not np.array_equal(c1, c3)
    assert len(np.unique(c1[0, 0])) > 5  # tokens vary from step to step


def test_stereo_output_and_channel_decode(mlx_folder):
    pipe = load(mlx_folder("stereo"))
    audio, sr, codes = gen(pipe, ["calm piano", "loud rock drums"], duration=0.3, greedy=True)
    assert sr == 32000 and audio.shape == (2, 2, 15 * 640) and audio.dtype == np.float32
    left = np.array(pipe.model.audio_encoder.decode(mx.array(codes[:, 0::2])))
    right = np.array(pipe.model.audio_encoder.decode(mx.array(codes[:, 1::2])))
    np.testing.assert_allclose(audio[:, 0:1], left, atol=1e-6)
    np.testing.assert_allclose(audio[:, 1:2], right, atol=1e-6)
    assert np.abs(audio[:, 0] - audio[:, 1]).max() > 1e-3  # left differs from right


def test_mono_output_shape(mlx_folder):
    pipe = load(mlx_folder("mono"))
    audio, sr, _ = gen(pipe, "jazz", duration=0.2, seed=0)
    assert audio.shape == (1, 1, 10 * 640)


def test_embedded_checkpoint_end_to_end(tmp_path):
    """The README's main commands: convert the shipped tiny stereo checkpoint, generate, parity."""
    env = {**__import__("os").environ, "MLX_MUSIC_DEBUG": ""}
    out = tmp_path / "tiny-stereo"
    run = lambda *a: subprocess.run([sys.executable, "-m", "mlx_music.cli", *a], capture_output=True,  # noqa: E731
                                    text=True, cwd=ROOT, env=env)
    r = run("convert", "--hf-path", "tests/data/tiny-musicgen-stereo", "--mlx-path", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    r = run("generate", "--model", str(out), "--prompt", "80s pop with synths", "--duration", "2",
            "--seed", "1", "--out", str(tmp_path / "song.wav"), "--quiet")
    assert r.returncode == 0, r.stderr
    data, sr = sf.read(tmp_path / "song.wav")
    assert sr == 32000 and data.shape == (64000, 2)
    assert np.abs(data[:, 0] - data[:, 1]).max() > 1e-3
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["audio_channels"] == 2 and cfg["num_codebooks"] == 8


def test_melody_text_is_capped_to_fit_the_positions(mlx_folder):
    """Melody models carry the text in decoder positions: a long prompt is truncated (warning) so
    prefix + a full window never exceeds the position table."""
    pipe = load(mlx_folder("melody"))
    cfg = pipe.config
    room = cfg["decoder"]["max_position_embeddings"] - cfg["melody"]["chroma_length"] - (pipe.max_frames + 3 + 1)
    assert pipe.tokenizer.max_tokens == min(512, room)
    with pytest.warns(UserWarning, match="truncated"):
        ids, _ = pipe.tokenizer(["jazz " * 300])
    assert ids.shape[1] == pipe.tokenizer.max_tokens and ids[0, -1] == 1  # ends with </s>
