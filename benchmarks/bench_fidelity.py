"""Quantization fidelity at full musicgen-small size: fp32 vs q8 / q4 / mixed-4-8.

    python benchmarks/bench_fidelity.py [--length 32] [--sequences 4] [--json]

No real weights are needed (or downloaded): a random-init transformers MusicGen with the real
musicgen-small decoder shape (hidden 1024, 24 layers, 16 heads, ffn 4096, 4 codebooks, vocab 2048)
is saved in hub layout under benchmarks/.cache/ (git-ignored, reused by later runs) and converted
with `convert_all` using the musicgen-small manifest, which checks those shapes. T5 keeps the
width and depth the manifest expects (768 x 12) but is otherwise shrunk (4 heads of 16, d_ff 64,
vocab 99), and EnCodec is tiny: neither is quantized, only the decoder matters here.

Random init gives near-uniform next-token distributions, where top-1 agreement is a coin toss. So,
as tests/tiny_models.py does, decoder weights are re-drawn: embeddings N(0, 1), every projection
N(0, 1/fan_in) (unit-variance activations through 24 layers), norms and biases jittered, and the
heads scaled so logits have std --logit-std (default 4). The reference entropy column ("ref H",
nats) shows how peaked the resulting distributions are. Numbers measure the quantizer on Gaussian
weights, not a trained model: trained weights are not i.i.d., so treat them as indicative only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # tiny_models: T5/EnCodec shapes, hub-folder writer

import mlx_music.runtime  # noqa: E402,F401  (fast BLAS preload must precede the first mlx.core import)

VARIANT = "musicgen-small"
DECODER = dict(vocab_size=2048, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
               ffn_dim=4096, num_codebooks=4, audio_channels=1, max_position_embeddings=2048,
               pad_token_id=2048, bos_token_id=2048)
# Facts the musicgen-small manifest checks (text_encoder_width/layers) kept; the rest shrunk.
T5_SHAPE = dict(d_model=768, num_layers=12, num_heads=4, d_kv=16, d_ff=64)
QUANTS = {"q8": (8, None), "q4": (4, None), "mixed-4-8": (4, "mixed-4-8")}


def build_hf(folder: Path, seed: int, logit_std: float) -> None:
    """Random musicgen-small-shaped transformers checkpoint, decoder re-drawn (see module doc)."""
    import torch
    import transformers
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, MusicgenForConditionalGeneration, T5Config

    import tiny_models

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = MusicgenConfig(text_encoder=T5Config(**{**tiny_models.T5_KW, **T5_SHAPE}).to_dict(),
                         audio_encoder=EncodecConfig(**tiny_models.ENCODEC_KW).to_dict(),
                         decoder=MusicgenDecoderConfig(**DECODER).to_dict())
    model = MusicgenForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    hidden = DECODER["hidden_size"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("decoder."):
                continue
            if "lm_heads" in name:
                # Final layer norm output has unit-variance coordinates: logits get std logit_std.
                p.copy_(torch.randn(p.shape, generator=g) * (logit_std / hidden ** 0.5))
            elif ".embed_tokens." in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith(".weight") and p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
            elif name.endswith("bias") or "layer_norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for name, b in model.named_buffers():  # EnCodec codebooks: transformers leaves them zero
            if name.endswith("codebook.embed"):
                b.copy_(torch.randn(b.shape, generator=g))
    tiny_models.write_hub_folder(model, folder)


def kernel_check(folder: Path) -> float:
    """Max |logit difference| between the quantized kernels and the dequantized float path on a
    short input: evidence that --kernels would give the same table, at a fraction of the time."""
    import mlx.core as mx
    import numpy as np

    from mlx_music.runtime.delay_pattern import apply_pattern
    from mlx_music.eval.fidelity import dequantize_model
    from mlx_music.runtime.loader import load

    pipe = load(folder)
    codes = np.random.default_rng(0).integers(0, 2048, size=(1, 4, 6), dtype=np.int32)
    seq = mx.array(apply_pattern(codes, 1, 2048))
    ids, mask = pipe.tokenizer(["calm piano jazz"])
    states, m = pipe.model.encode_text(mx.array(ids), mx.array(mask))
    with_kernels = pipe.model(seq, states, m)
    dequantize_model(pipe.model)
    return float(mx.abs(pipe.model(seq, states, m) - with_kernels).max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=REPO / "benchmarks" / ".cache")
    ap.add_argument("--length", type=int, default=32, help="code frames per sequence (teacher forcing)")
    ap.add_argument("--sequences", type=int, default=4, help="random code sequences per prompt")
    ap.add_argument("--prompts", type=int, default=4, help="how many of the default prompts to use")
    ap.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    ap.add_argument("--logit-std", type=float, default=4.0, help="std of the reference logits (peakedness)")
    ap.add_argument("--guidance-scale", type=float, default=None, help="compare CFG-combined logits")
    ap.add_argument("--no-fp16", action="store_true", help="skip the fp16 baseline row")
    ap.add_argument("--kernels", action="store_true",
                    help="run MLX's quantized kernels (slow on CPU) instead of dequantized float weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    a = ap.parse_args(argv)

    from mlx_music.converters.convert import QuantizeOptions
    from mlx_music.converters.convert_all import convert_all, format_summary
    from mlx_music.eval.fidelity import DEFAULT_PROMPTS, fidelity_reports

    log = (lambda *x: print(*x, file=sys.stderr)) if a.json else print
    tag = f"seed{a.seed}-logit{a.logit_std:g}"
    hf_root = a.cache / f"hf-{tag}"
    t0 = time.perf_counter()
    if not (hf_root / VARIANT / "model.safetensors").exists():
        log(f"building random {VARIANT}-shaped checkpoint in {hf_root / VARIANT} ...")
        build_hf(hf_root / VARIANT, a.seed, a.logit_std)
    t_build = time.perf_counter() - t0

    out = a.cache / f"mlx-{tag}"
    rows = convert_all(out, [VARIANT], hf_root=hf_root)  # fp32 reference, manifest-checked
    if not a.no_fp16:  # baseline: how far plain fp16 rounding already moves top-1 / KL
        rows += convert_all(out, [VARIANT], hf_root=hf_root, dtype="float16")
    for name, (bits, recipe) in QUANTS.items():
        rows += convert_all(out, [VARIANT], hf_root=hf_root, quantize=QuantizeOptions(bits, a.group_size, recipe))
    log(format_summary(rows))
    if any(r.status == "failed" for r in rows):
        return 1
    t_convert = time.perf_counter() - t0 - t_build

    t1 = time.perf_counter()
    kernel_diff = None if a.kernels else kernel_check(rows[-2].path)  # the q4 checkpoint
    reps = fidelity_reports([r.path for r in rows[1:]], rows[0].path, prompts=DEFAULT_PROMPTS[: a.prompts],
                            num_sequences=a.sequences, length=a.length, seed=a.seed,
                            guidance_scale=a.guidance_scale, dequantize=not a.kernels)
    t_fid = time.perf_counter() - t1
    note = (f"random-init {VARIANT}-shaped decoder (hidden 1024, 24 layers, 16 heads, 4 codebooks); "
            f"weights re-drawn so distributions are peaked (logit std {a.logit_std:g}), not trained weights")
    if kernel_diff is not None:
        note += (f"; quantized layers ran as float matmuls on the dequantized weights (MLX's CPU quantized "
                 f"kernels are ~15x slower); kernel vs dequantized q4 logits: max |diff| {kernel_diff:.1e}")
    if a.json:
        print(json.dumps({"note": note, "group_size": a.group_size,
                          "kernel_vs_dequantized_max_abs_logit_diff": kernel_diff,
                          "seconds": {"build": t_build, "convert": t_convert, "fidelity": t_fid},
                          "sizes": {r.path.name: r.size for r in rows},
                          "reports": {rep.model_label: rep.to_dict() for rep in reps}}, indent=2))
        return 0
    print(f"\nNOTE: {note}.\n")
    for rep in reps:
        print(rep.format_table() + "\n")
    print(f"{'model':<16} {'size':>9} {'top-1':>7} {'worst cb':>8} {'KL mean':>9} {'ref H':>6}")
    for r, rep in zip(rows[1:], reps):
        print(f"{rep.model_label:<16} {r.size / 1e6:>7.0f}MB {rep.top1:>7.4f} {rep.worst_top1:>8.4f} "
              f"{rep.kl_mean:>9.2e} {rep.ref_entropy:>6.2f}")
    print(f"(fp32 reference {rows[0].size / 1e6:.0f} MB; build {t_build:.0f}s, convert {t_convert:.0f}s, "
          f"fidelity {t_fid:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
