"""Checks of converted checkpoints against references: transformers parity, quantization fidelity."""
