"""Helpers shared by the generation tests (extension, streaming): cached pipelines with a shrunk
window, SNR, and test signals."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlx_music.runtime import load

_PIPES: dict = {}


def cached_pipe(folder: Path, window_s: float | None = None):
    """A loaded pipeline per (folder, window); window_s shrinks one window to that many seconds."""
    key = (str(folder), window_s)
    if key not in _PIPES:
        pipe = load(folder)
        if window_s is not None:
            pipe.config["generation"]["max_duration"] = window_s  # max_frames reads it each time
        _PIPES[key] = pipe
    return _PIPES[key]


def snr_db(ref: np.ndarray, got: np.ndarray) -> float:
    err = float(np.sum((ref.astype(np.float64) - got) ** 2))
    return float("inf") if err == 0 else 10 * np.log10(float(np.sum(ref.astype(np.float64) ** 2)) / err)


def melody_tones(seconds: float) -> tuple[np.ndarray, int]:
    """Tones changing pitch every 0.4 s, so the chroma varies along the melody."""
    sr = 32000
    t = np.arange(int(seconds * sr)) / sr
    freqs = np.array([262, 330, 392, 440, 494, 523, 587])[(t // 0.4).astype(int) % 7]
    return (0.4 * np.sin(2 * np.pi * np.cumsum(freqs) / sr)).astype(np.float32), sr


def prompt_audio(seconds: float) -> tuple[np.ndarray, int]:
    """A 220 Hz tone with a 3 Hz tremolo: an audio prompt the codec can encode."""
    sr = 32000
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32), sr


def gen(pipe, *args, **kwargs):
    """`pipe.generate` as stacked arrays (audio [B, C, S], sample rate, codes [B, K, F]) for tests
    whose rows all have one length."""
    res = pipe.generate(*args, **kwargs)
    return np.stack(res.audio), res.sample_rate, np.stack(res.codes)


def run_cli(*args: str):
    """`mlx-music ARGS` in this process (click's runner); exceptions propagate as tracebacks."""
    from click.testing import CliRunner

    from mlx_music.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """``rows`` as a JSON Lines prompts file (UTF-8, unescaped)."""
    import json

    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path
