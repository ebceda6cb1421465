"""Helpers of the server tests: the embedded tiny checkpoint, a real uvicorn on a free port, WAV
reading, and "the same request run alone" as `mlx-music generate` would write it."""

from __future__ import annotations

import io
import struct
import socket
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "tests" / "data" / "tiny-musicgen-stereo"


def samples(duration: float) -> int:
    """Samples of a clip of ``duration`` s from the embedded tiny model (50 frames/s, 640 per frame)."""
    return max(1, round(duration * 50)) * 640


def convert_embedded(out: Path) -> Path:
    from mlx_music.converters.convert import convert_checkpoint

    convert_checkpoint(EMBEDDED, out, progress=False)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UvicornThread:
    """A real uvicorn serving ``app`` on 127.0.0.1:<free port>, in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "UvicornThread":
        self.thread.start()
        end = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < end and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def pcm16(data: bytes) -> tuple[np.ndarray, int]:
    """A WAV/FLAC file's samples as int16 [samples, channels] and its rate."""
    a, sr = sf.read(io.BytesIO(data), dtype="int16", always_2d=True)
    return a, sr


def alone(pipe, tmp_path: Path, prompt: str, duration: float, **settings) -> np.ndarray:
    """The request run alone and written by `save_audio`, as `mlx-music generate` does; int16."""
    from mlx_music.runtime import save_audio
    from mlx_music.runtime.generation import Request

    res = pipe.generate_batch([Request(prompt, duration, **settings)])
    path = tmp_path / f"alone-{time.monotonic_ns()}.wav"
    save_audio(path, res.audio[0], res.sample_rate)
    data = path.read_bytes()
    path.unlink()
    return pcm16(data)[0]


def tone_wav(seconds: float, sr: int = 32000, amplitude: float = 0.3) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    buf = io.BytesIO()
    sf.write(buf, (amplitude * np.sin(2 * np.pi * 330 * t)).astype(np.float32), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def odd_rate_wav(rate: int, frames: int = 1000) -> bytes:
    """A 2 KB mono 16-bit WAV whose header claims ``rate`` Hz (the issue's odd.wav)."""
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(np.arange(frames) / 5)).astype(np.float32), 8000, format="WAV", subtype="PCM_16")
    data = bytearray(buf.getvalue())
    data[24:28] = struct.pack("<I", rate)
    data[28:32] = struct.pack("<I", rate * 2)
    return bytes(data)
