"""mlx-music runtime: load an MLX MusicGen checkpoint and generate audio. Never imports torch.

    from runtime import load, save_audio
    model = load("out/musicgen-stereo-small")          # or a hub repo id
    audio, sr = model.generate(["80s pop with synths"], duration=10.0)
    save_audio("song.wav", audio[0], sr)
"""

from __future__ import annotations

# Must run before anything imports mlx.core: MLX's CPU GEMM then binds to MKL when installed.
from runtime.blas import preload_fast_blas as _preload_fast_blas

_preload_fast_blas()

from runtime.audio_io import save_audio  # noqa: E402
from runtime.loader import load  # noqa: E402

__all__ = ["load", "save_audio"]
