"""Quantized checkpoints: load + generate, fidelity against fp32, broken files, skipped modules.

The fixtures here are tiny models with decoder width 64 and 4 layers (the shared fixtures are
width 32): both group sizes 32 and 64 then divide every input size, and with 4 layers the
mixed-4-8 recipe (layers 0 and last + heads at 8 bits) really differs from plain q8.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from generation_helpers import gen  # noqa: E402
import tiny_models
from mlx_music.converters.convert import QuantizeOptions, convert_checkpoint

QUANT: dict[str, QuantizeOptions] = {
    "q8-g32": QuantizeOptions(8, 32),
    "q8-g64": QuantizeOptions(8, 64),
    "q4-g32": QuantizeOptions(4, 32),
    "q4-g64": QuantizeOptions(4, 64),
    "mixed-4-8": QuantizeOptions(4, 64, "mixed-4-8"),
}
LAYERS = 4


@pytest.fixture(scope="module")
def q_folder(tmp_path_factory):
    """(arch, name) -> MLX folder; name in QUANT, "fp32" or "fp16"; "hf" gives the source folder."""
    root = tmp_path_factory.mktemp("quant")
    cache: dict = {}

    def get(arch: str, name: str) -> Path:
        if (arch, "hf") not in cache:
            model = tiny_models.build_model(arch, hidden_size=64, num_hidden_layers=LAYERS)
            cache[(arch, "hf")] = tiny_models.write_hub_folder(model, root / f"hf-{arch}")
        if (arch, name) not in cache:
            out = root / f"{arch}-{name}"
            convert_checkpoint(cache[(arch, "hf")], out, dtype="float16" if name == "fp16" else "float32",
                               quantize=QUANT.get(name), progress=False)
            cache[(arch, name)] = out
        return cache[(arch, name)]

    return get


def _module(model: nn.Module, path: str) -> nn.Module:
    m = model
    for part in path.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


@pytest.mark.parametrize("arch", ["mono", "stereo"])
@pytest.mark.parametrize("name", list(QUANT))
def test_quantized_loads_and_generates(q_folder, arch: str, name: str) -> None:
    from mlx_music.runtime import load

    folder = q_folder(arch, name)
    opts = QUANT[name]
    cfg = json.loads((folder / "config.json").read_text())
    q = cfg["quantization"]
    assert (q["bits"], q["group_size"], q["recipe"]) == (opts.bits, opts.group_size, opts.recipe)
    k = 8 if arch == "stereo" else 4
    # Every decoder projection (4 self-attn + 4 cross-attn + 2 ffn per layer) and every head.
    assert len(q["modules"]) == 10 * LAYERS + k and q["skipped"] == []
    high = {m for m, b in q["modules"].items() if b == 8}
    if opts.recipe:
        last = LAYERS - 1
        assert high == {m for m in q["modules"] if m.startswith(("decoder.lm_heads.", "decoder.layers.0.",
                                                                   f"decoder.layers.{last}."))}
        assert 0 < len(high) < len(q["modules"])
    else:
        assert len(high) == (len(q["modules"]) if opts.bits == 8 else 0)

    pipe = load(folder)
    pipe.model.unfuse()  # the checkpoint's module tree, where the recorded paths live
    for path, bits in q["modules"].items():
        m = _module(pipe.model, path)
        assert isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)), path
        assert (m.bits, m.group_size) == (bits, opts.group_size), path
    pipe.model.fuse()
    # Text encoder and EnCodec are never quantized.
    assert isinstance(pipe.model.text_encoder.blocks[0].attn.q, nn.Linear)
    assert not isinstance(pipe.model.text_encoder.blocks[0].attn.q, nn.QuantizedLinear)

    audio, sr, _ = gen(pipe, ["calm piano jazz", "loud rock"], duration=0.1, seed=0)
    assert sr == 32000 and audio.dtype == np.float32
    assert audio.shape == (2, 2 if arch == "stereo" else 1, 5 * 640)
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0


def test_fidelity_mono(q_folder) -> None:
    """The measured numbers, and what they must satisfy (see the module docstring of runtime/fidelity).

    Targets for real checkpoints are q8 ≥ 0.98 and q4 ≥ 0.90 top-1 agreement. On this tiny random
    model q8 meets its target (≈0.983-0.986) but q4 does not (≈0.75-0.76): every weight is an i.i.d. Gaussian, so
    4-bit rounding (≈9% relative error per matrix) perturbs every logit in proportion, and the
    reference's top-1/top-2 margins among 2048 Gaussian logits are small relative to that noise.
    Even fp16 is only ≈0.998, which shows how tight those margins are. So q4 is held to a floor far
    above chance (1/2048) and to orderings that must hold for any model: more bits / smaller groups
    / the mixed recipe are closer to fp32, in KL and in top-1.
    """
    from mlx_music.eval.fidelity import fidelity_reports

    names = ["fp16", *QUANT]
    reps = dict(zip(names, fidelity_reports([q_folder("mono", n) for n in names], q_folder("mono", "fp32"))))
    for n, r in reps.items():
        print(f"\n{n}: top1 {r.top1:.4f} (worst codebook {r.worst_top1:.4f}) KL {r.kl_mean:.2e}")
    print(reps["q4-g64"].format_table())

    for r in reps.values():
        assert len(r.codebooks) == 4 and all(c.positions == 4 * 4 * 50 for c in r.codebooks)
        assert r.ref_entropy < 2.0  # peaked reference: top-1 agreement is meaningful
    assert reps["fp16"].top1 >= 0.995 and reps["fp16"].kl_mean < 1e-4
    for n in ("q8-g32", "q8-g64"):
        assert reps[n].passes(0.98), (n, reps[n].top1)
        assert reps[n].kl_mean < 2e-3
    for n in ("q4-g32", "q4-g64"):
        assert 0.70 <= reps[n].top1 < reps["q8-g64"].top1, (n, reps[n].top1)
        assert reps[n].kl_mean > 50 * reps["q8-g64"].kl_mean
        assert not reps[n].passes(0.90)  # documents that the q4 target is not reached here
    assert reps["q4-g32"].kl_mean < reps["q4-g64"].kl_mean  # finer groups, smaller error
    # mixed-4-8 sits between q4 and q8 (same group size 64).
    assert reps["q4-g64"].kl_mean > reps["mixed-4-8"].kl_mean > reps["q8-g64"].kl_mean
    assert reps["q4-g64"].top1 < reps["mixed-4-8"].top1 < reps["q8-g64"].top1
    assert reps["fp16"].kl_mean < reps["q8-g64"].kl_mean


def test_fidelity_stereo_and_guidance(q_folder) -> None:
    from mlx_music.eval.fidelity import fidelity_reports

    ref = q_folder("stereo", "fp32")
    prompts = ["80s pop with synths", "calm piano jazz"]
    q8, q4 = fidelity_reports([q_folder("stereo", "q8-g64"), q_folder("stereo", "q4-g64")], ref,
                              prompts=prompts, num_sequences=4, length=30)
    assert len(q8.codebooks) == 8 and q8.codebooks[0].positions == 2 * 4 * 30
    assert q8.passes(0.98) and q8.top1 > q4.top1 and q8.kl_mean < q4.kl_mean
    # With classifier-free guidance (what sampling uses) differences are amplified, not hidden.
    g8, g4 = fidelity_reports([q_folder("stereo", "q8-g64"), q_folder("stereo", "q4-g64")], ref,
                              prompts=prompts, num_sequences=4, length=30, guidance_scale=3.0)
    assert g8.guidance_scale == 3.0 and g8.kl_mean < g4.kl_mean and g8.kl_mean > q8.kl_mean


def test_fidelity_report_api(q_folder, tmp_path: Path) -> None:
    from mlx_music.eval.fidelity import fidelity_report

    fp32 = q_folder("mono", "fp32")
    same = fidelity_report(fp32, fp32, prompts=["calm piano"], num_sequences=2, length=10)
    assert not same.dequantized and same.top1 == 1.0 and same.kl_mean == 0.0 and same.passes(1.0, max_kl=0.0)
    # Reference given as the transformers folder: converted to fp32 on the fly, identical weights.
    via_hf = fidelity_report(fp32, q_folder("mono", "hf"), prompts=["calm piano"], num_sequences=2, length=10)
    assert via_hf.top1 == 1.0 and via_hf.kl_mean < 1e-6 and via_hf.reference_label == "float32"

    q4 = fidelity_report(q_folder("mono", "q4-g64"), fp32, num_sequences=2, length=10, seed=1)
    d = json.loads(q4.to_json())
    assert d["model_label"] == "q4 g64" and d["seed"] == 1
    assert d["overall"]["top1"] == pytest.approx(q4.top1) and len(d["codebooks"]) == 4
    table = q4.format_table()
    assert "q4 g64 vs float32" in table and table.count("\n") == 3 + 4 + 1
    assert q4.passes(0.0) and not q4.passes(0.0, max_kl=0.0)
    assert q4.passes(q4.top1) and not q4.passes(q4.worst_top1 + 1e-9, per_codebook=True)
    # Dequantized float weights give the kernels' numbers up to round-off (the fast CPU path).
    deq = fidelity_report(q_folder("mono", "q4-g64"), fp32, num_sequences=2, length=10, seed=1, dequantize=True)
    assert deq.dequantized and "dequantized weights" in deq.format_table()
    assert abs(deq.top1 - q4.top1) <= 0.01 and deq.kl_mean == pytest.approx(q4.kl_mean, rel=1e-3)
    # Same seed, same numbers: the inputs are fixed.
    again = fidelity_report(q_folder("mono", "q4-g64"), fp32, num_sequences=2, length=10, seed=1)
    assert again.to_dict() == q4.to_dict()

    with pytest.raises(ValueError, match="num_codebooks|audio_channels"):
        fidelity_report(q_folder("stereo", "q8-g64"), fp32, num_sequences=1, length=4)


def _rewrite_without(folder: Path, key: str) -> None:
    """Drop `key` from its shard and the index, and refresh the conversion record, so the only
    thing wrong with the checkpoint is the missing tensor."""
    from mlx_music.converters.convert import _sha256

    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = folder / index["weight_map"].pop(key)
    tensors = mx.load(str(shard))
    del tensors[key]
    mx.save_safetensors(str(shard), tensors, metadata={"format": "mlx"})
    index_path.write_text(json.dumps(index))
    rec_path = folder / "conversion.json"
    rec = json.loads(rec_path.read_text())
    rec["files"][shard.name] = {"sha256": _sha256(shard), "size": shard.stat().st_size}
    rec_path.write_text(json.dumps(rec))


def test_missing_scales_names_key(q_folder, tmp_path: Path) -> None:
    from mlx_music.runtime import load
    from mlx_music.runtime.loader import CheckpointError

    broken = tmp_path / "broken"
    shutil.copytree(q_folder("mono", "q4-g64"), broken)
    key = "decoder.layers.1.fc1.scales"
    _rewrite_without(broken, key)
    with pytest.raises(CheckpointError, match=r"missing key.*" + key.replace(".", r"\.")):
        load(broken)

    # Without refreshing the record the truncated shard is caught first, by file name.
    stale = tmp_path / "stale"
    shutil.copytree(q_folder("mono", "q4-g64"), stale)
    rec = json.loads((stale / "conversion.json").read_text())
    _rewrite_without(stale, "decoder.lm_heads.0.scales")
    (stale / "conversion.json").write_text(json.dumps(rec))
    with pytest.raises(CheckpointError, match=r"model-00001-of-00001\.safetensors.*size"):
        load(stale)


def test_skipped_modules_listed(mlx_folder, hf_folder, tmp_path: Path) -> None:
    """Shared fixture (decoder width 32): group size 64 does not divide the projections' input
    size, so only fc2 (input 128) is quantized; the rest are listed as skipped and stay float."""
    from mlx_music.runtime import load

    out = tmp_path / "mono-q4-g64"
    res = convert_checkpoint(hf_folder("mono"), out, quantize=QuantizeOptions(4, 64), progress=False)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert sorted(q["modules"]) == res.quantized == ["decoder.layers.0.fc2", "decoder.layers.1.fc2"]
    assert q["skipped"] == res.skipped
    # 2 layers x (8 attention + fc1) + 4 heads, all with input size 32.
    assert len(res.skipped) == 2 * 9 + 4
    assert all("input size 32 not divisible by group size 64" in s for s in res.skipped)
    assert any(s.startswith("decoder.lm_heads.3 ") for s in res.skipped)

    pipe = load(out)
    assert isinstance(pipe.model.decoder.layers[0].fc2, nn.QuantizedLinear)
    pipe.model.unfuse()
    for path in (s.split(" ")[0] for s in res.skipped):
        m = _module(pipe.model, path)
        assert not isinstance(m, nn.QuantizedLinear) and m.weight.dtype == mx.float32, path
    pipe.model.fuse()
    audio, _, _ = gen(pipe, ["calm piano"], duration=0.1, seed=0)
    assert audio.shape == (1, 1, 3200)


def test_fidelity_module_is_torch_free() -> None:
    code = ("import sys, mlx_music.eval.fidelity; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
