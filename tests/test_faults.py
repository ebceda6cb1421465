"""Known faults, each encoded as a test with the right expected value (these fail until fixed).

1. A codec with more quantizers than the decoder's codebooks (transformers accepts it and uses the
   first num_codebooks / audio_channels quantizers) must convert, generate like transformers, and
   encode audio prompts with the first quantizers.
4. Extreme sampling settings (temperature 1e-39, top-p 1e-12, top-k >= vocab, guidance 1e30) give
   a defined result (what the limit means) or a one-line `error:` naming the option.
5. `generate --stream` and the offline writer produce the same 16-bit WAV samples.
6. `parity` with a tokenizer transformers cannot load says so in words; the other rows still run.
7. `doctor` without MKL says MKL is not installed and how to install it; with MKL it reports MKL.

Only the public surface is used where possible (the CLI, `runtime.load`); the few internal imports
are at the top so a package restructure has one place to update.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from generation_helpers import gen  # noqa: E402
import tiny_models  # noqa: E402  (tests/ is on sys.path via conftest)
from mlx_music.runtime import load  # noqa: E402
from mlx_music.runtime.audio_io import ProgressiveWavWriter  # noqa: E402
from mlx_music.cli import main as cli_main  # noqa: E402

SR = 32000
FRAME_RATE = 50


pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _cli(*args: str):
    """Run `mlx-music ARGS` in-process; returns the click Result (stdout+stderr in .output)."""
    runner = CliRunner()
    return runner.invoke(cli_main, [str(a) for a in args], catch_exceptions=True)


def _describe(res) -> str:
    tb = ""
    if res.exc_info and not isinstance(res.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(*res.exc_info))
    return f"exit {res.exit_code}\n{res.output}{tb}"


# =============================================================================================
# 1. codec with more quantizers than the decoder uses
# =============================================================================================
CB = 64  # codebook size: 6 bits -> 2200 // (50 * 6) = 7 quantizers at 2.2 kbps
CODEC_QUANTIZERS = 2200 // (FRAME_RATE * 6)
LEVELS = 4  # decoder codebooks per channel


def _build_extra_quantizer_model(arch: str):
    from transformers import (EncodecConfig, MusicgenConfig, MusicgenDecoderConfig,
                              MusicgenForConditionalGeneration, T5Config)

    stereo = arch == "stereo"
    t5 = T5Config(**tiny_models.T5_KW)
    enc = EncodecConfig(**dict(tiny_models.ENCODEC_KW, codebook_size=CB, target_bandwidths=[2.2]))
    dec = MusicgenDecoderConfig(**dict(tiny_models.DECODER_KW, vocab_size=CB, pad_token_id=CB,
                                       bos_token_id=CB, num_codebooks=LEVELS * (2 if stereo else 1),
                                       audio_channels=2 if stereo else 1))
    cfg = MusicgenConfig(text_encoder=t5.to_dict(), audio_encoder=enc.to_dict(), decoder=dec.to_dict())
    torch.manual_seed(0)
    model = MusicgenForConditionalGeneration(cfg)
    tiny_models._discriminate(model, 0)
    model.generation_config.guidance_scale = 3.0
    model.generation_config.top_k = 250
    model.generation_config.do_sample = True
    model.generation_config.max_length = 1500
    return model.eval()


@pytest.fixture(scope="module")
def extra_quantizers(tmp_path_factory):
    """arch -> (transformers model, hf folder, mlx folder, convert CliResult); cached."""
    import transformers

    transformers.logging.set_verbosity_error()
    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"xq-{arch}")
            model = _build_extra_quantizer_model(arch)
            sd_keys = [k for k in model.state_dict() if re.match(r"audio_encoder\.quantizer\.layers\.\d+\.codebook\.embed$", k)]
            assert len(sd_keys) == CODEC_QUANTIZERS == 7  # the fixture really has 7 quantizer layers
            hf = tiny_models.write_hub_folder(model, root / "hf")
            out = root / "mlx"
            res = _cli("convert", "--hf-path", hf, "--mlx-path", out, "--quiet")
            cache[arch] = (model, hf, out, res)
        return cache[arch]

    return get


def _assert_converted(res) -> None:
    assert res.exit_code == 0, "convert refused a codec with extra quantizers:\n" + _describe(res)


def _hf_greedy(model, prompts, steps: int, channels: int):
    """transformers greedy generation -> (codes (B, K, F) as passed to EnCodec decode, audio (B, C, S))."""
    captured: list = []
    enc = model.audio_encoder
    original = enc.decode

    def spy(codes, *a, **k):
        captured.append(codes.detach().clone())
        return original(codes, *a, **k)

    enc.decode = spy
    try:
        with torch.no_grad():
            audio = model.generate(**prompts, do_sample=False, guidance_scale=3.0, max_new_tokens=steps)
    finally:
        del enc.decode
    if channels == 1:
        codes = captured[0][0].numpy()
    else:
        left, right = captured[0][0].numpy(), captured[1][0].numpy()
        codes = np.empty((left.shape[0], 2 * left.shape[1], left.shape[2]), left.dtype)
        codes[:, 0::2], codes[:, 1::2] = left, right
    return codes, audio.float().numpy()


@pytest.mark.parametrize("arch", ["mono", "stereo"])
def test_extra_quantizers_convert(arch, extra_quantizers):
    """convert exits 0 and records the decoder's codebook count (not the codec's 7 quantizers)."""
    _, _, out, res = extra_quantizers(arch)
    _assert_converted(res)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_codebooks"] == LEVELS * (2 if arch == "stereo" else 1)
    assert cfg["audio_channels"] == (2 if arch == "stereo" else 1)


@pytest.mark.parametrize("arch", ["mono", "stereo"])
def test_extra_quantizers_greedy_matches_transformers(arch, extra_quantizers):
    """Greedy text-to-music: identical codes and audio (1e-4) to transformers' generate."""
    model, _, out, res = extra_quantizers(arch)
    _assert_converted(res)
    channels = 2 if arch == "stereo" else 1
    steps = 10  # 7 frames after the 4-level delay pattern
    pipe = load(str(out))
    prompts = ["80s pop with synths", "calm piano"]
    ids, mask = pipe.tokenizer(prompts)
    t_in = dict(input_ids=torch.from_numpy(ids.astype(np.int64)),
                attention_mask=torch.from_numpy(mask.astype(np.int64)))
    ref_codes, ref_audio = _hf_greedy(model, t_in, steps, channels)
    frames = 1 + steps - LEVELS
    audio, sr, codes = gen(pipe, prompts, duration=frames / FRAME_RATE, greedy=True, guidance_scale=3.0)
    assert sr == SR
    assert np.asarray(codes).shape == ref_codes.shape
    np.testing.assert_array_equal(np.asarray(codes), ref_codes)
    assert np.asarray(audio).shape == ref_audio.shape
    np.testing.assert_allclose(np.asarray(audio), ref_audio, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["mono", "stereo"])
def test_extra_quantizers_audio_prompt_uses_first_quantizers(arch, extra_quantizers):
    """encode_audio of a test tone == the first 4 rows (per channel) of transformers' 2.2 kbps codes."""
    model, _, out, res = extra_quantizers(arch)
    _assert_converted(res)
    channels = 2 if arch == "stereo" else 1
    t = np.arange(SR // 2) / SR
    wav = np.stack([0.4 * np.sin(2 * np.pi * (220 * (c + 1)) * t) + 0.1 * np.sin(2 * np.pi * 1330 * t)
                    for c in range(channels)]).astype(np.float32)
    with torch.no_grad():
        ref = model.audio_encoder.encode(torch.from_numpy(wav[:, None, :]), bandwidth=2.2).audio_codes[0].numpy()
    assert ref.shape[:2] == (channels, CODEC_QUANTIZERS)
    first = ref[:, :LEVELS]  # (C, 4, F)
    expected = np.empty((channels * LEVELS, first.shape[-1]), first.dtype)
    for c in range(channels):
        expected[c::channels] = first[c]
    got = load(str(out)).encode_audio((wav, SR))
    assert np.asarray(got).shape == expected.shape
    np.testing.assert_array_equal(np.asarray(got), expected)


# =============================================================================================
# 4. extreme sampling settings
# =============================================================================================
GEN = ("--prompt", "x", "--duration", "0.5", "--quiet")


def _generate_wav(model: Path, out: Path, *args: str):
    res = _cli("generate", "--model", model, *GEN, "--out", out, *args)
    return res, (sf.read(str(out), dtype="int16", always_2d=True)[0] if res.exit_code == 0 and out.exists() else None)


def _is_clear_error(res, option: str) -> bool:
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    return (res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:") and option in lines[0]
            and "Traceback" not in res.output)


@pytest.fixture(scope="module")
def greedy_wav(mlx_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("greedy") / "greedy.wav"
    res, data = _generate_wav(mlx_folder("mono"), out, "--greedy", "--seed", "0")
    assert res.exit_code == 0, _describe(res)
    assert data is not None and data.shape[0] == SR // 2
    assert len(np.unique(data)) > 100  # real audio, so equality below means something
    return data


@pytest.mark.parametrize("option,value", [("--temperature", "1e-39"), ("--top-p", "1e-12")])
def test_vanishing_temperature_or_top_p_is_greedy_or_refused(option, value, mlx_folder, greedy_wav, tmp_path):
    """temperature -> 0 / top-p -> 0 mean argmax: same samples as --greedy, or exit 2 naming the option."""
    res, data = _generate_wav(mlx_folder("mono"), tmp_path / "a.wav", option, value, "--seed", "0")
    if res.exit_code == 2:
        assert _is_clear_error(res, option), "refusal must be one `error:` line naming " + option + ":\n" + _describe(res)
        assert not (tmp_path / "a.wav").exists()
        return
    assert res.exit_code == 0, _describe(res)
    assert data.shape == greedy_wav.shape
    n_diff = int(np.count_nonzero(data != greedy_wav))
    assert n_diff == 0, (f"{option} {value} wrote audio that differs from --greedy in {n_diff} of "
                         f"{data.size} samples (expected identical, or exit 2 naming {option})")


def test_vanishing_temperature_codes_are_not_garbage(mlx_folder):
    """Through the API: temperature 1e-39 gives the greedy codes (or a ValueError naming temperature)."""
    pipe = load(str(mlx_folder("mono")))
    _, _, greedy_codes = gen(pipe, ["x"], duration=0.5, greedy=True)
    try:
        _, _, codes = gen(pipe, ["x"], duration=0.5, temperature=1e-39, seed=0)
    except ValueError as e:
        assert "temperature" in str(e)
        return
    codes, greedy_codes = np.asarray(codes), np.asarray(greedy_codes)
    n_diff = int(np.count_nonzero(codes != greedy_codes))
    assert n_diff == 0, (f"temperature 1e-39 codes differ from greedy in {n_diff} of {codes.size}; it sampled "
                         f"only ids {np.unique(codes).tolist()} (greedy uses {len(np.unique(greedy_codes))} ids)")


def test_top_k_at_least_vocab_is_no_filtering(mlx_folder, tmp_path):
    """top-k 5000 >= vocab 2048 keeps every token: same seed -> same samples as top-k 0."""
    m = mlx_folder("mono")
    res_a, a = _generate_wav(m, tmp_path / "k5000.wav", "--top-k", "5000", "--seed", "0")
    res_b, b = _generate_wav(m, tmp_path / "k0.wav", "--top-k", "0", "--seed", "0")
    assert res_b.exit_code == 0, _describe(res_b)
    assert res_a.exit_code == 0, _describe(res_a)
    assert len(np.unique(b)) > 100
    assert a.shape == b.shape
    assert int(np.count_nonzero(a != b)) == 0


def test_huge_guidance_is_defined(mlx_folder, tmp_path):
    """guidance 1e30: finite, non-garbage codes/audio (API and CLI), or a clear error naming --guidance."""
    m = mlx_folder("mono")
    res, data = _generate_wav(m, tmp_path / "g.wav", "--guidance", "1e30", "--seed", "0")
    if res.exit_code == 2:
        assert _is_clear_error(res, "--guidance"), _describe(res)
        return
    assert res.exit_code == 0, _describe(res)
    pipe = load(str(m))
    audio, _, codes = gen(pipe, ["x"], duration=0.5, guidance_scale=1e30, seed=0)
    codes, audio = np.asarray(codes), np.asarray(audio)
    assert np.all(np.isfinite(audio))
    # NaN logits make the sampler return the first few ids; a defined result uses the vocabulary.
    assert len(np.unique(codes)) > 8 and codes.max() > 3, (
        f"guidance 1e30 sampled only codes {sorted(np.unique(codes))[:20]}")
    assert len(np.unique(data)) > 100


# =============================================================================================
# 5. streamed vs offline 16-bit WAV
# =============================================================================================
def test_stream_and_offline_wav_have_identical_samples(mlx_folder, tmp_path):
    m = mlx_folder("mono")
    args = ("--greedy", "--seed", "0", "--duration", "1.0")
    off = _cli("generate", "--model", m, "--prompt", "80s pop with synths", "--quiet", "--out",
               tmp_path / "off.wav", *args)
    on = _cli("generate", "--model", m, "--prompt", "80s pop with synths", "--quiet", "--stream",
              "--chunk-seconds", "0.3", "--out", tmp_path / "on.wav", *args)
    assert off.exit_code == 0, _describe(off)
    assert on.exit_code == 0, _describe(on)
    for p in ("off.wav", "on.wav"):
        assert sf.info(str(tmp_path / p)).subtype == "PCM_16"
    a = sf.read(str(tmp_path / "off.wav"), dtype="int16", always_2d=True)[0]
    b = sf.read(str(tmp_path / "on.wav"), dtype="int16", always_2d=True)[0]
    assert a.shape == b.shape
    assert len(np.unique(a)) > 100
    diff = np.abs(a.astype(np.int32) - b.astype(np.int32))
    assert int(np.count_nonzero(diff)) == 0, (
        f"streamed WAV differs from offline in {np.count_nonzero(diff)} of {diff.size} samples "
        f"(max {diff.max()} LSB)")


def _pcm_edge_signal() -> np.ndarray:
    k = np.arange(-32768, 32768, dtype=np.float64)
    edges = np.concatenate([k / 32768.0, (k + 0.5) / 32768.0, (k + 0.5) / 32767.0,
                            k / 32768.0 + 1e-9, k / 32768.0 - 1e-9])
    x = np.concatenate([np.linspace(-1.0, 1.0, 65537), edges, [-1.0, 1.0, 0.5 / 32767, -0.5 / 32767,
                                                             0.5 / 32768, -0.5 / 32768, 0.0]])
    return np.clip(x, -1.0, 1.0).astype(np.float32)


@pytest.mark.parametrize("channels", [1, 2])
def test_progressive_writer_pcm_matches_soundfile(channels, tmp_path):
    """float -> PCM_16 of the progressive writer == soundfile.write's, sample for sample."""
    x = _pcm_edge_signal()
    sig = np.stack([x, -x[::-1]])[:channels]  # [C, S]
    ref = tmp_path / "sf.wav"
    sf.write(str(ref), np.ascontiguousarray(sig.T), SR, subtype="PCM_16")
    got = tmp_path / "pw.wav"
    with ProgressiveWavWriter(got, SR, channels) as w:
        for part in np.array_split(sig, 7, axis=1):
            w.write(part)
    a = sf.read(str(ref), dtype="int16", always_2d=True)[0]
    b = sf.read(str(got), dtype="int16", always_2d=True)[0]
    assert a.shape == b.shape == (x.size, channels)
    bad = np.flatnonzero((a != b).any(axis=1))
    assert bad.size == 0, (f"{bad.size} of {a.shape[0]} frames differ, e.g. x={x[bad[:3]].tolist()} -> "
                           f"soundfile {a[bad[:3], 0].tolist()} vs writer {b[bad[:3], 0].tolist()}")


# =============================================================================================
# 6. parity with a tokenizer the reference cannot load
# =============================================================================================
def _write_wordlevel_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ("80s pop track with bassy drums and synth calm piano jazz rock happy sad a the of in "
             "ambient loud soft fast slow").split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for i, w in enumerate(words):
        vocab[w] = 3 + i
    assert max(vocab.values()) < tiny_models.T5_KW["vocab_size"]
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def wordlevel_parity(hf_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("wordlevel")
    hf = root / "hf"
    shutil.copytree(hf_folder("mono"), hf)
    _write_wordlevel_tokenizer(hf)
    out = root / "mlx"
    conv = _cli("convert", "--hf-path", hf, "--mlx-path", out, "--quiet")
    assert conv.exit_code == 0, _describe(conv)
    res = _cli("parity", "--hf-path", hf, "--mlx-path", out, "--steps", "8")
    return res


def _table_row(output: str, name: str) -> str | None:
    for ln in output.splitlines():
        if ln.split("|")[0].strip() == name:
            return ln
    return None


def test_parity_unloadable_reference_tokenizer_is_explained(wordlevel_parity):
    out = wordlevel_parity.output
    row = _table_row(out, "tokenizer ids")
    assert row is not None, _describe(wordlevel_parity)
    assert "TypeError" not in row, f"tokenizer row leaks a raw exception: {row!r}"
    assert re.search(r"could ?n[o']t load|cannot load|can't load|unable to load|failed to load", row, re.I), row


def test_parity_unloadable_reference_tokenizer_other_rows_run(wordlevel_parity):
    out = wordlevel_parity.output
    for name in ("T5 hidden states", "decoder logits", "greedy tokens", "greedy audio"):
        row = _table_row(out, name)
        assert row is not None, f"no {name!r} row:\n{out}"
        cells = [c.strip() for c in row.split("|")]
        assert cells[-1] == "ok", row
        float(cells[2])  # a number, not an error
    assert _table_row(out, "greedy tokens").split("|")[2].strip() == "0"
    assert wordlevel_parity.exit_code == 0, ("model checks pass, so parity should exit 0:\n"
                                             + _describe(wordlevel_parity))


# =============================================================================================
# 7. doctor with and without MKL
# =============================================================================================
_HIDE_MKL = textwrap.dedent('''
    """Test shim: make the `mkl` wheel invisible (no distribution metadata, no libmkl_* files)."""
    import glob as _glob
    import importlib.metadata as _md
    import os as _os

    _real_glob, _real_iglob, _real_listdir = _glob.glob, _glob.iglob, _os.listdir
    _real_distribution, _real_distributions = _md.distribution, _md.distributions

    def _visible(p):
        return not _os.path.basename(str(p)).startswith(("libmkl", "mkl-"))

    def glob(pattern, *a, **k):
        return [p for p in _real_glob(pattern, *a, **k) if _visible(p)]

    def iglob(pattern, *a, **k):
        return (p for p in _real_iglob(pattern, *a, **k) if _visible(p))

    def listdir(path="."):
        return [p for p in _real_listdir(path) if _visible(p)]

    def distribution(name):
        if str(name).lower().replace("_", "-") == "mkl":
            raise _md.PackageNotFoundError(name)
        return _real_distribution(name)

    def distributions(*a, **k):
        return (d for d in _real_distributions(*a, **k) if (d.metadata["Name"] or "").lower() != "mkl")

    _glob.glob, _glob.iglob, _os.listdir = glob, iglob, listdir
    _md.distribution, _md.distributions = distribution, distributions
    import ctypes.util as _cu
    _real_find = _cu.find_library
    _cu.find_library = lambda name: None if "mkl" in name else _real_find(name)
''')


def _doctor(env_extra: dict | None = None, shim_dir: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLX_MUSIC_BLAS", "PYTHONPATH")}
    if shim_dir is not None:
        env["PYTHONPATH"] = str(shim_dir)
    env.update(env_extra or {})
    exe = shutil.which("mlx-music")
    cmd = [exe, "doctor"] if exe else [sys.executable, "-m", "mlx_music.cli", "doctor"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_doctor_without_mkl_says_how_to_install(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(_HIDE_MKL)
    # The shim works: in that environment MKL is not visible.
    probe = subprocess.run([sys.executable, "-c", "import glob, importlib.metadata as m, sys\n"
                            "print([p for d in sys.path + [sys.prefix + '/lib'] for p in glob.glob(d + '/libmkl_rt*')])\n"
                            "try:\n m.distribution('mkl'); print('dist')\nexcept m.PackageNotFoundError: print('nodist')"],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert probe.stdout.split() == ["[]", "nodist"], probe.stdout + probe.stderr
    res = _doctor(shim_dir=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    blas = [ln for ln in out.splitlines() if ln.startswith("blas")]
    assert blas, out
    assert "imported before" not in out, f"doctor blames import order instead of the missing MKL: {blas[0]!r}"
    assert re.search(r"mkl.*not (installed|found)|not installed.*mkl", out, re.I), out
    assert "pip install" in out and "fast-cpu" in out, f"no install command: {blas[0]!r}"


def test_doctor_with_mkl_reports_mkl():
    res = _doctor()
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    blas = [ln for ln in out.splitlines() if ln.startswith("blas")]
    assert blas and re.match(r"blas\s+mkl\b", blas[0]), out
    assert "libmkl_rt" in blas[0]
    assert "skipped" not in blas[0]
