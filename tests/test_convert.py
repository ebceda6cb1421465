"""Converter: every architecture x hub layout, tensor-by-tensor numeric checks, completeness,
safety and atomic output."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from mlx_music.converters.convert import QuantizeOptions, convert_checkpoint
from mlx_music.converters.errors import CompletenessError, ManifestError, OutputError, SourceError
from mlx_music.converters.manifest import detect_variant, load_manifest, variant_names
from mlx_music.converters.mlx_config import expected_shapes

import tiny_models

ARCHS = tiny_models.ARCHS
LAYOUTS = tiny_models.LAYOUTS


def load_mlx_weights(folder: Path) -> dict[str, np.ndarray]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(folder / shard)))
    assert set(out) == set(index["weight_map"])
    return out


def reference_tensor(model, key: str) -> np.ndarray:
    """What an MLX key must hold, computed from the live transformers modules (independently of
    the manifest's rules: weight norm comes from torch's parametrization)."""
    m = re.match(r"text_encoder\.blocks\.(\d+)\.(.+)$", key)
    t5 = model.text_encoder
    if key == "text_encoder.embed_tokens.weight":
        t = t5.shared.weight
    elif key == "text_encoder.relative_attention_bias.weight":
        t = t5.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    elif key == "text_encoder.final_norm.weight":
        t = t5.encoder.final_layer_norm.weight
    elif m:
        blk = t5.encoder.block[int(m.group(1))]
        rest = m.group(2)
        t = {"attn_norm.weight": blk.layer[0].layer_norm.weight,
             "ffn_norm.weight": blk.layer[1].layer_norm.weight,
             "ffn.wi.weight": blk.layer[1].DenseReluDense.wi.weight,
             "ffn.wo.weight": blk.layer[1].DenseReluDense.wo.weight}.get(rest)
        if t is None:
            t = getattr(blk.layer[0].SelfAttention, rest.split(".")[1]).weight
    elif key.startswith("decoder.lm_heads."):
        t = model.decoder.lm_heads[int(key.split(".")[2])].weight
    elif key.startswith("decoder."):
        t = model.decoder.model.decoder.get_parameter(key[len("decoder."):])
    elif key.startswith(("enc_to_dec_proj", "audio_enc_to_dec_proj")):
        t = model.get_parameter(key)
    elif ".lstm.layers." in key:
        mod_path, i, name = re.match(r"(.+\.lstm)\.layers\.(\d+)\.(\w+)$", key).groups()
        lstm = model.get_submodule(mod_path)
        t = {"Wx": getattr(lstm, f"weight_ih_l{i}"), "Wh": getattr(lstm, f"weight_hh_l{i}"),
             "bias": getattr(lstm, f"bias_ih_l{i}") + getattr(lstm, f"bias_hh_l{i}")}[name]
    elif key.endswith("codebook.embed"):
        t = model.get_buffer(key)
    elif key.endswith(".conv.weight"):
        conv = model.get_submodule(key[: -len(".weight")])
        w = conv.weight  # the parametrization fuses g and v
        t = w.permute(1, 2, 0) if isinstance(conv, torch.nn.ConvTranspose1d) else w.permute(0, 2, 1)
    elif key.endswith(".conv.bias"):
        t = model.get_parameter(key)
    else:
        raise KeyError(key)
    return t.detach().float().numpy()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_tensor_matches_source(arch, layout, hf_models, hf_folder, tmp_path):
    # bin layouts use the legacy weight_g/weight_v spelling, and sharded ones drop the tied copy,
    # so every spelling is covered across the matrix.
    wn = "legacy" if layout.startswith("bin") else "new"
    tied = layout in ("single", "bin")
    src = hf_folder(arch, layout, wn, tied)
    res = convert_checkpoint(src, tmp_path / "out", progress=False)
    cfg = json.loads((tmp_path / "out/config.json").read_text())
    weights = load_mlx_weights(tmp_path / "out")
    assert set(weights) == set(expected_shapes(cfg))
    assert res.num_tensors == len(weights)
    model = hf_models(arch)
    for key, arr in weights.items():
        ref = reference_tensor(model, key)
        assert arr.shape == ref.shape, key
        np.testing.assert_allclose(arr, ref, rtol=1e-6, atol=1e-6, err_msg=key)
    # The config carries what the runtime needs; no HF config parsing later.
    assert cfg["audio_channels"] == (2 if arch.startswith("stereo") else 1)
    assert cfg["num_codebooks"] == (8 if arch.startswith("stereo") else 4)
    assert cfg["decoder"]["cross_attention"] is (not arch.endswith("melody"))
    assert (cfg["melody"] is not None) == arch.endswith("melody")
    record = json.loads((tmp_path / "out/conversion.json").read_text())
    for name, meta in record["files"].items():
        assert (tmp_path / "out" / name).stat().st_size == meta["size"]


def test_tensor_counts_per_architecture(mlx_folder):
    counts = {arch: len(load_mlx_weights(mlx_folder(arch))) for arch in ARCHS}
    # stereo adds 4 embeddings + 4 heads; melody drops 2 layers x (4 cross-attn + 2 norm) and adds 2
    assert counts["stereo"] - counts["mono"] == 8
    assert counts["mono"] - counts["melody"] == 2 * 6 - 2
    assert counts["stereo-melody"] - counts["melody"] == 8


def test_sha256_in_record_matches_files(mlx_folder):
    import hashlib

    folder = mlx_folder("stereo")
    record = json.loads((folder / "conversion.json").read_text())
    assert set(record["files"]) == {p.name for p in folder.iterdir()} - {"conversion.json"}
    for name, meta in record["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == meta["sha256"], name


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_policy(dtype, hf_folder, hf_models, tmp_path):
    import mlx.core as mx

    convert_checkpoint(hf_folder("mono"), tmp_path / "o", dtype=dtype, progress=False)
    index = json.loads((tmp_path / "o/model.safetensors.index.json").read_text())
    weights = {}
    for shard in set(index["weight_map"].values()):
        weights.update(mx.load(str(tmp_path / "o" / shard)))
    want = {"float16": mx.float16, "bfloat16": mx.bfloat16}[dtype]
    model = hf_models("mono")
    for key, arr in weights.items():
        keep32 = key.startswith(("text_encoder.", "audio_encoder.", "enc_to_dec_proj")) or key.endswith(".bias") \
            or "layer_norm" in key
        assert arr.dtype == (mx.float32 if keep32 else want), key
    key = "decoder.layers.0.fc1.weight"
    ref = torch.from_numpy(reference_tensor(model, key)).to(getattr(torch, dtype)).float().numpy()
    np.testing.assert_array_equal(np.array(weights[key].astype(mx.float32)), ref)


def test_max_shard_size_splits_output(hf_folder, tmp_path):
    res = convert_checkpoint(hf_folder("stereo"), tmp_path / "o", max_shard_size="1MB", progress=False)
    shards = sorted(p.name for p in (tmp_path / "o").glob("model-*.safetensors"))
    assert len(shards) >= 4
    for s in shards:
        assert (tmp_path / "o" / s).stat().st_size < 1e6 + 600_000  # one tensor may overflow a shard
    assert len(load_mlx_weights(tmp_path / "o")) == res.num_tensors


def test_missing_source_tensor_is_named(hf_models, tmp_path):
    sd = tiny_models.hub_state_dict(hf_models("mono"))
    del sd["decoder.model.decoder.layers.1.fc2.weight"]
    src = tmp_path / "src"
    tiny_models.write_hub_folder(hf_models("mono"), src)
    tiny_models.write_state_dict(sd, src, "single")
    with pytest.raises(CompletenessError, match=r"missing tensors: decoder\.layers\.1\.fc2\.weight"):
        convert_checkpoint(src, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_unexpected_source_tensor_is_named(hf_models, tmp_path):
    sd = tiny_models.hub_state_dict(hf_models("mono"))
    sd["decoder.model.decoder.layers.0.mystery.weight"] = torch.zeros(3)
    src = tmp_path / "src"
    tiny_models.write_hub_folder(hf_models("mono"), src)
    tiny_models.write_state_dict(sd, src, "single")
    with pytest.raises(CompletenessError, match=r"unexpected tensors: decoder\.layers\.0\.mystery\.weight"):
        convert_checkpoint(src, tmp_path / "o", progress=False)
    sd.pop("decoder.model.decoder.layers.0.mystery.weight")
    sd["something.else"] = torch.zeros(3)
    tiny_models.write_state_dict(sd, src, "single")
    with pytest.raises(CompletenessError, match=r"matched by no rule.*something\.else"):
        convert_checkpoint(src, tmp_path / "o", progress=False)


def test_half_weight_norm_pair_is_named(hf_models, tmp_path):
    sd = tiny_models.hub_state_dict(hf_models("mono"), weight_norm="legacy")
    del sd["audio_encoder.decoder.layers.3.conv.weight_v"]
    src = tmp_path / "src"
    tiny_models.write_hub_folder(hf_models("mono"), src)
    tiny_models.write_state_dict(sd, src, "single")
    with pytest.raises(CompletenessError, match=r"audio_encoder\.decoder\.layers\.3\.conv\.weight.*missing its v"):
        convert_checkpoint(src, tmp_path / "o", progress=False)


def test_wrong_shape_is_named(hf_models, tmp_path):
    sd = tiny_models.hub_state_dict(hf_models("mono"))
    sd["decoder.lm_heads.2.weight"] = torch.zeros(2048, 31)
    src = tmp_path / "src"
    tiny_models.write_hub_folder(hf_models("mono"), src)
    tiny_models.write_state_dict(sd, src, "single")
    with pytest.raises(CompletenessError, match=r"wrong shapes: decoder\.lm_heads\.2\.weight \(2048, 31\) != \(2048, 32\)"):
        convert_checkpoint(src, tmp_path / "o", progress=False)


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(hf_models, tmp_path):
    src = tmp_path / "src"
    tiny_models.write_hub_folder(hf_models("mono"), src, layout="bin")
    marker = tmp_path / "PWNED"
    sd = tiny_models.hub_state_dict(hf_models("mono"))
    sd["evil"] = _Payload(str(marker))
    torch.save(sd, src / "pytorch_model.bin")
    with pytest.raises(SourceError, match=r"pytorch_model\.bin: refused to load"):
        convert_checkpoint(src, tmp_path / "o", progress=False)
    assert not marker.exists()
    # Sanity: the payload is real — unpickling it without weights_only would run it.
    with pytest.raises(Exception):
        torch.load(src / "pytorch_model.bin", weights_only=True)
    assert not marker.exists()


def test_existing_output_needs_force_and_force_replaces(hf_folder, tmp_path):
    out = tmp_path / "o"
    convert_checkpoint(hf_folder("mono"), out, progress=False)
    before = (out / "config.json").read_text()
    with pytest.raises(OutputError, match=r"^mlx_path .*: already exists; pass force=True"):  # the API's parameter
        convert_checkpoint(hf_folder("stereo"), out, progress=False)
    assert (out / "config.json").read_text() == before
    convert_checkpoint(hf_folder("stereo"), out, force=True, progress=False)
    assert json.loads((out / "config.json").read_text())["audio_channels"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no temp or backup left behind


def test_interrupted_conversion_leaves_nothing_complete(hf_folder, tmp_path):
    out = tmp_path / "o"

    def boom(n):
        if n == 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(hf_folder("stereo"), out, progress=False, _after_tensor=boom)
    assert list(tmp_path.iterdir()) == []
    # --force over a good folder, interrupted: the good folder survives intact.
    convert_checkpoint(hf_folder("mono"), out, progress=False)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(hf_folder("stereo"), out, force=True, progress=False, _after_tensor=boom)
    assert json.loads((out / "config.json").read_text())["audio_channels"] == 1
    assert len(load_mlx_weights(out)) > 0


def test_variant_detected_for_every_manifest(tmp_path):
    # Full-size configs (no weights needed): each must detect exactly its own manifest.
    for name in variant_names():
        m = load_manifest(name)
        e = m.expect
        facts = dict(e)
        assert detect_variant(facts).name == name
    assert len(variant_names()) == 10


def test_stereo_manifest_on_mono_checkpoint_names_field(hf_folder, tmp_path):
    with pytest.raises(ManifestError, match=r"audio_channels = 1 but manifest musicgen-stereo-small expects 2"):
        convert_checkpoint(hf_folder("mono"), tmp_path / "o", variant="musicgen-stereo-small", progress=False)
    with pytest.raises(ManifestError, match=r"model_type = 'musicgen' but manifest musicgen-melody expects"):
        convert_checkpoint(hf_folder("mono"), tmp_path / "o", variant="musicgen-melody", progress=False)
    assert not (tmp_path / "o").exists()


def test_manifest_facts_match_known_sizes():
    sizes = {"small": (1024, 24, 16), "medium": (1536, 48, 24), "large": (2048, 48, 32),
             "melody": (1536, 48, 24), "melody-large": (2048, 48, 32)}
    for name in variant_names():
        m = load_manifest(name)
        size = name.replace("musicgen-", "").replace("stereo-", "")
        h, n, heads = sizes[size]
        assert (m.expect["hidden_size"], m.expect["num_layers"], m.expect["num_heads"]) == (h, n, heads)
        assert m.expect["ffn_dim"] == 4 * h
        assert m.expect["num_codebooks"] == (8 if "stereo" in name else 4)
        assert m.expect["audio_channels"] == (2 if "stereo" in name else 1)
        assert m.expect["model_type"] == ("musicgen_melody" if "melody" in name else "musicgen")
        assert m.expect["text_encoder_width"] == 768
        assert m.repo_id == f"facebook/{name}"


def test_quantized_conversion_records_policy(hf_folder, tmp_path):
    res = convert_checkpoint(hf_folder("stereo"), tmp_path / "o", quantize=QuantizeOptions(4, 32, "mixed-4-8"),
                             progress=False)
    cfg = json.loads((tmp_path / "o/config.json").read_text())
    q = cfg["quantization"]
    assert q["modules"]["decoder.lm_heads.0"] == 8 and q["modules"]["decoder.layers.0.fc1"] == 8
    assert q["modules"]["decoder.layers.1.fc1"] == 8  # last layer of a 2-layer model
    assert all(not k.startswith(("text_encoder", "audio_encoder")) for k in q["modules"])
    w = load_mlx_weights(tmp_path / "o")
    assert w["decoder.layers.0.fc1.weight"].dtype == np.uint32
    assert w["decoder.layers.0.fc1.scales"].shape == (128, 1)
    from mlx_music.converters.inspect import inspect_folder

    info = inspect_folder(tmp_path / "o")
    assert info["dtypes"]["U32"] == len(q["modules"]) and not any(info["manifest_diff"].values())
    # group size 128 does not divide the 32-wide inputs: those modules are skipped and listed.
    res = convert_checkpoint(hf_folder("mono"), tmp_path / "o2", quantize=QuantizeOptions(4, 128), progress=False)
    assert any("fc1" in s and "not divisible" in s for s in res.skipped)


def test_cli_convert_and_inspect(hf_folder, tmp_path):
    from click.testing import CliRunner

    from mlx_music.cli import main

    r = CliRunner().invoke(main, ["convert", "--hf-path", str(hf_folder("stereo-melody", "bin-sharded")),
                                  "--mlx-path", str(tmp_path / "o"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "133 tensors" in r.output
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "o"), "--json"])
    info = json.loads(r.output)
    assert info["format"] == "mlx" and info["tensors"] == 133 and info["audio_channels"] == 2
    assert not any(info["manifest_diff"].values())
    r = CliRunner().invoke(main, ["inspect", str(hf_folder("stereo-melody", "bin-sharded")), "--json"])
    info = json.loads(r.output)
    assert info["format"] == "huggingface (bin-sharded)" and info["tensors"] == 178
    r = CliRunner().invoke(main, ["convert", "--hf-path", str(tmp_path / "nope"), "--mlx-path", str(tmp_path / "x")])
    assert r.exit_code == 2 and f"--hf-path folder {tmp_path / 'nope'} does not exist" in r.output


def test_convert_help_documents_every_option():
    from click.testing import CliRunner

    from mlx_music.cli import convert, main

    text = CliRunner().invoke(main, ["convert", "--help"]).output
    for p in convert.params:
        assert p.help, p.name
        assert p.opts[-1] in text



@pytest.mark.parametrize("arch", ARCHS)
def test_expected_shapes_are_the_checkpoint(arch, mlx_folder, hf_folder, tmp_path):
    """expected_shapes (read off the MLX model built for the config) is exactly what the converter
    writes, plain and quantized (packed weights, scales, biases)."""
    from mlx_music.converters.inspect import read_safetensors_header

    def shapes(folder: Path) -> dict[str, tuple[int, ...]]:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        out: dict[str, tuple[int, ...]] = {}
        for shard in set(index["weight_map"].values()):
            out.update({k: tuple(v[1]) for k, v in read_safetensors_header(folder / shard).items()})
        return out

    cfg = json.loads((mlx_folder(arch) / "config.json").read_text())
    assert shapes(mlx_folder(arch)) == expected_shapes(cfg) == expected_shapes(cfg, quantized=True)
    convert_checkpoint(hf_folder(arch), tmp_path / "q", quantize=QuantizeOptions(4, 32), progress=False)
    qcfg = json.loads((tmp_path / "q/config.json").read_text())
    assert qcfg["quantization"]["modules"]
    assert shapes(tmp_path / "q") == expected_shapes(qcfg, quantized=True) != expected_shapes(qcfg)


def test_expected_shapes_of_a_full_size_model_allocate_nothing():
    """A 3.3B-parameter config: the model is built lazily, so only shapes are read."""
    code = (
        "import json, math, resource, sys\n"
        "import mlx.core as mx\n"
        "from mlx_music.converters.mlx_config import build_mlx_config, expected_shapes\n"
        "hf = json.loads(sys.argv[1])\n"
        "cfg = build_mlx_config(hf, 'large')\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "n = sum(math.prod(s) for s in expected_shapes(cfg).values())\n"
        "grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024\n"
        "print(n, grew_mb, mx.get_peak_memory())\n"
    )
    hf = {"model_type": "musicgen",
          "text_encoder": {"vocab_size": 32128, "d_model": 768, "d_kv": 64, "d_ff": 3072, "num_layers": 12,
                           "num_heads": 12},
          "audio_encoder": {"sampling_rate": 32000, "upsampling_ratios": [8, 5, 4, 4], "target_bandwidths": [2.2],
                            "codebook_size": 2048, "num_filters": 64, "hidden_size": 128},
          "decoder": {"vocab_size": 2048, "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32,
                      "ffn_dim": 8192, "num_codebooks": 4}}
    r = subprocess.run([sys.executable, "-c", code, json.dumps(hf)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    n, grew_mb, peak = r.stdout.split()
    assert int(n) > 3e9  # musicgen-large: 3.3B parameters, 13 GB in float32
    assert float(grew_mb) < 200 and int(peak) < 50e6, r.stdout


def test_convert_from_hub_cache_offline(hf_folder, tmp_path):
    """--hf-path as a repo id resolves through a real HF cache layout with HF_HUB_OFFLINE=1."""
    from test_hub import write_cache_repo

    src = hf_folder("stereo", "sharded")
    files = {p.name: p.read_bytes() for p in src.iterdir()}
    commit = "a" * 40
    write_cache_repo(tmp_path / "cache", "acme/tiny-stereo", {commit: files}, {"main": commit})
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "HF_ENDPOINT": "http://127.0.0.1:9"}
    r = subprocess.run([sys.executable, "-m", "mlx_music.cli", "convert", "--hf-path", "acme/tiny-stereo",
                        "--mlx-path", str(tmp_path / "o"), "--quiet"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    record = json.loads((tmp_path / "o/conversion.json").read_text())
    assert record["source"]["repo_id"] == "acme/tiny-stereo" and record["source"]["revision"] == commit
    assert record["source"]["layout"] == "safetensors-sharded"
    r = subprocess.run([sys.executable, "-m", "mlx_music.cli", "convert", "--hf-path", "acme/missing",
                        "--mlx-path", str(tmp_path / "o2"), "--quiet"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "acme/missing@main: not in the local Hugging Face cache" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o2").exists()
