"""PEFT LoRA adapters (converters/adapters.py, runtime/adapters.py) against transformers + peft.

Adapters are made with peft itself on the tiny transformers models, targeting what the public
MusicGen dreambooth script targets (decoder q/k/v/out_proj, fc1, fc2, lm_heads.K, embed_tokens.K,
enc_to_dec_proj, audio_enc_to_dec_proj), one also targeting T5's q,k,v,o,wi,wo with rsLoRA.
lora_B is random (peft initialises it to zero, which would make every adapter a no-op).

The reference is peft's ``PeftModel.from_pretrained(...).merge_and_unload()`` (through
``run_parity(..., adapter=)``): the merged conversion and the runtime adapter must give identical
greedy tokens and logits within 1e-4. Switching adapters on one loaded base must give each merged
conversion's output, and the base's again after ``set_adapter(None)``.
"""

from __future__ import annotations

import copy
import json
import shutil
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from click.testing import CliRunner  # noqa: E402

import tiny_models  # noqa: E402
from mlx_music.cli import main  # noqa: E402
from mlx_music.converters.adapters import convert_adapter, read_peft_adapter  # noqa: E402
from mlx_music.converters.convert import QuantizeOptions, convert_checkpoint  # noqa: E402
from mlx_music.converters.errors import SourceError  # noqa: E402
from mlx_music.eval.parity import run_parity  # noqa: E402
from mlx_music.runtime import load  # noqa: E402
from mlx_music.runtime.adapters import AdapterError, load_adapter  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")  # torch on one thread (conftest)

STEPS = 8
PROMPTS = ["80s pop with synths", "calm piano"]
T5_TARGETS = ["q", "k", "v", "o", "wi", "wo"]


def dreambooth_targets(num_codebooks: int) -> list[str]:
    return (["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "enc_to_dec_proj", "audio_enc_to_dec_proj"]
            + [f"lm_heads.{k}" for k in range(num_codebooks)] + [f"embed_tokens.{k}" for k in range(num_codebooks)])


def make_peft(model, folder: Path, targets: list[str], seed: int, *, peft_config=None, **lora) -> Path:
    """Save a peft adapter of `model` (left untouched) with random, non-zero LoRA factors."""
    from peft import LoraConfig, get_peft_model

    cfg = peft_config or LoraConfig(target_modules=targets, **{"r": 4, "lora_alpha": 8, **lora})
    pm = get_peft_model(copy.deepcopy(model), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "ia3_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    pm.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def ws(tmp_path_factory, hf_models, hf_folder, mlx_folder):
    """Adapters, their merged conversions and MLX adapters; built once for the module."""
    root = tmp_path_factory.mktemp("adapters")
    mono, melody = hf_models("mono"), hf_models("melody")
    w = {"root": root, "hf": hf_folder("mono"), "base": mlx_folder("mono"),
         "hf_melody": hf_folder("melody"), "base_melody": mlx_folder("melody")}
    w["peft_a"] = make_peft(mono, root / "peft-a", dreambooth_targets(4), seed=1)
    w["peft_b"] = make_peft(mono, root / "peft-b", dreambooth_targets(4) + T5_TARGETS, seed=2,
                            r=8, lora_alpha=4, use_rslora=True)
    w["peft_m"] = make_peft(melody, root / "peft-m", dreambooth_targets(4), seed=3)
    for name, hf, ad in (("a", w["hf"], "peft_a"), ("b", w["hf"], "peft_b"), ("m", w["hf_melody"], "peft_m")):
        w[f"merged_{name}"] = convert_checkpoint(hf, root / f"merged-{name}", adapter=w[ad], progress=False).path
        w[f"mlx_{name}"] = convert_adapter(w[ad], root / f"mlx-{name}")
    return w


# --------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("which", ["a", "b", "m"])
def test_merged_conversion_matches_peft_merge(ws, which):
    hf = ws["hf_melody"] if which == "m" else ws["hf"]
    rep = run_parity(hf, ws[f"merged_{which}"], steps=STEPS, adapter=ws[f"peft_{which}"])
    print(rep.format_table())
    assert rep.ok, rep.format_table()
    logits = rep.row("decoder logits (chroma prefix)" if which == "m" else "decoder logits")
    assert logits.value <= 1e-4
    tokens = rep.row("greedy tokens (no melody)" if which == "m" else "greedy tokens")
    assert tokens.value == 0
    assert any("merged at conversion" in n for n in rep.notes)
    # The adapter changes the model's choices (a zero lora_B would pass parity trivially).
    base = ws["base_melody"] if which == "m" else ws["base"]
    codes = [np.stack(load(f).generate(PROMPTS, duration=0.2, greedy=True).codes)
             for f in (base, ws[f"merged_{which}"])]
    assert not np.array_equal(*codes)


def test_runtime_adapter_matches_peft_merge(ws):
    # The base MLX checkpoint + the rsLoRA adapter (T5 targeted too) applied at run time.
    rep = run_parity(ws["hf"], ws["base"], steps=STEPS, adapter=ws["peft_b"])
    print(rep.format_table())
    assert rep.ok, rep.format_table()
    assert rep.row("decoder logits").value <= 1e-4 and rep.row("greedy tokens").value == 0
    assert rep.row("text conditioning").value <= 1e-4  # T5 + enc_to_dec_proj adapted
    assert any("applied at run time" in n for n in rep.notes)


def test_parity_refuses_a_merge_of_another_adapter(ws):
    from mlx_music.eval.parity import ParityError

    with pytest.raises(ParityError, match=r"^adapter .*peft-b: the checkpoint .*merged-a was merged with another adapter"):
        run_parity(ws["hf"], ws["merged_a"], steps=STEPS, adapter=ws["peft_b"])


def test_parity_cli_adapter(ws):
    import warnings

    with warnings.catch_warnings():  # peft's use of a deprecated transformers name prints no line
        warnings.simplefilter("error", FutureWarning)
        r = CliRunner().invoke(main, ["parity", "--hf-path", str(ws["hf"]), "--mlx-path", str(ws["merged_a"]),
                                      "--adapter", str(ws["peft_a"]), "--steps", str(STEPS), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["ok"] and any("merged at conversion" in n for n in rep["notes"])


# ------------------------------------------------------------------------------ MLX adapter
def test_mlx_adapter_folder(ws):
    folder = ws["mlx_b"]
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapters.safetensors",
                                                         "conversion.json"]
    cfg = json.loads((folder / "adapter_config.json").read_text())
    mods = cfg["modules"]
    # 2 layers x (self q,k,v,out + cross q,k,v,out + fc1, fc2) + 4 heads + 4 embeddings + enc_to_dec_proj
    # + T5: 2 blocks x (q, k, v, o, wi, wo)
    assert len(mods) == 2 * 10 + 4 + 4 + 1 + 2 * 6
    peft_tensors = read_peft_adapter(ws["peft_b"]).modules
    assert set(mods) == set(peft_tensors)
    for name in ("decoder.layers.0.self_attn.q_proj", "decoder.layers.1.encoder_attn.v_proj",
                 "decoder.lm_heads.3", "decoder.embed_tokens.2", "enc_to_dec_proj",
                 "text_encoder.blocks.1.attn.o", "text_encoder.blocks.0.ffn.wi"):
        assert name in mods
    assert mods["decoder.embed_tokens.2"]["kind"] == "embedding"
    assert mods["decoder.embed_tokens.2"]["shape"] == [2049, 32]
    assert mods["text_encoder.blocks.0.ffn.wi"]["shape"] == [32, 16]
    # rsLoRA: alpha / sqrt(r) = 4 / sqrt(8); plain LoRA: alpha / r = 8 / 4
    assert all(m["scale"] == pytest.approx(4 / 8 ** 0.5) for m in mods.values())
    assert all(m["scale"] == 2.0 for m in json.loads((ws["mlx_a"] / "adapter_config.json").read_text())["modules"].values())
    record = json.loads((folder / "conversion.json").read_text())
    assert record["source"]["use_rslora"] is True and record["source"]["num_modules"] == len(mods)
    assert record["files"]["adapters.safetensors"]["size"] == (folder / "adapters.safetensors").stat().st_size
    merged_record = json.loads((ws["merged_b"] / "conversion.json").read_text())
    assert merged_record["adapter"]["num_modules"] == len(mods)


def _logits(pipe, codes):
    ids, mask = pipe.tokenizer(PROMPTS)
    states, m = pipe.model.encode_text(mx.array(ids), mx.array(mask))
    return np.array(pipe.model(mx.array(codes), states, m))


def _outputs(pipe, codes):
    res = pipe.generate(PROMPTS, duration=0.1, greedy=True, guidance_scale=3.0)
    return _logits(pipe, codes), np.stack(res.codes), np.stack(res.audio)


def test_switching_adapters_on_one_loaded_base(ws):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2048, size=(2, 4, 6)).astype(np.int32)
    want = {name: _outputs(load(ws[f"merged_{name}"]), codes) for name in ("a", "b")}
    want["base"] = _outputs(load(ws["base"]), codes)
    # The adapters change what the model does (else nothing here would be tested).
    assert not np.array_equal(want["a"][1], want["base"][1]) and not np.array_equal(want["b"][1], want["base"][1])
    assert not np.array_equal(want["a"][1], want["b"][1])

    pipe = load(ws["base"], adapter=ws["mlx_a"])
    got = {"a1": _outputs(pipe, codes)}
    assert pipe.adapter is not None and pipe.adapter.path == ws["mlx_a"]
    for step, adapter in (("b", ws["mlx_b"]), ("base", None), ("a2", load_adapter(ws["mlx_a"])), ("b2", ws["mlx_b"])):
        pipe.set_adapter(adapter)
        got[step] = _outputs(pipe, codes)
    assert pipe.model.decoder.fused
    for step, name in (("a1", "a"), ("b", "b"), ("base", "base"), ("a2", "a"), ("b2", "b")):
        logits, toks, audio = got[step]
        np.testing.assert_allclose(logits, want[name][0], atol=1e-4, rtol=0, err_msg=step)
        np.testing.assert_array_equal(toks, want[name][1], err_msg=step)
        np.testing.assert_allclose(audio, want[name][2], atol=1e-4, rtol=0, err_msg=step)
    # Exact switching: back to the base is bit-identical, and so is an adapter applied twice.
    np.testing.assert_array_equal(got["base"][0], _outputs(load(ws["base"]), codes)[0])
    np.testing.assert_array_equal(got["a1"][0], got["a2"][0])
    np.testing.assert_array_equal(got["b"][0], got["b2"][0])


def test_generate_cli_adapter_equals_merged(ws, tmp_path):
    runner = CliRunner()
    outs = {}
    for name, args in (("runtime", ["--model", str(ws["base"]), "--adapter", str(ws["mlx_a"])]),
                       ("merged", ["--model", str(ws["merged_a"])])):
        out = tmp_path / f"{name}.wav"
        r = runner.invoke(main, ["generate", *args, "--prompt", "calm piano", "--duration", "0.2", "--greedy",
                                 "--out", str(out), "--quiet"])
        assert r.exit_code == 0, r.output
        outs[name] = sf.read(out, dtype="float32")[0]
    np.testing.assert_allclose(outs["runtime"], outs["merged"], atol=1e-4)


def test_quantized(ws, tmp_path):
    # Merged at conversion, then quantized: works (the merged weights are quantized once).
    q = QuantizeOptions(bits=8, group_size=32)
    res = convert_checkpoint(ws["hf"], tmp_path / "q-merged", adapter=ws["peft_a"], quantize=q, progress=False)
    assert res.quantized and json.loads((res.path / "conversion.json").read_text())["adapter"]
    pipe = load(res.path)
    assert pipe.generate("calm piano", duration=0.1, greedy=True).codes[0].shape == (4, 5)
    # At run time on a quantized base: refused, naming the module and the way out.
    qbase = convert_checkpoint(ws["hf"], tmp_path / "q-base", quantize=q, progress=False).path
    with pytest.raises(AdapterError, match=r"module decoder\.layers\.0\.encoder_attn\.k_proj: quantized \(8-bit\).*convert --adapter"):
        load(qbase, adapter=ws["mlx_a"])


def test_adapter_from_offline_hub_cache(ws, tmp_path, monkeypatch):
    from test_hub import COMMIT_A, write_cache_repo

    cache = tmp_path / "hub"
    files = {n: (ws["peft_a"] / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
    write_cache_repo(cache, "someone/musicgen-lora", {COMMIT_A: files}, {"main": COMMIT_A})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    out = convert_adapter("someone/musicgen-lora", tmp_path / "from-hub")
    a = json.loads((out / "adapter_config.json").read_text())
    assert a["modules"] == json.loads((ws["mlx_a"] / "adapter_config.json").read_text())["modules"]
    assert json.loads((out / "conversion.json").read_text())["source"]["source"] == "someone/musicgen-lora"
    with pytest.raises(SourceError, match=r"^adapter someone/other-lora@main: .*HF_HUB_OFFLINE"):
        read_peft_adapter("someone/other-lora")
    # A converted MLX adapter from the hub cache, applied at load time.
    mlx_files = {n: (ws["mlx_a"] / n).read_bytes()
                 for n in ("adapter_config.json", "adapters.safetensors", "conversion.json")}
    write_cache_repo(cache, "someone/musicgen-lora-mlx", {COMMIT_A: mlx_files}, {"main": COMMIT_A})
    pipe = load(ws["base"], adapter="someone/musicgen-lora-mlx")
    assert pipe.adapter.modules == json.loads(mlx_files["adapter_config.json"])["modules"]
    with pytest.raises(AdapterError, match=r"^adapter someone/nothing-here@main: .*HF_HUB_OFFLINE"):
        load(ws["base"], adapter="someone/nothing-here")


# ------------------------------------------------------------------------------- bad input
def _copy(ws, tmp_path, name="bad", src="peft_a") -> Path:
    return Path(shutil.copytree(ws[src], tmp_path / name))


def _rewrite_config(folder: Path, **changes) -> Path:
    p = folder / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))
    return folder


def _edit_tensors(folder: Path, fn) -> Path:
    from safetensors.numpy import load_file, save_file

    p = folder / "adapter_model.safetensors"
    tensors = load_file(str(p))
    fn(tensors)
    save_file(tensors, str(p))
    return folder


Q = "base_model.model.decoder.model.decoder.layers.0.self_attn.q_proj"


def _bad_cases():
    def missing_weights(ws, t):
        f = _copy(ws, t)
        (f / "adapter_model.safetensors").unlink()
        return f

    def corrupt_config(ws, t):
        f = _copy(ws, t)
        (f / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,')
        return f

    def truncated_weights(ws, t):
        f = _copy(ws, t)
        p = f / "adapter_model.safetensors"
        p.write_bytes(p.read_bytes()[:-100])
        return f

    def ia3(ws, t):
        from peft import IA3Config

        return make_peft(ws["models"]("mono"), t / "ia3", [], 5, peft_config=IA3Config(
            target_modules=["q_proj", "fc1"], feedforward_modules=["fc1"]))

    def dora(ws, t):
        return make_peft(ws["models"]("mono"), t / "dora", ["q_proj", "v_proj"], 6, use_dora=True)

    def unknown_module(ws, t):
        def fn(ts):
            ts[Q.replace("q_proj", "rotary") + ".lora_A.weight"] = ts.pop(Q + ".lora_A.weight")
            ts[Q.replace("q_proj", "rotary") + ".lora_B.weight"] = ts.pop(Q + ".lora_B.weight")
        return _edit_tensors(_copy(ws, t), fn)

    def missing_b(ws, t):
        return _edit_tensors(_copy(ws, t), lambda ts: ts.pop(Q + ".lora_B.weight"))

    def non_lora_tensor(ws, t):
        return _edit_tensors(_copy(ws, t), lambda ts: ts.__setitem__(Q + ".weight", np.zeros((32, 32), np.float32)))

    def nan_values(ws, t):
        def fn(ts):
            ts[Q + ".lora_A.weight"][0, 0] = np.nan
        return _edit_tensors(_copy(ws, t), fn)

    return {
        "missing folder": (lambda ws, t: t / "nope", ["--adapter", "nope"]),
        "missing adapter_model.safetensors": (missing_weights, ["adapter_model.safetensors", "missing"]),
        "corrupt adapter_config.json": (corrupt_config, ["adapter_config.json", "not valid JSON"]),
        "config not an object": (lambda ws, t: _write(_copy(ws, t), "adapter_config.json", "[1]"),
                                 ["adapter_config.json", "JSON object"]),
        "truncated safetensors": (truncated_weights, ["adapter_model.safetensors", "not a valid safetensors"]),
        "unsupported peft_type (IA3)": (ia3, ["peft_type 'IA3'", "only LORA"]),
        "DoRA adapter": (dora, ["module decoder.model.decoder.layers.0.encoder_attn.q_proj", "use_dora=true", "DoRA"]),
        "DoRA flag, plain tensors": (lambda ws, t: _rewrite_config(_copy(ws, t), use_dora=True),
                                     ["adapter_config.json", "use_dora=true", "DoRA"]),
        "DoRA tensors, flag removed": (lambda ws, t: _rewrite_config(dora(ws, t), use_dora=False),
                                       ["q_proj", "DoRA"]),
        "trained biases": (lambda ws, t: _rewrite_config(_copy(ws, t), bias="all"), ["bias='all'"]),
        "modules_to_save": (lambda ws, t: _rewrite_config(_copy(ws, t), modules_to_save=["lm_heads.0"]),
                            ["modules_to_save"]),
        "rank differs from r": (lambda ws, t: _rewrite_config(_copy(ws, t), r=8), ["rank 4", "r=8"]),
        "lora_B missing": (missing_b, ["layers.0.self_attn.q_proj", "lora_B missing"]),
        "module not in MusicGen": (unknown_module, ["layers.0.self_attn.rotary", "not in the model"]),
        "non-LoRA tensor": (non_lora_tensor, ["q_proj.weight", "not a LoRA"]),
        "NaN factors": (nan_values, ["layers.0.self_attn.q_proj", "NaN"]),
    }


def _write(folder: Path, name: str, text: str) -> Path:
    (folder / name).write_text(text)
    return folder


# Cases only the base can refuse: convert --adapter and convert-adapter --base see them, a plain
# convert-adapter cannot (it has no base), and generate --adapter refuses them at load.
BASE_CASES = {"wrong base (shape)": ["layers.0.fc1", "different base"],
              "target module not in the base": ["lm_heads.7", "not in the model"]}


def _one_line_exit2(r, needles):
    assert r.exit_code == 2, f"exit {r.exit_code}: {r.output}"
    assert "Traceback" not in r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _no_output(path: Path):
    assert not path.exists()
    assert not list(path.parent.glob(f".{path.name}.*")), list(path.parent.iterdir())


@pytest.fixture(scope="module")
def bad_ws(ws, hf_models):
    return {**ws, "models": hf_models}


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_adapter_refused(bad_ws, tmp_path, case):
    make, needles = _bad_cases()[case]
    bad = make(bad_ws, tmp_path)
    runner = CliRunner()
    out = tmp_path / "out" / "merged"
    (tmp_path / "out").mkdir()
    r = runner.invoke(main, ["convert", "--hf-path", str(bad_ws["hf"]), "--adapter", str(bad),
                             "--mlx-path", str(out), "--quiet"])
    _one_line_exit2(r, needles)
    _no_output(out)
    out2 = tmp_path / "out" / "mlx-adapter"
    r = runner.invoke(main, ["convert-adapter", str(bad), "--mlx-path", str(out2)])
    _one_line_exit2(r, needles)
    _no_output(out2)


@pytest.mark.parametrize("case", list(BASE_CASES))
def test_adapter_for_another_base_refused(bad_ws, tmp_path, case):
    t = tmp_path
    maker = {"wrong base (shape)": lambda: make_peft(tiny_models.build_model("mono", ffn_dim=64), t / "other",
                                                     ["fc1", "q_proj"], 7),
             "target module not in the base": lambda: make_peft(bad_ws["models"]("stereo"), t / "stereo",
                                                                ["lm_heads.7"], 8)}[case]
    bad, needles = maker(), BASE_CASES[case]
    runner = CliRunner()
    out = t / "merged"
    _one_line_exit2(runner.invoke(main, ["convert", "--hf-path", str(bad_ws["hf"]), "--adapter", str(bad),
                                         "--mlx-path", str(out), "--quiet"]), needles)
    _no_output(out)
    _one_line_exit2(runner.invoke(main, ["convert-adapter", str(bad), "--mlx-path", str(t / "checked"),
                                         "--base", str(bad_ws["base"])]), needles)
    _no_output(t / "checked")
    # Without --base it converts; the base refuses it when it is applied.
    mlx_adapter = convert_adapter(bad, t / "unchecked")
    wav = t / "x.wav"
    line = _one_line_exit2(runner.invoke(main, ["generate", "--model", str(bad_ws["base"]), "--adapter",
                                                str(mlx_adapter), "--prompt", "calm piano", "--duration", "0.1",
                                                "--out", str(wav)]), needles)
    assert line.startswith("error: --adapter ")
    assert not wav.exists()


def test_generate_adapter_bad_input(ws, tmp_path):
    runner = CliRunner()
    wav = tmp_path / "x.wav"

    def gen(adapter):
        return runner.invoke(main, ["generate", "--model", str(ws["base"]), "--adapter", str(adapter),
                                    "--prompt", "calm piano", "--duration", "0.1", "--out", str(wav), "--quiet"])

    _one_line_exit2(gen(ws["peft_a"]), ["--adapter", "PEFT adapter", "convert-adapter"])
    _one_line_exit2(gen(tmp_path / "nope"), ["--adapter", "does not exist"])
    cut = Path(shutil.copytree(ws["mlx_a"], tmp_path / "cut"))
    (cut / "adapters.safetensors").write_bytes((cut / "adapters.safetensors").read_bytes()[:-8])
    _one_line_exit2(gen(cut), ["adapters.safetensors", "conversion.json", "truncated"])
    odd = Path(shutil.copytree(ws["mlx_a"], tmp_path / "odd"))
    cfg = json.loads((odd / "adapter_config.json").read_text())
    cfg["modules"]["decoder.lm_heads.9"] = cfg["modules"].pop("decoder.lm_heads.3")
    (odd / "adapter_config.json").write_text(json.dumps(cfg))
    _one_line_exit2(gen(odd), ["adapters.safetensors", "does not match"])
    assert not wav.exists()
    # The loaded model is untouched by a refused switch.
    pipe = load(ws["base"])
    before = [np.array(a) for a in (pipe.model.decoder.lm_head.weight, pipe.model.enc_to_dec_proj.weight)]
    with pytest.raises(AdapterError):
        pipe.set_adapter(odd)
    assert pipe.adapter is None
    for b, a in zip(before, (pipe.model.decoder.lm_head.weight, pipe.model.enc_to_dec_proj.weight)):
        np.testing.assert_array_equal(b, np.array(a))


def test_existing_output_needs_force(ws, tmp_path):
    out = convert_adapter(ws["peft_a"], tmp_path / "ad")
    before = (out / "adapters.safetensors").read_bytes()
    r = CliRunner().invoke(main, ["convert-adapter", str(ws["peft_b"]), "--mlx-path", str(out)])
    _one_line_exit2(r, ["--mlx-path", "already exists", "--force"])
    assert (out / "adapters.safetensors").read_bytes() == before
    r = CliRunner().invoke(main, ["convert-adapter", str(ws["peft_b"]), "--mlx-path", str(out), "--force"])
    assert r.exit_code == 0 and "modules" in r.stdout
    assert (out / "adapters.safetensors").read_bytes() == (ws["mlx_b"] / "adapters.safetensors").read_bytes()


def test_safetensors_header_is_checked_before_use(ws, tmp_path):
    # A header claiming more data than the file holds: refused by the shared safetensors reader.
    f = _copy(ws, tmp_path)
    p = f / "adapter_model.safetensors"
    raw = p.read_bytes()
    p.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    with pytest.raises(SourceError, match="header length"):
        read_peft_adapter(f)


def test_cli_subprocess_dora_refused(bad_ws, tmp_path):
    # As a user sees it: a real `python -m mlx_music.cli` process, stderr one line, exit 2.
    from test_reliability_convert import assert_cli_error, run_cli

    dora = make_peft(bad_ws["models"]("mono"), tmp_path / "dora", ["q_proj"], 6, use_dora=True)
    out = tmp_path / "merged"
    run = run_cli(["convert", "--hf-path", bad_ws["hf"], "--adapter", dora, "--mlx-path", out, "--quiet"])
    assert_cli_error(run, "convert", ["adapter_model.safetensors", "q_proj", "use_dora=true", "DoRA"])
    _no_output(out)
