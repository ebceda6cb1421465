"""Learning works: 200 LoRA steps on six pure tones make the tiny model generate that tone.

Data: tests/make_tone_dataset.py (six 1 s tones, captions naming the note; one piece held out).
Measures: the validation loss (step 1 vs 200), and a spectral distance of generated audio: the
mean absolute difference, in dB, between the average magnitude spectrum (1024-point Hann frames)
of a 1 s generation for "a pure tone at 440 Hz, note A4" and that of the training tone as the
codec reproduces it (EnCodec encode + decode: the best the model can do). Three seeds each.
Measured: validation loss 17.9 -> 0.15; distance 7.7 dB without the adapter, 0.07 dB with it.
"""

from __future__ import annotations

import json

import mlx_music  # noqa: F401  (before mlx.core: binds MKL)
import numpy as np

from make_tone_dataset import write_dataset
from mlx_music.runtime import load
from mlx_music.runtime.audio_io import read_audio
from mlx_music.train.run import TrainOptions, train

PROMPT = "a pure tone at 440 Hz, note A4"


def mean_spectrum_db(audio: np.ndarray, n: int = 1024) -> np.ndarray:
    x = audio.mean(axis=0)
    frames = [np.abs(np.fft.rfft(x[i:i + n] * np.hanning(n))) for i in range(0, len(x) - n, n // 2)]
    return 20 * np.log10(np.mean(frames, axis=0) + 1e-6)


def spectral_distance(pipe, reference: np.ndarray) -> float:
    return float(np.mean([np.mean(np.abs(mean_spectrum_db(pipe.generate([PROMPT], duration=1.0, seed=s).audio[0])
                                         - reference)) for s in range(3)]))


def test_two_hundred_steps_learn_the_tones(tmp_path, mlx_folder):
    data = write_dataset(tmp_path / "tones", seconds=1.0, repeats=1)
    base = mlx_folder("mono")
    out = train(TrainOptions(data=str(data), model=str(base), out=str(tmp_path / "run"), steps=200, batch_size=2,
                             rank=8, alpha=16.0, lr=3e-3, segment=1.0, val_fraction=0.2, val_every=100,
                             save_every=200, progress=False,
                             targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "lm_heads")))
    val = [r["val_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert len(val) == 3 and val[-1] < val[0] / 10, val

    plain = load(base)
    wav, _ = read_audio(data / "a4_0.wav")
    reference = mean_spectrum_db(plain.codec.decode(plain.codec.encode(wav)[None])[0])
    without = spectral_distance(plain, reference)
    with_adapter = spectral_distance(load(base, adapter=out), reference)
    assert with_adapter < without / 5, (without, with_adapter)
