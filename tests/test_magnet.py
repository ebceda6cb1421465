"""MAGNeT and audio-MAGNeT (issue 24): conversion, parity with audiocraft 1.3.0, generation, bad input.

The fixtures in tests/data/audiocraft/magnet*/ were built with audiocraft's own builders and
exported in its layout by tests/make_magnet_fixtures.py, which also stored audiocraft's outputs
(refs.npz): the stage attention masks, ``compute_predictions`` logits of a masked token grid for
every stage, and ``MAGNeT.generate`` with ``use_sampling=False`` for a batch of two prompts (tokens
and audio; the music fixture also with ``span_arrangement='stride1'``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

# the audiocraft-format tests' helpers: the offline test HF cache (autouse), the CLI, converted fixtures
from tests.test_audiocraft import _test_hub_cache, cli, converted  # noqa: F401

DATA = Path(__file__).parent / "data" / "audiocraft"
KINDS = ("magnet", "magnet-audio")
TOL = 1e-4


@pytest.fixture(scope="module")
def pipes(converted):
    import mlx_music

    loaded: dict = {}

    def get(kind: str):
        if kind not in loaded:
            loaded[kind] = mlx_music.load(converted(kind))
        return loaded[kind]

    return get


def refs(kind: str) -> dict:
    return dict(np.load(DATA / kind / "refs.npz"))


# ------------------------------------------------------------------------------ conversion

@pytest.mark.parametrize("kind", KINDS)
def test_convert_detects_magnet(converted, kind):
    out = converted(kind)
    cfg = json.loads((out / "config.json").read_text())
    rec = json.loads((out / "conversion.json").read_text())
    assert cfg["model_type"] == "magnet"
    assert cfg["magnet"] == {"subcodes_context": 2 if kind == "magnet" else 1, "span_len": 3, "segment_frames": 50}
    gen = cfg["generation"]
    assert gen["decoding_steps"] == [20, 10, 10, 10] and gen["span_arrangement"] == "nonoverlap"
    assert (gen["temperature"], gen["top_k"], gen["top_p"], gen["max_cfg_coef"], gen["min_cfg_coef"]) == \
        (3.0, 0, 0.9, 10.0, 1.0)
    assert gen["max_duration"] == 1.0  # the training segment of xp.cfg
    assert cfg["sample_rate"] == (32000 if kind == "magnet" else 16000)
    assert cfg["text_encoder"]["d_model"] == (768 if kind == "magnet" else 1024)
    assert rec["source"]["xp_cfg"]["lm_model"] == "transformer_lm_magnet"
    assert rec["source"]["codec"] == ("facebook/encodec_32khz" if kind == "magnet" else "package")
    r = cli("inspect", str(out))
    assert r.exit_code == 0
    line = next(x for x in r.output.splitlines() if x.startswith("magnet "))
    assert "subcodes_context" in line and "decoding_steps [20, 10, 10, 10]" in line
    assert "model_type       magnet" in r.output and "manifest diff    none" in r.output


# ------------------------------------------------------------------------------ parity

@pytest.mark.parametrize("kind", KINDS)
def test_stage_masks_equal_audiocraft(pipes, kind):
    """Element by element: audiocraft's additive [1, heads, T8, T8] mask (align-8 padding cut)
    is 0 exactly where ours is visible and -inf elsewhere; stage 0 has none."""
    from mlx_music.models.magnet import stage_attention_mask

    ref = refs(kind)
    model = pipes(kind).model
    seg = model.magnet.segment_frames
    assert "mask_stage0" not in ref and stage_attention_mask(0, seg, model.magnet.subcodes_context) is None
    for s in range(1, 4):
        r = ref[f"mask_stage{s}"]
        assert r.shape[-1] == 56  # 50 aligned to 8
        ours = np.where(np.array(stage_attention_mask(s, seg, model.magnet.subcodes_context)), 0.0, -np.inf)
        for h in range(r.shape[1]):
            np.testing.assert_array_equal(r[0, h, :seg, :seg], ours)
        assert (r[..., seg:, :] == 0).all() and (r[..., :, seg:] == 0).all()
        band = np.isfinite(ours).sum(axis=1)
        assert band.max() == 2 * model.magnet.subcodes_context + 1 and band.min() < band.max()
        assert model.stage_mask(s) == model.magnet.subcodes_context  # what the forward runs: that band
    assert model.stage_mask(0) is None


def test_banded_attention_equals_masked_attention():
    """The decoder computes a stage mask as a band (2w + 1 scores per query): the same attention
    as the full masked one, edges included."""
    import mlx.core as mx

    from mlx_music.models.magnet import restricted_context_mask
    from mlx_music.models.musicgen_decoder import banded_attention

    mx.random.seed(1)
    q, k, v = (mx.random.normal((2, 3, 23, 8)) for _ in range(3))
    for w in (0, 2, 5, 30):
        full = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=restricted_context_mask(23, w))
        full = full.transpose(0, 2, 1, 3).reshape(2, 23, 24)
        assert float(mx.abs(banded_attention(q, k, v, w, 0.3) - full).max()) < 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_compute_predictions(pipes, kind):
    import mlx.core as mx

    ref = refs(kind)
    pipe = pipes(kind)
    ids, mask = pipe.tokenizer([str(ref["prompts"][0])])
    states, m = pipe.model.encode_text(mx.array(ids), mx.array(mask))
    for s in range(4):
        codes = ref[f"codes_stage{s}"]
        assert (codes[:, s] == 64).any() and (codes[:, s] != 64).any()  # a partly masked stage
        logits = np.array(pipe.model(mx.array(codes), states, m, stage=s))
        diff = np.abs(logits - ref[f"logits_stage{s}"]).max()
        assert diff < TOL, (s, diff)
        one = np.array(pipe.model.stage_logits(mx.array(codes), s, states, m))
        np.testing.assert_array_equal(one[:, 0], logits[:, s])  # one head = that head of all
    # the masks matter: stage 1 without its restriction gives other logits
    codes = mx.array(ref["codes_stage1"])
    free = np.array(pipe.model(codes, states, m, stage=0))
    assert np.abs(free - ref["logits_stage1"]).max() > 1e-2


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_matches_audiocraft(pipes, kind):
    ref = refs(kind)
    pipe = pipes(kind)
    prompts = [str(p) for p in ref["prompts"]]
    res = pipe.generate(prompts, float(ref["duration"]), greedy=True, seed=0)
    assert res.sample_rate == int(ref["sample_rate"])
    tokens = ref["tokens"]
    assert tokens.shape == (2, 4, 30)  # 0.64 s = 32 frames, trimmed to whole spans of 3
    assert not np.array_equal(tokens[0], tokens[1])
    for i in range(2):
        np.testing.assert_array_equal(res.codes[i], tokens[i])
        assert res.audio[i].shape == ref["audio"][i].shape
        assert np.abs(res.audio[i] - ref["audio"][i]).max() < TOL
        assert np.abs(ref["audio"][i]).max() > 1e-3
    if "tokens_stride1" in ref:
        res = pipe.generate(prompts, float(ref["duration"]), greedy=True, seed=0, span_arrangement="stride1")
        assert ref["tokens_stride1"].shape[-1] == 32  # overlapping spans: no trim
        for i in range(2):
            np.testing.assert_array_equal(res.codes[i], ref["tokens_stride1"][i])


def test_mask_schedule_is_float32_like_audiocraft():
    from mlx_music.runtime.magnet_generation import mask_schedule

    s = mask_schedule(20)
    assert s.dtype == np.float32 and s[0] == 1.0
    assert s[-1] == np.float32(-4.371139e-08)  # cos(pi/2) in float32: the last pass masks one span
    assert (np.diff(s) < 0).all()


# ------------------------------------------------------------------------------ generation

def test_rows_equal_alone_or_batched_with_own_settings(pipes):
    from mlx_music.runtime.generation import Request

    pipe = pipes("magnet")
    rows = [Request("80s pop with synths", 0.64, seed=3),
            Request("calm piano", 0.64, seed=4, temperature=1.5, top_p=0.5),
            Request("calm piano", 0.64, seed=5, top_p=0.0, top_k=8, max_cfg_coef=4.0),
            Request("jazz drums", 0.5, seed=6, decoding_steps=[3, 2, 2, 2])]
    batch = pipe.generate_batch(rows)
    assert [c.shape[-1] for c in batch.codes] == [30, 30, 30, 24]
    for i, r in enumerate(rows):
        alone = pipe.generate_batch([r])
        np.testing.assert_array_equal(batch.codes[i], alone.codes[0])
        np.testing.assert_array_equal(batch.audio[i], alone.audio[0])
    assert len({c.tobytes() for c in batch.codes[:3]}) == 3
    other = pipe.generate_batch([Request("80s pop with synths", 0.64, seed=7)])
    assert not np.array_equal(other.codes[0], batch.codes[0])  # the seed matters
    # rows 0-2 run as one batch (per-row temperature, top-p / top-k and CFG), row 3 alone (own steps)
    assert batch.stats.steps == 50 + 9


def test_stream_is_generate_at_the_end(pipes):
    pipe = pipes("magnet")
    full = pipe.generate("80s pop", 0.64, seed=11)
    chunks = list(pipe.stream("80s pop", 0.64, seed=11, chunk_seconds=0.2))
    assert len(chunks) == 3  # 30 frames (0.64 s trimmed to whole spans) in chunks of 10
    np.testing.assert_array_equal(np.concatenate([c.audio[0] for c in chunks], axis=-1), full.audio[0])
    assert chunks[0].stats.first_audio_steps == 50  # nothing is final before the last pass


def test_audio_prompt_is_kept(pipes, tmp_path):
    pipe = pipes("magnet")
    first = pipe.generate("80s pop", 0.64, seed=1)
    wav = (first.audio[0], first.sample_rate)
    cont = pipe.generate("80s pop", 0.96, seed=2, audio_prompt=wav)
    prompt = pipe.encode_audio(wav)
    np.testing.assert_array_equal(cont.codes[0][:, :prompt.shape[-1]], prompt)
    assert cont.codes[0].shape[-1] == 48


# ------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("settings, needle", [
    (dict(duration=1.2), "duration 1.2: this MAGNeT checkpoint makes clips of at most 1 s"),
    (dict(duration=0.02), "duration 0.02: too short"),
    (dict(guidance_scale=3.0), "guidance_scale"),
    (dict(top_k=5), "top_k 5"),
    (dict(decoding_steps=[20, 10]), "decoding_steps"),
    (dict(decoding_steps=[20, 10, 0, 10]), "decoding_steps"),
    (dict(span_arrangement="overlap"), "span_arrangement 'overlap'"),
    (dict(max_cfg_coef=float("nan")), "max_cfg_coef"),
    (dict(temperature=-1.0), "temperature -1.0"),
    (dict(extend_stride=0.5), "extend_stride"),
])
def test_api_refuses_naming_the_parameter(pipes, settings, needle):
    settings = dict(settings)
    duration = settings.pop("duration", 0.64)
    with pytest.raises(ValueError) as e:
        pipes("magnet").generate("80s pop", duration, **settings)
    assert str(e.value).startswith(needle.split(" ")[0]) and needle in str(e.value)


def test_magnet_settings_refused_for_musicgen(pipes):
    pipe = pipes("mono")  # the MusicGen fixture of tests/test_audiocraft.py
    with pytest.raises(ValueError, match="^decoding_steps: applies to MAGNeT checkpoints only"):
        pipe.generate("80s pop", 0.2, decoding_steps=[1, 1, 1, 1])


@pytest.mark.parametrize("args, needle", [
    (["--duration", "5"], "error: --duration 5.0: this MAGNeT checkpoint makes clips of at most 1 s"),
    (["--extend-stride", "0.5"], "error: --extend-stride"),
    (["--guidance", "3"], "error: --guidance"),
    (["--top-k", "10"], "error: --top-k 10"),
])
def test_cli_refuses_in_one_line(converted, tmp_path, args, needle):
    out = tmp_path / "x.wav"
    r = cli("generate", "--model", str(converted("magnet")), "--prompt", "80s pop", "--out", str(out), "--quiet",
            *(["--duration", "1"] if "--duration" not in args else []), *args)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(needle), r.stderr
    assert not out.exists()


def _edited(tmp_path: Path, kind: str, edit) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    pkg = torch.load(DATA / kind / "state_dict.bin", weights_only=True)
    pkg["xp.cfg"] = edit(pkg["xp.cfg"])
    torch.save(pkg, src / "state_dict.bin")
    shutil.copy(DATA / kind / "compression_state_dict.bin", src)
    return src


def _sub(a: str, b: str):
    def edit(text: str) -> str:
        assert a in text, a
        return text.replace(a, b, 1)
    return edit


@pytest.mark.parametrize("edit, needle", [
    (_sub("subcodes_context: 2", "subcodes_context: -3"), "transformer_lm.subcodes_context = -3"),
    (_sub("  modeling: parallel", "  modeling: delay"), "codebooks_pattern.modeling = 'delay'"),
    (_sub("span_len: 3", "span_len: 0"), "masking.span_len = 0"),
    (_sub("masking:\n  span_len: 3\n", ""), "masking.span_len"),
    (_sub("causal: false", "causal: true"), "transformer_lm.causal = True"),
    (_sub("lm_model: transformer_lm_magnet", "lm_model: transformer_lm_magnet2"), "lm_model"),
    (_sub("  prepend: []", "  prepend:\n  - description"), "fuser"),
    (_sub("layer_scale: null", "layer_scale: 0.1"), "transformer_lm.layer_scale"),
])
def test_convert_refuses_unsupported_magnet_settings(tmp_path, edit, needle):
    src = _edited(tmp_path, "magnet", edit)
    out = tmp_path / "out"
    r = cli("convert", "--hf-path", str(src), "--mlx-path", str(out), "--quiet")
    assert r.exit_code == 2, (r.output, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.partial-*"))


def test_cli_magnet_options_equal_the_api(converted, pipes, tmp_path):
    import soundfile as sf

    out = tmp_path / "a.wav"
    r = cli("generate", "--model", str(converted("magnet")), "--prompt", "calm piano", "--out", str(out), "--quiet",
            "--duration", "1", "--seed", "5", "--decoding-steps", "3,2,2,2", "--span-arrangement", "stride1",
            "--max-cfg-coef", "4", "--min-cfg-coef", "2", "--temperature", "2")
    assert r.exit_code == 0, r.stderr
    res = pipes("magnet").generate("calm piano", 1.0, seed=5, decoding_steps=[3, 2, 2, 2], span_arrangement="stride1",
                                   max_cfg_coef=4.0, min_cfg_coef=2.0, temperature=2.0)
    wav, sr = sf.read(out, dtype="float32")
    assert sr == 32000 and wav.shape[0] == res.audio[0].shape[-1] == 32000  # stride1: 50 frames, no trim
    assert np.abs(wav - res.audio[0][0]).max() < 1 / 32767 + 1e-6  # 16-bit PCM of the same samples
    r = cli("generate", "--model", str(converted("magnet")), "--prompt", "x", "--out", str(out), "--duration", "1",
            "--decoding-steps", "3,2")
    assert r.exit_code == 2 and r.stderr.strip().startswith("error: --decoding-steps [3, 2]: must be 4 integers")


def test_cli_magnet_option_refused_for_musicgen(converted, tmp_path):
    r = cli("generate", "--model", str(converted("mono")), "--prompt", "x", "--out", str(tmp_path / "a.wav"),
            "--duration", "0.2", "--span-arrangement", "stride1")
    assert r.exit_code == 2
    assert r.stderr.strip() == "error: --span-arrangement: applies to MAGNeT checkpoints only"


def test_serve_and_batch_run_magnet(converted, pipes, tmp_path):
    """The server and batch jobs drive MAGNeT through the same pipeline interfaces."""
    import io

    import soundfile as sf
    from fastapi.testclient import TestClient

    from mlx_music.server.app import create_app

    pipe = pipes("magnet")
    want = pipe.generate("calm piano", 0.64, seed=3).audio[0][0]
    with TestClient(create_app({"m": pipe})) as client:
        r = client.post("/v1/generate", json={"prompt": "calm piano", "duration": 0.64, "seed": 3})
        assert r.status_code == 200, r.text
        wav, sr = sf.read(io.BytesIO(r.content), dtype="float32")
        assert sr == 32000 and wav.shape == want.shape  # 0.64 s trimmed to 30 frames
        assert np.abs(wav - want).max() < 1 / 32767 + 1e-6
        r = client.post("/v1/generate", json={"prompt": "calm piano", "duration": 0.64, "guidance": 3.0})
        assert r.status_code == 422 and r.json()["error"].startswith("guidance_scale: MAGNeT anneals")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "calm piano", "duration": 0.64, "seed": 3}\n'
                       '{"id": "b", "prompt": "80s pop", "duration": 0.5, "seed": 4}\n')
    r = cli("batch", str(prompts), "--model", str(converted("magnet")), "--out-dir", str(tmp_path / "o"), "--quiet")
    assert r.exit_code == 0, r.stderr
    got, _ = sf.read(tmp_path / "o" / "a.wav", dtype="float32")
    assert np.abs(got - want).max() < 1 / 32767 + 1e-6
    assert sf.info(tmp_path / "o" / "b.wav").frames == 24 * 640  # 25 frames trimmed to 24


def test_readme_magnet_commands_run_verbatim(tmp_path, monkeypatch):
    """The README's MAGNeT commands, as written, on the shipped tiny fixtures."""
    import re
    import shlex

    import soundfile as sf

    from mlx_music.cli import main

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### MAGNeT and audio-MAGNeT"):]
    section = section[:section.index("\n## ")]
    block = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0]
    commands = [c for c in block.splitlines() if c.strip() and not c.startswith("#")]
    assert [c for c in commands if "convert" in c and "magnet" in c] and len(commands) == 6
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "data").symlink_to(Path(__file__).resolve().parent / "data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for command in commands:
        argv = shlex.split(command)
        env = {}
        while "=" in argv[0]:
            k, v = argv.pop(0).split("=", 1)
            env[k] = v
        assert argv[0] == "mlx-music"
        r = CliRunner().invoke(main, argv[1:], env=env, catch_exceptions=False)
        assert r.exit_code == 0, f"{command}\n{r.output}\n{r.stderr}"
    for name, sr, n in (("magnet.wav", 32000, 48 * 640), ("magnet-stride1.wav", 32000, 50 * 640),
                        ("rain.wav", 16000, 48 * 320)):
        info = sf.info(tmp_path / name)
        assert (info.samplerate, info.frames) == (sr, n)
