"""mlx-music: convert MusicGen checkpoints to MLX and generate music with them.

    from mlx_music import load, convert
    model = load("facebook/musicgen-small")    # converted once into the cache, then loaded from it
    convert("facebook/musicgen-small", "out/musicgen-small")   # or convert into a folder of your own
    model = load("out/musicgen-small")
    result = model.generate("80s pop with synths", duration=10.0)

Subpackages, imports pointing down (checked by import-linter, see pyproject.toml):
``cli`` → ``eval`` / ``converters`` → ``runtime`` → ``models``.
"""

from __future__ import annotations

from typing import Any

# Bind MLX's CPU BLAS to MKL (when installed) before any subpackage imports mlx.core. This module
# only dlopens a library; it imports nothing of MLX, torch or the runtime.
from mlx_music.blas import preload_fast_blas as _preload_fast_blas

_preload_fast_blas()

from mlx_music._meta import __version__  # noqa: E402 - the one version source
__all__ = ["load", "convert", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import mlx_music.models` loads neither the runtime nor the converter.
    if name == "load":
        # Through the conversion cache: an unconverted hub repo or folder is converted once.
        from mlx_music.converters.autoconvert import load

        return load
    if name == "convert":
        from mlx_music.converters.convert import convert_checkpoint

        return convert_checkpoint
    raise AttributeError(f"module 'mlx_music' has no attribute {name!r}")
