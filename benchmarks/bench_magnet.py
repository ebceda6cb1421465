"""MAGNeT speed: mlx-music against audiocraft 1.3.0's MAGNeT, and MusicGen against MAGNeT, one run.

For each shape (``tiny``: width 64, 2 layers; ``small``: magnet-small's 1024 / 24 layers / 16 heads,
2048 codes), one run:
  1. builds a random-weight MAGNeT LM with audiocraft's own builders (in the audiocraft venv,
     ``--acvenv``) and exports it in audiocraft's layout under benchmarks/.cache/ (reused later),
     with a 10 s segment and the compression stub ``facebook/encodec_32khz``;
  2. converts it with mlx-music's converter;
  3. times, each in its own child process, one untimed warm-up and then ``--repeats`` generations
     of a 10 s clip (the best is reported) at every ``--batches`` size:
       * ``audiocraft``: ``MAGNeT.generate`` (what ``MAGNeT.get_pretrained`` builds: its loader, the
         xformers attention backend, here tests/audiocraft_shims.py's memory_efficient_attention);
       * ``mlx-music``: ``load(...).generate`` of the converted folder;
       * ``musicgen`` (``--musicgen``): the same weights loaded as a MusicGen (MAGNeT's LM has
         MusicGen's weights), generating the same 10 s autoregressively (500 frames + 3 delay steps),
         the speed-up users get from MAGNeT.
Both MAGNeT engines run audiocraft's defaults (sampling, top-p 0.9, temperature 3, CFG 10 -> 1)
with ``--decoding-steps`` passes (default 20,10,10,10 = 50). A MAGNeT clip costs passes x one pass
over the whole clip, so fewer passes (e.g. 1,1,1,1 on a slow CPU) give a per-pass time from which
the table also projects the default 50 passes (``s/clip@50``).

Text encoder and codec, the same on both sides: the tiny T5 of the test HF cache
(tests/data/audiocraft/hf-cache, named t5-base) and a random EnCodec of the real 32 kHz shape
(2048 codes; benchmarks/bench_generate.py's ENCODEC_32K) under ``facebook/encodec_32khz``.

    python benchmarks/bench_magnet.py --shapes tiny --batches 1,8
    python benchmarks/bench_magnet.py --shapes small --batches 1 --decoding-steps 1,1,1,1 --musicgen

Works on CPU and on an NVIDIA GPU (audiocraft on cuda when torch sees one, in float16 as
``get_pretrained`` does; MLX on its default device).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache" / "magnet"
TEST_HF_CACHE = ROOT / "tests" / "data" / "audiocraft" / "hf-cache"
HF_CACHE = CACHE / "hf-cache"  # the test cache, with a full-size random 32 kHz EnCodec (2048 codes)
SECONDS = 10
FRAME_RATE = 50
SHAPES: dict[str, dict[str, int]] = {  # transformer_lm fields
    "tiny": dict(dim=64, num_heads=4, num_layers=2, card=2048),
    "small": dict(dim=1024, num_heads=16, num_layers=24, card=2048),
}
PROMPTS = ["80s pop with synths", "calm piano and drums", "jazz bass and guitar", "happy rock drums",
           "slow ambient strings", "upbeat lofi beat", "sad orchestral piano", "loud electronic bass"]


def bench_hf_cache() -> None:
    """The test HF cache copied, its facebook/encodec_32khz replaced by a full-size random EnCodec."""
    import shutil

    if (HF_CACHE / "done").exists():
        return
    import torch
    from transformers import EncodecConfig, EncodecModel

    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT / "tests"))
    from bench_generate import ENCODEC_32K
    from tiny_models import random_codebooks

    shutil.rmtree(HF_CACHE, ignore_errors=True)
    shutil.copytree(TEST_HF_CACHE, HF_CACHE, symlinks=True)
    snap = next((HF_CACHE / "models--facebook--encodec_32khz" / "snapshots").iterdir())
    for f in snap.iterdir():
        f.unlink()
    torch.manual_seed(0)
    model = EncodecModel(EncodecConfig(**ENCODEC_32K)).eval()
    with torch.no_grad():
        random_codebooks(model)
    model.save_pretrained(snap)
    (HF_CACHE / "done").write_text("ok")


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_CACHE": str(HF_CACHE), "HF_HUB_OFFLINE": "1"}


# ----------------------------------------------------------------------- audiocraft side (acvenv)

def ac_export(shape: str, folder: Path) -> None:
    """Random-weight MAGNeT LM of ``shape`` in audiocraft's export layout (float16 weights)."""
    import torch
    from omegaconf import OmegaConf

    sys.path.insert(0, str(ROOT / "tests"))
    from audiocraft_shims import install_shims

    install_shims()
    from make_magnet_fixtures import magnet_cfg

    from audiocraft.models import builders
    from audiocraft.utils.export import export_pretrained_compression_model

    cfg = magnet_cfg("magnet")
    cfg["dataset"]["segment_duration"] = SECONDS
    cfg["transformer_lm"].update(SHAPES[shape], subcodes_context=5)
    build = json.loads(json.dumps(cfg))
    build["transformer_lm"].update(segment_duration=SECONDS, span_len=3)
    torch.manual_seed(0)
    lm = builders.get_lm_model(OmegaConf.create(build))
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"best_state": {k: v.half() for k, v in lm.state_dict().items()},
                "xp.cfg": OmegaConf.to_yaml(OmegaConf.create(cfg)), "version": "1.3.0", "exported": True},
               folder / "state_dict.bin")
    export_pretrained_compression_model("facebook/encodec_32khz", folder / "compression_state_dict.bin")


def ac_time(folder: Path, batch: int, steps: list[int], repeats: int) -> dict[str, Any]:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from audiocraft_shims import install_shims

    install_shims()
    from audiocraft.models import MAGNeT
    from audiocraft.models.loaders import load_compression_model, load_lm_model_magnet

    device = "cuda" if torch.cuda.is_available() else "cpu"
    codec = load_compression_model(folder, device=device)
    lm = load_lm_model_magnet(folder, compression_model_frame_rate=int(codec.frame_rate), device=device)
    model = MAGNeT(name="bench", compression_model=codec, lm=lm)
    model.set_generation_params(decoding_steps=steps)
    prompts = PROMPTS[:batch]
    best = float("inf")
    for i in range(repeats + 1):  # what MAGNeT.generate does, its two halves timed apart
        torch.manual_seed(i)
        t0 = time.perf_counter()
        attributes, prompt_tokens = model._prepare_tokens_and_attributes(prompts, None)
        tokens = model._generate_tokens(attributes, prompt_tokens, False)
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            best = min(best, time.perf_counter() - t0)
    t0 = time.perf_counter()
    audio = model.generate_audio(tokens[:1])
    if device == "cuda":
        torch.cuda.synchronize()
    return {"lm_seconds": best, "decode_seconds": time.perf_counter() - t0,
            "audio_seconds": audio.shape[-1] / model.sample_rate, "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- mlx side

def mlx_time(folder: Path, batch: int, steps: list[int] | None, repeats: int) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    import mlx_music  # before mlx.core: MKL for MLX's CPU kernels

    from mlx_music.blas import blas_info

    pipe = mlx_music.load(folder)
    prompts = PROMPTS[:batch]
    kwargs = {"decoding_steps": steps} if steps else {}
    best = float("inf")
    for i in range(repeats + 1):  # what generate does, its two halves timed apart
        t0 = time.perf_counter()
        frames = pipe.frames(pipe.requests(prompts, float(SECONDS), seed=i, **kwargs))
        for _ in frames:
            pass
        codes = frames.codes(frames.num_frames)
        if i:
            best = min(best, time.perf_counter() - t0)
    t0 = time.perf_counter()
    audio = pipe.decode_codes(codes[:1, :, :frames.rows[0].frames])
    return {"lm_seconds": best, "decode_seconds": time.perf_counter() - t0,
            "audio_seconds": audio.shape[-1] / pipe.sample_rate, "blas": blas_info()["blas"]}


def as_musicgen(magnet_folder: Path) -> Path:
    """The converted MAGNeT folder seen as a MusicGen checkpoint (same weights, same T5 and codec):
    config.json with model_type musicgen and its sampling defaults; the other files linked."""
    from mlx_music.converters.mlx_config import generation_config

    out = magnet_folder.with_name(magnet_folder.name + "-as-musicgen")
    out.mkdir(exist_ok=True)
    for f in magnet_folder.iterdir():
        if f.name != "config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    cfg = json.loads((magnet_folder / "config.json").read_text())
    cfg["model_type"] = "musicgen"
    cfg.pop("magnet")
    cfg["generation"] = generation_config()
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


# ----------------------------------------------------------------------------- driver

def worker(python: str, args: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    r = subprocess.run([python, __file__, "--worker", *args], capture_output=True, text=True, env=env,
                       timeout=timeout, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"worker {args} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="tiny", help="comma-separated: tiny, small")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--decoding-steps", default="20,10,10,10", help="MAGNeT passes per codebook")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--musicgen", action="store_true", help="also MusicGen (the same weights, autoregressive)")
    ap.add_argument("--acvenv", default="/tmp/acvenv/bin/python", help="python with audiocraft 1.3.0")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json", default=None, help="write the results here too")
    ap.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        kind, folder, batch, steps, repeats = a.worker
        steps_list = [int(s) for s in steps.split(",")] if steps != "-" else None
        fn = {"audiocraft": ac_time, "mlx": mlx_time}[kind]
        print(json.dumps(fn(Path(folder), int(batch), steps_list, int(repeats))))
        return
    steps = [int(s) for s in a.decoding_steps.split(",")]
    passes = sum(steps)
    bench_hf_cache()
    env = _env()
    results = []
    for shape in a.shapes.split(","):
        src = CACHE / f"{shape}-audiocraft"
        if not (src / "state_dict.bin").exists():
            r = subprocess.run([a.acvenv, "-c", f"import sys; sys.argv=['x']; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
                                f"import bench_magnet as b; from pathlib import Path; b.ac_export({shape!r}, Path({str(src)!r}))"],
                               env=env, capture_output=True, text=True, cwd=ROOT)
            if r.returncode:
                raise SystemExit(f"export failed:\n{r.stderr[-3000:]}")
        mlx_dir = CACHE / f"{shape}-mlx"
        if not (mlx_dir / "config.json").exists():
            subprocess.run([sys.executable, "-m", "mlx_music.cli", "convert", "--hf-path", str(src), "--mlx-path",
                            str(mlx_dir), "--quiet", "--force"], env=env, check=True, cwd=ROOT)
        for batch in [int(b) for b in a.batches.split(",")]:
            spec = [str(batch), ",".join(map(str, steps)), str(a.repeats)]
            row = {"shape": shape, "batch": batch, "passes": passes}
            row["audiocraft"] = worker(a.acvenv, ["audiocraft", str(src), *spec], env, a.timeout)
            row["mlx"] = worker(sys.executable, ["mlx", str(mlx_dir), *spec], env, a.timeout)
            if a.musicgen:
                row["musicgen"] = worker(sys.executable, ["mlx", str(as_musicgen(mlx_dir)), str(batch), "-",
                                                          str(a.repeats)], env, a.timeout)
            results.append(row)
            print(table([row], header=len(results) == 1), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


def table(rows: list[dict[str, Any]], header: bool = True) -> str:
    """Per batch of 10 s clips: the LM's seconds (measured, and projected to 50 passes), one clip's
    codec decode, the total (LM + batch x decode), audio s/s, and speed-ups against audiocraft."""
    lines = []
    if header:
        lines += ["| shape | batch | engine | passes | LM s (measured) | LM s @50 | LM audio s/s | vs audiocraft (LM) "
                  "| decode s/clip | total s @50 | audio s/s | vs audiocraft (total) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def projected(r: dict, eng: str) -> tuple[float, float]:
        m = r[eng]
        lm = m["lm_seconds"] if eng == "musicgen" else m["lm_seconds"] / r["passes"] * 50
        return lm, lm + r["batch"] * m["decode_seconds"]

    for r in rows:
        ref_lm, ref_total = projected(r, "audiocraft")
        for eng in ("audiocraft", "mlx", "musicgen"):
            if eng not in r:
                continue
            m, (lm, total) = r[eng], projected(r, eng)
            audio = r["batch"] * m["audio_seconds"]
            name = {"mlx": "mlx-music MAGNeT", "musicgen": "mlx-music MusicGen", "audiocraft": "audiocraft MAGNeT"}[eng]
            passes = "503 steps" if eng == "musicgen" else r["passes"]
            lines.append(f"| {r['shape']} | {r['batch']} | {name} | {passes} | {m['lm_seconds']:.2f} | {lm:.2f} | "
                         f"{audio / lm:.2f} | {ref_lm / lm:.2f}x | {m['decode_seconds']:.2f} | {total:.2f} | "
                         f"{audio / total:.2f} | {ref_total / total:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
