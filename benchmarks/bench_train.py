"""LoRA training throughput and peak memory: mlx-music against transformers + peft, same run.

    python benchmarks/bench_train.py                              # tiny and small-shaped, CPU
    python benchmarks/bench_train.py --sizes small --batch-size 4 --seconds 10

Both engines train the same random-init MusicGen decoder (tests/tiny_models.py configs; "small" is
musicgen-small's decoder shape: 1024 wide, 24 layers, 16 heads, ffn 4096) with the same LoRA
(rank 16, alpha 16, the dreambooth targets q/k/v/out_proj, fc1, fc2), the same batch (random codes
of `--seconds` per row in the dreambooth label layout, one caption), AdamW and fp32. The frozen T5
runs once before the timed steps on both sides (mlx-music caches its states by design; transformers
gets them as `encoder_outputs`), so what is timed is decoder forward + backward + AdamW update.
Each engine runs in its own child process (clean peak RSS): `--warmup` untimed steps, then
`--steps` timed ones; the median step is reported as seconds of training audio per second. The
engines alternate for `--rounds` rounds and each keeps its best round (the load of a shared
machine moves between runs).
Works on a Mac (MLX on the GPU, torch on MPS/CPU) and on CUDA (torch on cuda) unchanged.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
CACHE = ROOT / "benchmarks" / ".cache" / "train"
SIZES = {"tiny": {}, "small": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                                    max_position_embeddings=2048),
         "medium": dict(hidden_size=1536, num_hidden_layers=48, num_attention_heads=24, ffn_dim=6144,
                        max_position_embeddings=2048)}
DTYPES = ("float32", "bfloat16", "float16")
TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
CAPTION = "80s pop with synths"


def prepare(size: str, dtype: str = "float32") -> Path:
    """Hub folder + MLX conversion (in ``dtype``, at ``mlx-<dtype>``) of the random model of `size`
    (cached under benchmarks/.cache)."""
    import tiny_models

    from mlx_music.converters.convert import convert_checkpoint

    root = CACHE / size
    if not (root / f"mlx-{dtype}" / "conversion.json").is_file():
        t0 = time.perf_counter()
        if not (root / "hf" / "config.json").is_file():
            tiny_models.write_hub_folder(tiny_models.build_model("mono", **SIZES[size]), root / "hf")
        convert_checkpoint(root / "hf", root / f"mlx-{dtype}", dtype=dtype, force=True, progress=False)
        print(f"[prepare] {size} in {time.perf_counter() - t0:.1f} s", flush=True)
    return root


def batch_arrays(root: Path, batch: int, seconds: float, seed: int = 0) -> dict:
    import numpy as np

    from mlx_music.runtime.text import TextTokenizer
    from mlx_music.train.loss import build_labels, decoder_inputs

    cfg = json.loads((root / "mlx-float32" / "config.json").read_text())
    k, ch, rate = cfg["num_codebooks"], cfg["audio_channels"], cfg["frame_rate"]
    rng = np.random.default_rng(seed)
    codes = [rng.integers(0, 2048, (k, int(seconds * rate))) for _ in range(batch)]
    labels = build_labels(codes, ch, 2048)
    ids, mask = TextTokenizer(root / "mlx-float32" / "tokenizer.json")([CAPTION] * batch)
    return dict(labels=labels, inputs=decoder_inputs(labels, 2048, 2048), ids=ids, mask=mask)


def _timed(step, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def worker_mlx(root: Path, a) -> dict:
    import mlx_music  # noqa: F401  (binds MKL before mlx.core)
    import mlx.core as mx

    from mlx_music.runtime import load
    from mlx_music.train.lora import LoraSettings, apply_lora
    from mlx_music.train.step import OptimSettings, Stepper, make_optimizer

    pipe = load(root / f"mlx-{a.dtype}")  # float32 LoRA factors over the base in a.dtype
    apply_lora(pipe.model, TARGETS, LoraSettings(rank=16, alpha=16.0))
    b = batch_arrays(root, a.batch_size, a.seconds)
    t5 = pipe.model.text_encoder(mx.array(b["ids"]), mx.array(b["mask"]))
    batch = dict(inputs=mx.array(b["inputs"]), labels=mx.array(b["labels"]), text=t5, text_mask=mx.array(b["mask"]),
                 drop=mx.zeros((a.batch_size,), mx.bool_))
    mx.eval(batch)
    stepper = Stepper(pipe.model, make_optimizer(OptimSettings(lr=1e-4, clip=0.0), constant=True), clip=0.0)
    times = _timed(lambda: stepper.step([batch]), a.warmup, a.steps)
    return {"times": times, "device_peak_gb": mx.get_peak_memory() / 2**30}


def worker_torch(root: Path, a) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import MusicgenForConditionalGeneration

    device = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    model = MusicgenForConditionalGeneration.from_pretrained(root / "hf", torch_dtype=getattr(torch, a.dtype))
    model.config.decoder.decoder_start_token_id = 2048  # as the dreambooth script sets it
    model.freeze_audio_encoder()
    model.freeze_text_encoder()
    pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)).to(device)
    pm.eval()  # no dropout in the base, as on the MLX side (same maths)
    b = batch_arrays(root, a.batch_size, a.seconds)
    ids, mask = torch.tensor(b["ids"]).long().to(device), torch.tensor(b["mask"]).long().to(device)
    with torch.no_grad():
        enc = pm.base_model.model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    labels = torch.tensor(b["labels"].transpose(0, 2, 1)).long().to(device)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)

    def step():
        loss = pm(encoder_outputs=(enc,), attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        float(loss)

    times = _timed(step, a.warmup, a.steps)
    return {"times": times, "device": device, "threads": torch.get_num_threads()}


def run_worker(engine: str, size: str, a) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--sizes", size, "--batch-size", str(a.batch_size),
           "--seconds", str(a.seconds), "--steps", str(a.steps), "--warmup", str(a.warmup), "--dtype", a.dtype]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{engine} worker failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,small", help=f"comma-separated: {', '.join(SIZES)}")
    ap.add_argument("--dtype", default="float32", choices=DTYPES,
                    help="base weights (MLX: float32 LoRA factors over them; torch: the whole model in it)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0, help="audio per row")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="worker runs per engine, alternating; the best is kept")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--worker", choices=["mlx", "torch"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        import mlx_music  # noqa: F401  (first: binds MLX's CPU BLAS to MKL before torch or mlx.core load)
        from bench_generate import _peak_rss_gb, _reset_peak_rss
        from mlx_music.blas import blas_info

        _reset_peak_rss()
        prepare(a.sizes)  # the float32 folder: tokenizer and config of the batch
        root = prepare(a.sizes, a.dtype)
        out = (worker_mlx if a.worker == "mlx" else worker_torch)(root, a)
        out["peak_rss_gb"] = _peak_rss_gb()
        if a.worker == "mlx":
            out["blas"] = blas_info()["blas"]
        print(json.dumps(out))
        return
    rows = []
    print(f"batch {a.batch_size} x {a.seconds:g} s, LoRA r16 on {','.join(TARGETS)}, AdamW, base {a.dtype}, "
          f"median of {a.steps} steps after {a.warmup} warm-up, best of {a.rounds} rounds")
    print(f"{'size':6} {'engine':20} {'median s':>9} {'best s':>7} {'audio s/s':>10} {'ratio':>7} {'best ratio':>10} "
          f"{'peak RSS GB':>12}")
    for size in a.sizes.split(","):
        prepare(size), prepare(size, a.dtype)
        res: dict[str, dict] = {}
        for _ in range(a.rounds):  # alternate engines, keep each one's best round (a shared machine's load moves)
            for e in ("torch", "mlx"):
                r = run_worker(e, size, a)
                if e not in res or statistics.median(r["times"]) < statistics.median(res[e]["times"]):
                    res[e] = r
        audio = a.batch_size * a.seconds
        rate = {e: audio / statistics.median(r["times"]) for e, r in res.items()}
        best = {e: min(r["times"]) for e, r in res.items()}  # least disturbed step (loaded machines)
        for e, name in (("torch", "transformers+peft"), ("mlx", "mlx-music")):
            r = res[e]
            print(f"{size:6} {name:20} {statistics.median(r['times']):9.3f} {best[e]:7.3f} {rate[e]:10.2f} "
                  f"{rate[e] / rate['torch']:6.2f}x {best['torch'] / best[e]:9.2f}x {r['peak_rss_gb']:12.2f}")
            rows.append({"size": size, "engine": name, **r, "audio_s_per_s": rate[e],
                         "ratio": rate[e] / rate["torch"], "best_ratio": best["torch"] / best[e]})
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
