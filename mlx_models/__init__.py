"""MLX networks of MusicGen: T5 encoder, audio-token decoder, EnCodec. Never imports torch."""

# Bind MLX's CPU BLAS to MKL when installed; must precede the first `import mlx.core`.
from runtime.blas import preload_fast_blas as _preload_fast_blas

_preload_fast_blas()
