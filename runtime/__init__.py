"""mlx-music runtime: load an MLX MusicGen checkpoint and generate audio. Never imports torch.

    from mlx_music.runtime import load, save_audio
    model = load("out/musicgen-stereo-small")          # or a hub repo id
    result = model.generate(["80s pop with synths"], duration=10.0)
    save_audio("song.wav", result.audio[0], result.sample_rate)
"""

from __future__ import annotations

from mlx_music.runtime.audio_io import save_audio
from mlx_music.runtime.loader import load

__all__ = ["load", "save_audio"]
