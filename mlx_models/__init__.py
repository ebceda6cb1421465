"""MLX networks of MusicGen: T5 encoder, audio-token decoder, EnCodec. Imports nothing of ours."""
