"""Faults of generation beyond one window, tested through the public surface.

Fault 2 -- defaults that do not fit the model. A MusicGen whose decoder holds 512 positions has a
window of 508 frames (512 - BOS - 3 delays) = 10.16 s, shorter than the default --extend-stride of
18 s, so a plain `mlx-music generate --duration 70` dies on an option the user never set. The
default stride must follow the window: audiocraft uses 18 s on its 30 s window, so keep the ratio,
stride = window * 18 / 30 (here 10.16 * 0.6 = 6.10 s = 305 frames). Errors must name what the
user typed: CLI flags on the CLI (`--extend-stride`), keyword arguments in the Python API
(`extend_stride`), and only options the user actually set.

Fault 3 -- a long generation with a melody conditions a window on the wrong part of the melody.
audiocraft's rule: every window, the last shorter one too, is conditioned on 30 s of melody
starting at the window's start time t0, wrapping around the melody:
`wav[(int(t0 * sr) + arange(int(30 * sr))) % len(wav)]`; its chroma is then tiled/truncated to
chroma_length (235 frames for 30 s at hop 4096). With duration 40 s and stride 18 s the windows are
[0, 30) s and [18, 40) s. Today the last window gets the chroma of its own 22 s only (172 frames),
tiled to 235, so its frames 172..234 repeat the start of the slice instead of continuing it.

Internal seams are confined to the block right below (re-point them when the package moves).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from click.testing import CliRunner

import tiny_models

# ------------------------------------------------------------------ seams (re-point these only)
from mlx_music.converters.convert import convert_checkpoint  # noqa: E402
from mlx_music.models.musicgen import MusicGen  # noqa: E402
from mlx_music.runtime import load  # noqa: E402
from mlx_music.runtime.chroma import ChromaExtractor  # noqa: E402  (numpy twin of the reference extractor)
from mlx_music.cli import main as cli_main  # noqa: E402


def record_melody_chroma(monkeypatch) -> list[np.ndarray]:
    """Every window's melody conditioning: the conditional rows of the `chroma` argument of
    `MusicGen.melody_prefix` (the one model method that consumes chroma), one entry per call.
    Rows are (Tc, 12) numpy, before the model's tile/truncate to chroma_length."""
    calls: list[np.ndarray] = []
    inner = MusicGen.melody_prefix

    def melody_prefix(model, text_states, chroma=None, batch_size=None):
        if chroma is not None:
            # CFG doubles the batch: conditional rows first, then the null melody rows.
            calls.append(np.array(chroma)[0].astype(np.float32))
        return inner(model, text_states, chroma, batch_size=batch_size)

    monkeypatch.setattr(MusicGen, "melody_prefix", melody_prefix)
    return calls


# ------------------------------------------------------------------------------------ helpers
SR = 32000
FRAME_RATE = 50
PROMPT = "calm piano"


def _converted(tmp_path_factory, name: str, arch: str, **decoder_overrides):
    hf = tmp_path_factory.mktemp(f"{name}-hf")
    tiny_models.write_hub_folder(tiny_models.build_model(arch, **decoder_overrides), hf)
    out = tmp_path_factory.mktemp(f"{name}-mlx") / "model"
    convert_checkpoint(hf, out, dtype="float32", progress=False)
    return out


def _cli(*args: str):
    return CliRunner().invoke(cli_main, list(args), catch_exceptions=False)


def _error_lines(result) -> list[str]:
    text = result.stderr if result.stderr else result.output
    return [ln for ln in text.splitlines() if ln.lower().startswith("error")]


def _flags(text: str) -> set[str]:
    return set(re.findall(r"--[a-z][a-z-]*", text))


# ====================================================================== Fault 2: default stride
WINDOW_512 = 508  # frames: 512 positions - BOS - 3 codebook delays
DURATION = 70.0


@pytest.fixture(scope="module")
def model_512(tmp_path_factory):
    return _converted(tmp_path_factory, "mono512", "mono", max_position_embeddings=512)


def test_window_of_512_position_model(model_512):
    pipe = load(model_512)
    assert pipe.max_frames == WINDOW_512  # 10.16 s, < the 18 s default stride


def test_cli_default_stride_fits_short_window(model_512, tmp_path):
    """`generate --duration 70` without --extend-stride works on a 10.16 s window: 70.0 s out."""
    import soundfile as sf

    out = tmp_path / "a.wav"
    res = _cli("generate", "--model", str(model_512), "--prompt", "x", "--duration", "70",
               "--out", str(out), "--seed", "0", "--quiet")
    assert res.exit_code == 0, res.output
    info = sf.info(str(out))
    assert info.samplerate == SR
    assert info.frames == int(DURATION * SR)  # 2_240_000 samples


def test_api_default_stride_is_window_times_18_over_30(model_512):
    """Default stride = window * 18/30 = 304.8 frames (6.10 s): 1 + ceil((3500 - 508) / 305) = 11
    windows, so stream's step count (frames + 3 delay steps per window) is 3500 + 3 * 11. Any
    stride in [300, 332] frames gives 11 windows; 1 s short of the window (458) would give 8."""
    pipe = load(model_512)
    chunks = list(pipe.stream(PROMPT, DURATION, chunk_seconds=10.0, greedy=True))
    audio = np.concatenate([c.audio[0] for c in chunks], axis=-1)
    assert audio.shape == (1, int(DURATION * SR))
    totals = [chunks[-1].stats.steps]
    frames = int(DURATION * FRAME_RATE)
    stride = WINDOW_512 * 18 / 30
    windows = 1 + int(np.ceil((frames - WINDOW_512) / round(stride)))
    assert windows == 11
    assert set(totals) == {frames + 3 * windows}  # 3533


def test_api_bad_extend_stride_names_keyword(model_512):
    pipe = load(model_512)
    with pytest.raises(ValueError) as e:
        pipe.generate("x", duration=70, extend_stride=20)
    msg = str(e.value)
    assert "extend_stride" in msg and "--extend-stride" not in msg, msg


def test_cli_bad_extend_stride_names_flag(model_512, tmp_path):
    res = _cli("generate", "--model", str(model_512), "--prompt", "x", "--duration", "70",
               "--extend-stride", "20", "--out", str(tmp_path / "a.wav"), "--seed", "0", "--quiet")
    assert res.exit_code == 2, res.output
    errors = _error_lines(res)
    assert len(errors) == 1 and "\n" not in errors[0], res.output
    assert "--extend-stride" in errors[0], res.output


# CLI args, flags the user set, what the error must name.
CLI_BAD = {
    "duration": (["--duration", "-1"], "--duration"),
    "temperature": (["--duration", "1", "--temperature", "0"], "--temperature"),
    "top_k": (["--duration", "1", "--top-k", "-1"], "--top-k"),
    "top_p": (["--duration", "1", "--top-p", "2"], "--top-p"),
    "guidance": (["--duration", "1", "--guidance", "-1"], "--guidance"),
}
HINTS = {"--greedy"}  # a flag an error may suggest without the user having set it


@pytest.mark.parametrize("case", list(CLI_BAD))
def test_cli_errors_name_only_flags_the_user_set(model_512, tmp_path, case):
    args, flag = CLI_BAD[case]
    argv = ["generate", "--model", str(model_512), "--prompt", "x", "--out", str(tmp_path / "a.wav"),
            "--seed", "0", "--quiet", *args]
    res = _cli(*argv)
    assert res.exit_code == 2, res.output
    errors = _error_lines(res)
    assert errors, res.output
    named = _flags(" ".join(errors))
    assert flag in named, res.output
    assert named <= _flags(" ".join(argv)) | HINTS, res.output


# keyword arguments, the keyword the error must name, the CLI flag it must not name
API_BAD = {
    "duration": (dict(duration=-1), "duration", "--duration"),
    "temperature": (dict(duration=1, temperature=0), "temperature", "--temperature"),
    "top_k": (dict(duration=1, top_k=-1), "top_k", "--top-k"),
    "top_p": (dict(duration=1, top_p=2), "top_p", "--top-p"),
    "guidance_scale": (dict(duration=1, guidance_scale=-1), "guidance_scale", "--guidance"),
}


@pytest.mark.parametrize("case", list(API_BAD))
def test_api_errors_name_keywords_not_flags(model_512, case):
    kwargs, keyword, flag = API_BAD[case]
    pipe = load(model_512)
    with pytest.raises(ValueError) as e:
        pipe.generate("x", **kwargs)
    msg = str(e.value)
    assert keyword in msg, msg
    assert not _flags(msg), msg  # no CLI flag at all (not `flag`, not `--greedy`)
    if case == "temperature":
        assert "greedy" in msg, msg  # the hint: greedy=True for argmax decoding


# ============================================================ Fault 3: per-window melody slice
WINDOW_S, MEL_DURATION, MEL_STRIDE = 30.0, 40.0, 18.0
WINDOW_STARTS = (0.0, 18.0)  # second window covers 18 .. 40 s
CHROMA_LENGTH = 235  # the real models' value (30 s at hop 4096)


@pytest.fixture(scope="module")
def melody_model(tmp_path_factory):
    saved = tiny_models.CHROMA_LENGTH  # build_model reads it when building MusicgenMelodyConfig
    tiny_models.CHROMA_LENGTH = CHROMA_LENGTH
    try:
        folder = _converted(tmp_path_factory, "melody2048", "melody", max_position_embeddings=2048)
    finally:
        tiny_models.CHROMA_LENGTH = saved
    return folder


def _ten_notes() -> np.ndarray:
    """10 s: ten one-second sine notes, MIDI 60..69 (ten different pitch classes)."""
    t = np.arange(SR) / SR
    notes = [0.4 * np.sin(2 * np.pi * 440.0 * 2 ** ((m - 69) / 12) * t) for m in range(60, 70)]
    return np.concatenate(notes).astype(np.float32)


def _expected_chroma(wav: np.ndarray, t0: float) -> np.ndarray:
    """audiocraft's slice for a window starting at t0, its one-hot chroma, tiled/truncated."""
    idx = (int(t0 * SR) + np.arange(int(WINDOW_S * SR))) % len(wav)
    chroma = ChromaExtractor(sampling_rate=SR)(wav.astype(np.float64)[idx], SR)[0]
    return _tile(chroma)


def _tile(chroma: np.ndarray) -> np.ndarray:
    reps = -(-CHROMA_LENGTH // chroma.shape[0])
    return np.tile(chroma, (reps, 1))[:CHROMA_LENGTH]


def _differing_frames(got: np.ndarray, want: np.ndarray) -> int:
    return int(np.sum(np.argmax(_tile(got), -1) != np.argmax(want, -1)))


_MELODY_AUDIO: dict = {}


def _check_windows(calls: list[np.ndarray]) -> None:
    wav = _ten_notes()
    assert len(calls) == len(WINDOW_STARTS)
    diffs = {t0: _differing_frames(got, _expected_chroma(wav, t0)) for got, t0 in zip(calls, WINDOW_STARTS)}
    assert diffs == {t0: 0 for t0 in WINDOW_STARTS}


def test_melody_window_of_2048_position_model(melody_model):
    pipe = load(melody_model)
    assert pipe.config["melody"]["chroma_length"] == CHROMA_LENGTH
    assert pipe.max_frames == int(WINDOW_S * FRAME_RATE)


def test_generate_conditions_every_window_on_30s_from_its_start(melody_model, monkeypatch):
    pipe = load(melody_model)
    calls = record_melody_chroma(monkeypatch)
    res = pipe.generate(PROMPT, MEL_DURATION, greedy=True, melody=(_ten_notes(), SR),
                        extend_stride=MEL_STRIDE)
    audio = np.stack(res.audio)
    _MELODY_AUDIO["generate"] = audio
    assert audio.shape == (1, 1, int(MEL_DURATION * SR))
    _check_windows(calls)


def test_stream_conditions_every_window_on_30s_from_its_start(melody_model, monkeypatch):
    pipe = load(melody_model)
    calls = record_melody_chroma(monkeypatch)
    chunks = list(pipe.stream(PROMPT, MEL_DURATION, chunk_seconds=10.0, greedy=True,
                              melody=(_ten_notes(), SR), extend_stride=MEL_STRIDE))
    audio = np.concatenate([c.audio[0] for c in chunks], axis=-1)[None]
    totals = [chunks[-1].stats.steps]
    _MELODY_AUDIO["stream"] = audio
    assert audio.shape == (1, 1, int(MEL_DURATION * SR))
    # windows: 1500 frames, then 1100 (600 context + 500 new) -> (1500 + 3) + (500 + 3) steps
    assert set(totals) == {2006}
    _check_windows(calls)


def test_melody_generate_and_stream_give_identical_audio(melody_model):
    """Same codes, same audio: generate and stream decode with the same block decoder."""
    pipe = load(melody_model)
    for kind in ("generate", "stream"):
        if kind not in _MELODY_AUDIO:
            kw = dict(greedy=True, melody=(_ten_notes(), SR), extend_stride=MEL_STRIDE)
            if kind == "generate":
                _MELODY_AUDIO[kind] = np.stack(pipe.generate(PROMPT, MEL_DURATION, **kw).audio)
            else:
                _MELODY_AUDIO[kind] = np.concatenate([c.audio[0] for c in pipe.stream(PROMPT, MEL_DURATION, **kw)], -1)[None]
    assert _MELODY_AUDIO["stream"].shape == _MELODY_AUDIO["generate"].shape == (1, 1, int(MEL_DURATION * SR))
    np.testing.assert_array_equal(_MELODY_AUDIO["stream"], _MELODY_AUDIO["generate"])
