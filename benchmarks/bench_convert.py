"""Converter speed and memory on a full-size musicgen-medium-shaped checkpoint.

Writes once (cached under benchmarks/.cache/) a random musicgen-medium-shaped hub checkpoint
(~8 GB fp32: t5-base, 32 kHz EnCodec, decoder 1536/48/24) twice: as sharded PyTorch `.bin` and as
sharded safetensors. Then, each in its own child process, times and samples the peak RSS of:
  * `cp` of the weight files (the floor: read + write every byte once);
  * our converter, fp32 -> fp16 and fp32 -> q4 (from the .bin and from the safetensors copy);
  * transformers `from_pretrained` + per-tensor save to safetensors (fp16), the naive route.
Peak RSS is the largest sum of RSS over the child and its descendants, sampled every 20 ms; the
anonymous part (RssAnon) is reported too, since RSS also counts touched pages of mmapped inputs.

    python benchmarks/bench_convert.py --json convert.json
    python benchmarks/bench_convert.py --only cp,ours-fp16-bin      # a subset

The source files are read from the page cache when it holds them (this script just wrote them);
each job reads the same files, so the comparison is like for like, but cold-disk numbers differ.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
from bench_generate import ENCODEC_32K, SIZES, T5_BASE  # noqa: E402  (same full-size shapes)

CACHE = HERE / ".cache"
SHARD_BYTES = 2_000_000_000


# ----------------------------------------------------------------------------- source checkpoint
def _config():
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, T5Config

    hidden, layers, heads, ffn = SIZES["medium"]
    dec = MusicgenDecoderConfig(vocab_size=2048, hidden_size=hidden, num_hidden_layers=layers,
                                num_attention_heads=heads, ffn_dim=ffn, max_position_embeddings=2048,
                                num_codebooks=4, audio_channels=1, pad_token_id=2048, bos_token_id=2048)
    return MusicgenConfig(text_encoder=T5Config(**T5_BASE).to_dict(),
                          audio_encoder=EncodecConfig(**ENCODEC_32K).to_dict(), decoder=dec.to_dict())


def build_sources() -> tuple[Path, Path]:
    """(bin folder, safetensors folder); written tensor by tensor so memory stays ~one shard."""
    bin_dir, st_dir = CACHE / "convert-medium-bin", CACHE / "convert-medium-st"
    if (bin_dir / "pytorch_model.bin.index.json").exists() and (st_dir / "model.safetensors.index.json").exists():
        return bin_dir, st_dir
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import EncodecFeatureExtractor, MusicgenForConditionalGeneration

    import tiny_models  # noqa: F401  (tests/ helpers; path added below)

    transformers.logging.set_verbosity_error()
    cfg = _config()
    with torch.device("meta"):  # names, shapes and dtypes only: no 8 GB init
        model = MusicgenForConditionalGeneration(cfg)
    meta = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for folder in (bin_dir, st_dir):
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        cfg.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tiny_models.write_tokenizer(tmp)
        EncodecFeatureExtractor(sampling_rate=32000).to_json_file(str(tmp / "preprocessor_config.json"))
        (tmp / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n# random medium-shaped\n")
    # Group tensors into ~2 GB shards; the same grouping for both formats.
    shards: list[list[str]] = [[]]
    size = 0
    for k, (shape, dtype) in meta.items():
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if size + n > SHARD_BYTES and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    total = sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for s, d in meta.values())
    bin_map, st_map = {}, {}
    for i, keys in enumerate(shards, 1):
        sd = {}
        for k in keys:
            shape, dtype = meta[k]
            t = torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02 if dtype.is_floating_point \
                else torch.zeros(shape, dtype=dtype)
            sd[k] = t.to(dtype)
        bname = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        sname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        torch.save(sd, bin_dir.with_name(bin_dir.name + ".partial") / bname)
        save_file(sd, str(st_dir.with_name(st_dir.name + ".partial") / sname), metadata={"format": "pt"})
        bin_map.update({k: bname for k in keys})
        st_map.update({k: sname for k in keys})
        del sd
    for folder, index, wmap in ((bin_dir, "pytorch_model.bin.index.json", bin_map),
                                (st_dir, "model.safetensors.index.json", st_map)):
        tmp = folder.with_name(folder.name + ".partial")
        (tmp / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wmap}, indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    print(f"[build] {total / 1e9:.2f} GB x 2 formats, {len(shards)} shards, {time.perf_counter() - t0:.0f} s",
          flush=True)
    return bin_dir, st_dir


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".bin", ".safetensors"))


# ----------------------------------------------------------------------------- measurement
def measure(cmd: list[str], cwd: Path = ROOT) -> dict[str, Any]:
    """Wall time and peak RSS (child + descendants, sampled every 20 ms) of one command."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    peak = peak_anon = 0
    stop = threading.Event()

    def anon_bytes(pid: int) -> int:
        # RssAnon: private memory. RSS also counts touched pages of mmapped source shards
        # (page cache, reclaimable), which is most of a streaming converter's RSS.
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    def sample() -> None:
        nonlocal peak, peak_anon
        try:
            p = psutil.Process(proc.pid)
            while not stop.is_set():
                rss = anon = 0
                for q in [p, *p.children(recursive=True)]:
                    try:
                        rss += q.memory_info().rss
                        anon += anon_bytes(q.pid)
                    except (psutil.Error, OSError):
                        pass
                peak, peak_anon = max(peak, rss), max(peak_anon, anon)
                time.sleep(0.02)
        except psutil.Error:
            pass

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    if proc.returncode != 0:
        print(out[-3000:], flush=True)
    return {"wall_s": wall, "peak_rss_gb": peak / 2**30, "peak_anon_gb": peak_anon / 2**30, "rc": proc.returncode}


def _du(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="comma-separated job names (default: all)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    bin_dir, st_dir = build_sources()
    out_root = CACHE / "convert-out"
    py = sys.executable
    conv = ("from mlx_music.converters.convert import convert_checkpoint, QuantizeOptions as Q; import sys; "
            "convert_checkpoint(sys.argv[1], sys.argv[2], dtype='float16', quantize={q}, progress=False)")
    hf = ("import sys, torch, transformers; from safetensors.torch import save_file; "
          "transformers.logging.set_verbosity_error(); "
          "m = transformers.MusicgenForConditionalGeneration.from_pretrained(sys.argv[1], dtype=torch.float16); "
          "import os; os.makedirs(sys.argv[2], exist_ok=True); "
          "sd = m.state_dict(); "
          "[save_file({k: v.contiguous()}, os.path.join(sys.argv[2], f'{i:05d}.safetensors')) for i, (k, v) in enumerate(sd.items())]")
    jobs: dict[str, tuple[list[str], Path]] = {
        "cp-bin": (["cp", *map(str, weight_files(bin_dir)), "{out}"], bin_dir),
        "ours-fp16-bin": ([py, "-c", conv.format(q="None"), str(bin_dir), "{out}"], bin_dir),
        "ours-q4-bin": ([py, "-c", conv.format(q="Q(bits=4)"), str(bin_dir), "{out}"], bin_dir),
        "cp-st": (["cp", *map(str, weight_files(st_dir)), "{out}"], st_dir),
        "ours-fp16-st": ([py, "-c", conv.format(q="None"), str(st_dir), "{out}"], st_dir),
        "ours-q4-st": ([py, "-c", conv.format(q="Q(bits=4)"), str(st_dir), "{out}"], st_dir),
        "transformers-fp16-bin": ([py, "-c", hf, str(bin_dir), "{out}"], bin_dir),
    }
    names = a.only.split(",") if a.only else list(jobs)
    results = []
    for name in names:
        cmd, src = jobs[name]
        out = out_root / name
        shutil.rmtree(out, ignore_errors=True)
        if name.startswith("cp"):
            out.mkdir(parents=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        r = measure([c.replace("{out}", str(out)) for c in cmd])
        r.update(job=name, source_gb=sum(p.stat().st_size for p in weight_files(src)) / 1e9,
                 output_gb=_du(out) if out.exists() else 0.0)
        shutil.rmtree(out, ignore_errors=True)  # disk: keep one output at a time
        results.append(r)
        print(f"[bench] {name}: {r['wall_s']:.1f} s, peak RSS {r['peak_rss_gb']:.2f} GB "
              f"(anonymous {r['peak_anon_gb']:.2f} GB), "
              f"out {r['output_gb']:.2f} GB, rc {r['rc']}", flush=True)
    cp = {"bin": next((r["wall_s"] for r in results if r["job"] == "cp-bin"), None),
          "st": next((r["wall_s"] for r in results if r["job"] == "cp-st"), None)}
    print("\n| job | source GB | output GB | wall s | vs cp | peak RSS GB | peak anon RSS GB |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        base = cp["st" if r["job"].endswith("-st") else "bin"]
        r["vs_cp"] = r["wall_s"] / base if base else None
        ratio = f"{r['vs_cp']:.2f}x" if r["vs_cp"] else "-"
        print(f"| {r['job']} | {r['source_gb']:.2f} | {r['output_gb']:.2f} | {r['wall_s']:.1f} | {ratio} | "
              f"{r['peak_rss_gb']:.2f} | {r['peak_anon_gb']:.2f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(),
                                            "results": results}, indent=2))


if __name__ == "__main__":
    main()
