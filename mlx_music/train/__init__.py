"""Fine-tuning on MLX: LoRA / QLoRA training of the MusicGen decoder, exported as PEFT adapters."""
