"""Token-loop speed: our MLX runtime vs transformers `generate()` on the same full-size model.

One run does everything:
  1. builds a random-init full-size MusicGen in transformers (real t5-base text encoder, real
     32 kHz EnCodec, decoder of the chosen size) and saves it in hub layout under
     benchmarks/.cache/ (reused by later runs);
  2. converts it with our converter to each requested MLX mode (fp32/fp16/bf16/q8/q4);
  3. times every engine/mode in its own child process (clean peak-memory numbers, no allocator
     or thread-pool state shared between engines): one untimed warm-up generation with the same
     shapes, then `--repeats` timed generations; the best is reported.

What is timed, for both engines: text encoding + prefill + the sampled token loop (CFG 3.0,
top-k 250, temperature 1) for exactly `--steps` decoder steps. EnCodec decoding is excluded:
transformers' `generate()` always decodes, so its `audio_encoder.decode` is replaced by a stub;
our side drains the frame generator (`pipe.frames(...)`, which never decodes).

    python benchmarks/bench_generate.py --size small --steps 250 --json out.json
    python benchmarks/bench_generate.py --size large --stereo --modes bf16,q4 --hf-modes fp32

Works on CPU and on an NVIDIA GPU: transformers runs on cuda when torch sees one; MLX runs on its
default device (the GPU with the mlx-cuda backend).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # converters/, runtime/ without an installed package
if os.environ.get("MLX_MUSIC_SRC"):  # time another checkout's mlx_music (e.g. the code before a change)
    sys.path.insert(0, str(Path(os.environ["MLX_MUSIC_SRC"]).resolve()))
CACHE = ROOT / "benchmarks" / ".cache"
FRAME_RATE = 50  # decoder steps per second of audio

# Decoder shapes of the released checkpoints (hidden, layers, heads, ffn).
SIZES: dict[str, tuple[int, int, int, int]] = {
    "small": (1024, 24, 16, 4096),
    "medium": (1536, 48, 24, 6144),
    "large": (2048, 48, 32, 8192),
    "tiny": (64, 2, 4, 256),  # smoke test of the benchmark itself
}
# t5-base (the text encoder of every MusicGen) and the 32 kHz EnCodec, as in the hub configs.
T5_BASE = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
               relative_attention_num_buckets=32, relative_attention_max_distance=128,
               feed_forward_proj="relu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
ENCODEC_32K = dict(sampling_rate=32000, audio_channels=1, num_filters=64, hidden_size=128,
                   codebook_size=2048, codebook_dim=128, upsampling_ratios=[8, 5, 4, 4],
                   target_bandwidths=[2.2], num_lstm_layers=2, compress=2, kernel_size=7,
                   last_kernel_size=7, residual_kernel_size=3, dilation_growth_rate=2,
                   use_causal_conv=False, normalize=False, pad_mode="reflect",
                   norm_type="weight_norm", use_conv_shortcut=False, num_residual_layers=1,
                   chunk_length_s=None, overlap=None, trim_right_ratio=1.0)
MLX_MODES = ("fp32", "fp16", "bf16", "q8", "q4")
HF_MODES = ("fp32", "fp16", "bf16")
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
PROMPT = "80s pop with synths and a driving bass line"


# ----------------------------------------------------------------------------- model build
def hub_dir(size: str, stereo: bool) -> Path:
    return CACHE / f"hf-{'stereo-' if stereo else ''}{size}"


def build_hub_model(size: str, stereo: bool, device: str) -> Path:
    """Write the random-init transformers model once in hub layout; returns the folder."""
    folder = hub_dir(size, stereo)
    if (folder / "model.safetensors.index.json").exists():
        return folder
    import torch
    import transformers
    from transformers import (EncodecConfig, MusicgenConfig, MusicgenDecoderConfig,
                              MusicgenForConditionalGeneration, T5Config)

    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models  # hub writer shared with the tests (config, tokenizer, weights)

    transformers.logging.set_verbosity_error()
    hidden, layers, heads, ffn = SIZES[size]
    dec = MusicgenDecoderConfig(vocab_size=2048, hidden_size=hidden, num_hidden_layers=layers,
                                num_attention_heads=heads, ffn_dim=ffn, max_position_embeddings=2048,
                                num_codebooks=8 if stereo else 4, audio_channels=2 if stereo else 1,
                                pad_token_id=2048, bos_token_id=2048)
    cfg = MusicgenConfig(text_encoder=T5Config(**T5_BASE).to_dict(),
                         audio_encoder=EncodecConfig(**ENCODEC_32K).to_dict(), decoder=dec.to_dict())
    t0 = time.perf_counter()
    # Built directly on the benchmark device: initialising 3B parameters on a GPU takes a second,
    # on a CPU the default init dominates the build.
    with torch.device(device):
        model = MusicgenForConditionalGeneration(cfg).eval()
    _randomize(model)
    model.generation_config.guidance_scale = 3.0
    model.generation_config.top_k = 250
    model.generation_config.do_sample = True
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    # Sharded so no single file is huge (the large model is ~13 GB in fp32).
    nbytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    tiny_models.write_hub_folder(model, tmp, layout="sharded", num_shards=max(1, round(nbytes / 2e9)))
    tmp.rename(folder)
    print(f"[build] {folder.name}: {nbytes / 1e9:.2f} GB fp32 in {time.perf_counter() - t0:.0f} s", flush=True)
    del model
    if device == "cuda":  # hand the cached blocks back before the workers need the GPU
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    return folder


def _randomize(model: Any) -> None:
    """Scale-aware random decoder weights so sampling sees a spread-out distribution.

    transformers' init (std 0.02) gives near-uniform logits; N(0, 1/fan_in) weights and unit
    embeddings keep activations O(1) through every layer (fp16-safe) and logits of std ~1.
    """
    import torch

    with torch.no_grad():
        for name, p in model.decoder.named_parameters():
            if name.endswith(".weight") and p.ndim == 2:
                std = 1.0 if ".embed_tokens." in name else p.shape[1] ** -0.5
                p.normal_(0.0, std)


# ----------------------------------------------------------------------------- conversion
def mlx_dir(size: str, stereo: bool, mode: str, q_dtype: str) -> Path:
    suffix = f"-{q_dtype}" if mode.startswith("q") else ""
    return CACHE / f"mlx-{'stereo-' if stereo else ''}{size}-{mode}{suffix}"


def convert_mode(src: Path, size: str, stereo: bool, mode: str, q_dtype: str) -> Path:
    """Our converter, one MLX checkpoint per mode (cached)."""
    out = mlx_dir(size, stereo, mode, q_dtype)
    if (out / "conversion.json").exists():
        return out
    from mlx_music.converters.convert import QuantizeOptions, convert_checkpoint

    t0 = time.perf_counter()
    if mode.startswith("q"):
        convert_checkpoint(src, out, dtype=DTYPE_NAMES[q_dtype], quantize=QuantizeOptions(bits=int(mode[1:])),
                           force=True, progress=False)
    else:
        convert_checkpoint(src, out, dtype=DTYPE_NAMES[mode], force=True, progress=False)
    print(f"[convert] {out.name} in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


# ----------------------------------------------------------------------------- workers
def _reset_peak_rss() -> None:
    """Linux carries the parent's peak RSS over fork+exec (ru_maxrss, VmHWM); writing 5 to
    clear_refs resets VmHWM to the current RSS, so the worker reports its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_gb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _prompt_ids(folder: Path) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).encode(PROMPT).ids


def worker_hf(folder: Path, mode: str, steps: int, repeats: int, seed: int) -> dict[str, Any]:
    """transformers generate(): CFG, top-k 250, sampling, `steps` new decoder positions."""
    import types

    import torch
    import transformers
    from transformers import MusicgenForConditionalGeneration

    transformers.logging.set_verbosity_error()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mode]
    model = MusicgenForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(dev).eval()
    # generate() always runs EnCodec on the result; we time the token loop only.
    model.audio_encoder.decode = lambda codes, *a, **k: types.SimpleNamespace(
        audio_values=torch.zeros(codes.shape[1], 1, 1))
    ids = torch.tensor([_prompt_ids(folder)], device=dev)
    mask = torch.ones_like(ids)

    def run() -> float:
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, do_sample=True, guidance_scale=3.0,
                           top_k=250, temperature=1.0, max_new_tokens=steps, min_new_tokens=steps)
        if dev == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    torch.manual_seed(seed)
    run()  # warm-up: kernels, allocator, cuBLAS handles
    times = [run() for _ in range(repeats)]
    peak_dev = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None
    return {"engine": "transformers", "mode": mode, "device": dev, "times": times, "steps": steps,
            "peak_dev_gb": peak_dev, "peak_rss_gb": _peak_rss_gb(),
            "torch": torch.__version__, "transformers": transformers.__version__}


def worker_mlx(folder: Path, mode: str, steps: int, repeats: int, seed: int, channels: int,
               codebooks: int) -> dict[str, Any]:
    """Our pipeline's token loop (the frame generator: text encoding, prefill, sampled steps)."""
    from mlx_music.blas import blas_info  # first: `import mlx_music` preloads MKL before mlx.core
    from mlx_music.runtime import load
    from mlx_music.runtime.generation import Request

    import mlx.core as mx

    pipe = load(str(folder))
    # steps = frames + (codebooks per channel - 1) delay positions: the same count transformers runs.
    frames = steps - (codebooks // channels - 1)
    done = []

    def run(s: int) -> float:
        t0 = time.perf_counter()
        gen = pipe.frames([Request(PROMPT, frames / pipe.frame_rate, seed=s, guidance_scale=3.0, top_k=250,
                                   temperature=1.0, greedy=False)])
        for _ in gen:
            pass
        gen.codes(gen.num_frames)  # numpy: synced
        done.append(gen.steps)
        return time.perf_counter() - t0

    run(seed)  # warm-up: kernel JIT, allocator
    mx.reset_peak_memory()
    times = [run(seed + 1 + i) for i in range(repeats)]
    assert done[-1] == steps, done
    peak_dev = mx.get_peak_memory() / 2**30
    return {**_mlx_profile(pipe, codebooks), "engine": "mlx", "mode": mode, "device": str(mx.default_device()), "times": times,
            "steps": steps, "peak_dev_gb": peak_dev, "peak_rss_gb": _peak_rss_gb(),
            "mlx": mx.__version__, "blas": blas_info().get("backend")}


def _mlx_profile(pipe: Any, codebooks: int, n: int = 30) -> dict[str, float]:
    """Where a step's time goes: the cached compiled functions run with a sync after every call.

    sync_step_ms: sampling + decoder step, waited for each time (launch + device time);
    sample_ms: the sampling function alone. The loop's real per-step time (1000 / steps_per_s)
    minus sync_step_ms is what pipelining hides or the host adds.
    """
    import mlx.core as mx

    from mlx_music.runtime.generation import Request
    from mlx_music.runtime.sampling import RowSampling, row_keys

    loop = next(iter(pipe._loops.values()))  # the token loop the timed runs used
    rs = RowSampling.stack([pipe.resolve(Request(PROMPT, 1.0)).sampling], pipe.vocab_size)
    advance, last = loop._functions(rs)
    rows = loop.cache.batch_size
    logits = mx.random.normal((rows, codebooks, 2048)).astype(mx.float32)
    forced = mx.full((rows // 2 if loop.cfg else rows, codebooks), -1, dtype=mx.int32)
    keys = row_keys([0])
    n = min(n, loop.cache.max_len - 2)  # slot writes past the buffer are not checked
    out: dict[str, float] = {}
    for name, fn in (("sync_step_ms", advance), ("sample_ms", last)):
        loop.cache.offset = mx.array(0, dtype=mx.int32)  # keep the writes inside the buffer
        mx.eval(fn(logits, forced, keys, *rs.arrays()))
        t0 = time.perf_counter()
        for _ in range(n):
            mx.eval(fn(logits, forced, keys, *rs.arrays()))
        out[name] = (time.perf_counter() - t0) / n * 1e3
    return out


# ----------------------------------------------------------------------------- direct mode
# `--direct`: no hub folder, no conversion. Each worker builds its model in memory with random
# weights of the real shapes (seconds, even for large, instead of minutes of writing and
# converting 13 GB) and runs every batch size with one model load.
#   transformers: generate() on fixed random text ids (EnCodec decode stubbed, as above);
#   torch-graph:  torch_cudagraph.GraphDecoder (transformers modules, one CUDA graph per step);
#   mlx:          runtime.token_loop.TokenLoop (prefill + compiled steps) on random text states.
# Text encoding is in the transformers timing only (one T5 pass: ~1 % of 250 steps).

def hf_config(size: str, stereo: bool) -> Any:
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, T5Config

    hidden, layers, heads, ffn = SIZES[size]
    dec = MusicgenDecoderConfig(vocab_size=2048, hidden_size=hidden, num_hidden_layers=layers,
                                num_attention_heads=heads, ffn_dim=ffn, max_position_embeddings=2048,
                                num_codebooks=8 if stereo else 4, audio_channels=2 if stereo else 1,
                                pad_token_id=2048, bos_token_id=2048)
    return MusicgenConfig(text_encoder=T5Config(**T5_BASE).to_dict(),
                          audio_encoder=EncodecConfig(**ENCODEC_32K).to_dict(), decoder=dec.to_dict())


def _hf_model(size: str, stereo: bool, mode: str) -> Any:
    import torch
    import transformers
    from transformers import MusicgenForConditionalGeneration

    transformers.logging.set_verbosity_error()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(dev):
        model = MusicgenForConditionalGeneration(hf_config(size, stereo)).eval()
    _randomize(model)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mode]
    return model.to(dtype), dev


def worker_direct_hf(size: str, stereo: bool, mode: str, steps: int, batches: list[int],
                     repeats: int, model: Any = None) -> list[dict[str, Any]]:
    import types

    import torch

    model, dev = model or _hf_model(size, stereo, mode)
    model.audio_encoder.decode = lambda codes, *a, **k: types.SimpleNamespace(
        audio_values=torch.zeros(codes.shape[1], 1, 1))
    out = []
    for b in batches:
        ids = torch.randint(3, 32000, (b, 12), generator=torch.Generator().manual_seed(0)).to(dev)

        def run() -> float:
            torch.cuda.synchronize() if dev == "cuda" else None
            t0 = time.perf_counter()
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                               guidance_scale=3.0, top_k=250, temperature=1.0, max_new_tokens=steps,
                               min_new_tokens=steps)
            torch.cuda.synchronize() if dev == "cuda" else None
            return time.perf_counter() - t0

        run()
        times = [run() for _ in range(repeats)]
        out.append({"engine": "transformers", "mode": mode, "batch": b, "times": times, "steps": steps,
                    "device": dev})
    return out


def worker_direct_graph(size: str, stereo: bool, mode: str, steps: int, batches: list[int],
                        repeats: int, model: Any = None) -> list[dict[str, Any]]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from torch_cudagraph import GraphDecoder

    model, dev = model or _hf_model(size, stereo, mode)
    out = []
    for b in batches:
        sps = GraphDecoder(model, b, steps + 1, 12).time(steps, repeats)
        out.append({"engine": "torch-cudagraph", "mode": mode, "batch": b, "times": [steps / sps],
                    "steps": steps, "device": dev})
    return out


def worker_direct_hf_graph(size: str, stereo: bool, mode: str, steps: int, batches: list[int],
                           repeats: int) -> list[dict[str, Any]]:
    """transformers `generate()` and the CUDA-graph loop on one model (one build instead of two)."""
    built = _hf_model(size, stereo, mode)
    return (worker_direct_hf(size, stereo, mode, steps, batches, repeats, built)
            + worker_direct_graph(size, stereo, mode, steps, batches, repeats, built))


def mlx_model(size: str, stereo: bool, mode: str) -> Any:
    """Random-weight MusicGen (MLX) of the real shapes; q8 = nn.quantize of the bf16 decoder's
    linears and embeddings (group 64), as the converter does."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten

    from mlx_music.converters.mlx_config import build_mlx_config
    from mlx_music.models.musicgen import MusicGen

    cfg = build_mlx_config(hf_config(size, stereo).to_dict(), "bench")
    model = MusicGen(cfg)
    dtype = {"fp32": mx.float32, "fp16": mx.float16, "bf16": mx.bfloat16, "q8": mx.bfloat16}[mode]
    mx.random.seed(0)
    flat = [(k, (mx.random.normal(v.shape) * (v.shape[-1] ** -0.5 if v.ndim == 2 and "embed" not in k else 1.0)
                 if v.ndim == 2 else v).astype(dtype)) for k, v in tree_flatten(model.decoder.parameters())]
    model.decoder.update(tree_unflatten(flat))
    if mode == "q8":
        nn.quantize(model.decoder, group_size=64, bits=8)
    model.fuse()
    mx.eval(model.decoder.parameters())
    return model


def count_primitives(fn: Any, *args: Any) -> tuple[int, dict[str, int]]:
    """Primitives in the graph of one call of the (compiled) function: its nodes in
    `mx.export_to_dot`, i.e. what the backend evaluates per step."""
    import collections
    import io
    import re

    import mlx.core as mx

    outs = fn(*args)
    buf = io.StringIO()
    mx.export_to_dot(buf, *outs)
    labels = re.findall(r'label ="([^"]+)", shape=rectangle', buf.getvalue())
    return len(labels), dict(collections.Counter(labels).most_common())


def worker_direct_mlx(size: str, stereo: bool, mode: str, steps: int, batches: list[int],
                      repeats: int) -> list[dict[str, Any]]:
    import mlx.core as mx

    from mlx_music.runtime.delay_pattern import build_pattern
    from mlx_music.runtime.sampling import RowSampling, SamplingConfig, row_keys
    from mlx_music.runtime.token_loop import Conditioning, TokenLoop

    model = mlx_model(size, stereo, mode)
    K, ch = (8, 2) if stereo else (4, 1)
    h = model.decoder_args.hidden_size
    out = []
    for b in batches:
        dt = model.decoder.layer_norm.weight.dtype
        st = mx.random.normal((b, 12, h)).astype(dt)
        cond = Conditioning(mx.concatenate([st, mx.zeros_like(st)]),
                            mx.concatenate([mx.ones((b, 12), mx.int32), mx.zeros((b, 12), mx.int32)]))
        pattern = build_pattern(steps - (K // ch - 1), K, ch, 2048, batch=b)
        rs = RowSampling.stack([SamplingConfig(guidance_scale=3.0, top_k=250)] * b, 2048)
        loop = TokenLoop(model, 2 * b, pattern.shape[-1], rs.static)

        def run(seed: int) -> float:
            t0 = time.perf_counter()
            toks = [t for _, t, _ in loop.run(cond, pattern, rs, row_keys(range(seed, seed + b)))]
            mx.eval(toks)
            return time.perf_counter() - t0

        run(0)
        times = [run(1 + i) for i in range(repeats)]
        advance, _ = loop._functions(rs)
        loop.cache.offset = mx.array(0, dtype=mx.int32)
        n, kinds = count_primitives(advance, mx.zeros((2 * b, K, 2048)), mx.full((b, K), -1, dtype=mx.int32),
                                    row_keys(range(b)), *rs.arrays())
        out.append({"engine": "mlx", "mode": mode + (" (bf16)" if mode == "q8" else ""), "batch": b,
                    "times": times, "steps": pattern.shape[-1] - 1, "device": str(mx.default_device()),
                    "primitives": n, "primitive_kinds": kinds, "peak_dev_gb": mx.get_peak_memory() / 2**30})
    return out


def run_worker(spec: list[str], timeout: float, env: str = "", root: Path = ROOT) -> Any:
    """Run one measurement in a child process; its last stdout line is the JSON result.

    ``root``: the source tree whose bench_generate.py (and code) runs the measurement; another
    checkout (``--baseline-src``) times an older revision on the same converted checkpoint.
    ``env``: extra environment variables for the child, "K=V[,K=V]" (an `--mlx-env` value)."""
    extra_env = dict(kv.split("=", 1) for kv in env.split(",") if kv)
    cmd = [sys.executable, str(root / "benchmarks" / "bench_generate.py"), "--worker", *spec]
    try:
        path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))  # keep e.g. --target installs
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root,
                           env={**os.environ, "PYTHONPATH": path, **extra_env})
    except subprocess.TimeoutExpired:
        print(f"[bench] {' '.join(spec[:2])}: timed out after {timeout:.0f} s", flush=True)
        return None
    if p.returncode != 0:
        print(f"[bench] {' '.join(spec[:2])} failed:\n{p.stderr[-3000:]}", flush=True)
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def _with_rates(r: dict[str, Any], steps: int, env: str) -> dict[str, Any]:
    """A worker's result with its best time, steps/s and environment (shown in the mode label)."""
    r["best_s"] = min(r["times"])
    r["steps_per_s"] = steps / r["best_s"]
    r["env"] = env
    if env:
        r["mode"] += f" [{env}]"
    return r


# ----------------------------------------------------------------------------- report
def table(results: list[dict[str, Any]], baseline: float | None) -> str:
    rows = ["| engine | mode | device | steps/s | real-time x | peak mem GB | vs transformers fp32 |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        sps = r["steps_per_s"]
        # GPU: the framework allocator's peak (weights + cache + activations); CPU: process peak RSS.
        on_gpu = r["device"] == "cuda" or "gpu" in r["device"]
        peak = r["peak_dev_gb"] if on_gpu else r["peak_rss_gb"]
        ratio = f"{sps / baseline:.2f}x" if baseline else "-"
        rows.append(f"| {r['engine']} | {r['mode']} | {r['device']} | {sps:.1f} | {sps / FRAME_RATE:.2f} | "
                    f"{peak:.2f} | {ratio} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=tuple(SIZES), default="small")
    ap.add_argument("--stereo", action="store_true")
    ap.add_argument("--steps", type=int, default=250, help="decoder steps (50 = 1 s of audio)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per engine/mode (best is kept)")
    ap.add_argument("--modes", default=None,
                    help="MLX modes, from " + ",".join(MLX_MODES) + " (default: all on GPU; fp32 on CPU, "
                    "where MLX has no fast fp16/bf16/quantized CPU kernels)")
    ap.add_argument("--hf-modes", default=None,
                    help="transformers dtypes (default: fp32,bf16 on CPU, fp32 on GPU); '' skips")
    ap.add_argument("--q-dtype", choices=("fp32", "fp16", "bf16"), default=None,
                    help="float dtype of q8/q4 checkpoints (default: fp32 on CPU, bf16 on GPU)")
    ap.add_argument("--mlx-env", action="append", default=None, metavar="K=V[,K=V]",
                    help="run every MLX mode once per given environment (e.g. MLX_MAX_OPS_PER_BUFFER=200); "
                         "repeatable; '' = as inherited")
    ap.add_argument("--baseline-src", default=None, metavar="DIR",
                    help="another checkout (e.g. `git worktree add /tmp/base REV`): its MLX worker is timed "
                         "on the same checkpoints, alternating with ours; the table gains a vs-baseline column")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    ap.add_argument("--json", default=None, help="write all results to this file")
    ap.add_argument("--batch", default="1", help="batch sizes (prompts; CFG doubles the rows), e.g. 1,4,16; "
                    "--direct runs them all, the hub path the first")
    ap.add_argument("--direct", action="store_true",
                    help="build random-weight models in memory (no hub folder, no conversion) and time "
                         "every --batch with one model load; adds the torch CUDA-graph reference "
                         "(--graph-modes) and the primitive count of MLX's compiled step")
    ap.add_argument("--graph-modes", default=None, help="--direct: torch CUDA-graph dtypes (default fp16 on "
                    "GPU, none on CPU)")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.worker:  # child process: one measurement, JSON on the last stdout line
        _reset_peak_rss()
        if a.worker[0].startswith("direct-"):
            engine, size, stereo, mode, steps, batches, repeats = a.worker
            fn = {"direct-hf": worker_direct_hf, "direct-graph": worker_direct_graph,
                  "direct-hf+graph": worker_direct_hf_graph, "direct-mlx": worker_direct_mlx}[engine]
            print(json.dumps(fn(size, stereo == "1", mode, int(steps), [int(x) for x in batches.split(",")],
                                int(repeats))))
            return
        engine, mode, folder, steps, repeats, seed, channels, codebooks = a.worker
        if engine == "hf":
            res = worker_hf(Path(folder), mode, int(steps), int(repeats), int(seed))
        else:
            res = worker_mlx(Path(folder), mode, int(steps), int(repeats), int(seed), int(channels),
                             int(codebooks))
        print(json.dumps(res))
        return

    if a.direct:
        return main_direct(a)
    import torch  # only the parent builds models; the workers import what their engine needs

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    hf_modes = [m for m in (a.hf_modes if a.hf_modes is not None else ("fp32" if gpu else "fp32,bf16")).split(",") if m]
    modes = [m for m in (a.modes if a.modes is not None else (",".join(MLX_MODES) if gpu else "fp32")).split(",") if m]
    q_dtype = a.q_dtype or ("bf16" if gpu else "fp32")
    bad = [m for m in modes if m not in MLX_MODES] + [m for m in hf_modes if m not in HF_MODES]
    if bad:
        ap.error(f"unknown mode(s): {bad}")
    channels = 2 if a.stereo else 1
    codebooks = 8 if a.stereo else 4

    t0 = time.perf_counter()
    src = build_hub_model(a.size, a.stereo, device)
    del torch
    folders = {m: convert_mode(src, a.size, a.stereo, m, q_dtype) for m in modes}
    print(f"[bench] models ready in {time.perf_counter() - t0:.0f} s", flush=True)

    results: list[dict[str, Any]] = []
    envs = a.mlx_env if a.mlx_env else [""]
    jobs = [("hf", m, src, "", ROOT) for m in hf_modes]
    for m in modes:
        for e in envs:
            jobs.append(("mlx", m, folders[m], e, ROOT))
            if a.baseline_src:
                jobs.append(("mlx", m, folders[m], e, Path(a.baseline_src).resolve()))
    for engine, mode, folder, env, root in jobs:
        spec = [engine, mode, str(folder), str(a.steps), str(a.repeats), str(a.seed), str(channels),
                str(codebooks)]
        r = run_worker(spec, a.timeout, env, root)
        if r is None:
            continue
        if root != ROOT:
            r["engine"] = "mlx (baseline)"
        if engine == "mlx" and mode.startswith("q"):
            r["mode"] = f"{mode} ({q_dtype})"
        results.append(_with_rates(r, a.steps, env))
        prof = f"; sync step {r['sync_step_ms']:.2f} ms, sampling {r['sample_ms']:.2f} ms" if "sync_step_ms" in r else ""
        print(f"[bench] {engine} {r['mode']}: {r['steps_per_s']:.1f} steps/s = {1e3 / r['steps_per_s']:.2f} ms/step "
              f"(runs {', '.join(f'{t:.2f}' for t in r['times'])} s{prof})", flush=True)

    base = next((r["steps_per_s"] for r in results if r["engine"] == "transformers" and r["mode"] == "fp32"), None)
    for r in results:
        r["vs_hf_fp32"] = r["steps_per_s"] / base if base else None
    if a.baseline_src:
        for r in results:
            ref = next((b for b in results if b["engine"] == "mlx (baseline)" and b["mode"] == r["mode"]), None)
            if r["engine"] == "mlx" and ref:
                print(f"[bench] mlx {r['mode']} vs baseline {a.baseline_src}: "
                      f"{r['steps_per_s'] / ref['steps_per_s']:.2f}x", flush=True)
    title = (f"{'stereo-' if a.stereo else ''}{a.size} (decoder {'/'.join(map(str, SIZES[a.size]))}), "
             f"{a.steps} steps, CFG 3.0, top-k 250, sampling; batch 1 (2 rows with CFG)")
    print("\n" + title)
    print(table(results, base))
    if a.json:
        meta = {"size": a.size, "stereo": a.stereo, "steps": a.steps, "repeats": a.repeats,
                "q_dtype": q_dtype, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host_cpus": os.cpu_count(),
                "timed": "text encoding + prefill + token loop; EnCodec decode excluded"}
        Path(a.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))


def main_direct(a: argparse.Namespace) -> None:
    """--direct. On a Mac (no torch CUDA; MLX on Metal) the defaults are transformers fp32 on the
    CPU/MPS-less torch and MLX fp32,bf16,q8 on the Apple GPU:
        python benchmarks/bench_generate.py --direct --size small --batch 1,4,16"""
    try:
        import torch

        gpu = torch.cuda.is_available()
        del torch
    except ImportError:  # MLX-only install: time MLX alone
        gpu, a.hf_modes, a.graph_modes = False, a.hf_modes or "", a.graph_modes or ""
    import mlx.core as mx

    mlx_gpu = mx.default_device() == mx.gpu  # CUDA or Metal
    hf_modes = [m for m in (a.hf_modes if a.hf_modes is not None else ("fp32,fp16" if gpu else "fp32")).split(",") if m]
    graph_modes = [m for m in (a.graph_modes if a.graph_modes is not None else ("fp16" if gpu else "")).split(",") if m]
    modes = [m for m in (a.modes if a.modes is not None else ("fp32,bf16,q8" if mlx_gpu else "fp32")).split(",") if m]
    batches = [int(x) for x in a.batch.split(",")]
    results: list[dict[str, Any]] = []
    # A dtype timed by both torch engines builds its model once.
    jobs = ([("direct-hf+graph" if m in graph_modes else "direct-hf", m) for m in hf_modes]
            + [("direct-graph", m) for m in graph_modes if m not in hf_modes] + [("direct-mlx", m) for m in modes])
    envs = a.mlx_env if a.mlx_env else [""]
    for engine, mode in jobs:
        for env in (envs if engine == "direct-mlx" else [""]):
            spec = [engine, a.size, "1" if a.stereo else "0", mode, str(a.steps), a.batch, str(a.repeats)]
            for r in run_worker(spec, a.timeout, env) or []:
                r = _with_rates(r, r["steps"], env)
                r["audio_s_per_s"] = r["batch"] * r["steps_per_s"] / FRAME_RATE
                results.append(r)
                prims = f", {r['primitives']} primitives/step" if "primitives" in r else ""
                print(f"[bench] {a.size}{' stereo' if a.stereo else ''} {r['engine']} {r['mode']} batch {r['batch']}: "
                      f"{r['steps_per_s']:.1f} steps/s, {r['audio_s_per_s']:.1f} audio s/s{prims}", flush=True)
            if a.json:
                Path(a.json).write_text(json.dumps({"meta": {"size": a.size, "stereo": a.stereo, "steps": a.steps,
                                                             "batches": batches, "repeats": a.repeats},
                                                    "results": results}, indent=2))
    print(direct_table(results, batches, f"{'stereo-' if a.stereo else ''}{a.size}"))


def direct_table(results: list[dict[str, Any]], batches: list[int], name: str) -> str:
    """One row per engine/mode: steps/s per batch, audio s/s at the largest batch, primitives/step."""
    rows = [f"| model | engine | mode | " + " | ".join(f"batch {b} steps/s" for b in batches)
            + f" | batch {batches[-1]} audio s/s | primitives/step (batch 1) |",
            "| --- | --- | --- | " + " | ".join("---:" for _ in batches) + " | ---: | ---: |"]
    keys = list(dict.fromkeys((r["engine"], r["mode"]) for r in results))
    for eng, mode in keys:
        rs = {r["batch"]: r for r in results if (r["engine"], r["mode"]) == (eng, mode)}
        cells = [f"{rs[b]['steps_per_s']:.1f}" if b in rs else "-" for b in batches]
        last = rs.get(batches[-1])
        prim = rs[batches[0]].get("primitives", "-") if batches[0] in rs else "-"
        rows.append(f"| {name} | {eng} | {mode} | " + " | ".join(cells)
                    + f" | {last['audio_s_per_s']:.1f} | {prim} |" if last else " | - | - |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
