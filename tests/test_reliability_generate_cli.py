"""Bad-input matrix for `mlx-music generate` (real subprocesses) and the pipeline API behind it.

Each refused case: exit 2, one error line naming the option/file and what was expected, no
traceback, and no audio written: `--out` keeps the previous file byte for byte (or stays absent).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mlx_music.runtime.audio_io import AudioInputError
from tests.test_reliability_convert import (CliRun, assert_api_error, assert_cli_error, prefetch, run_cli,
                                            selected_params)

PREVIOUS_AUDIO = b"RIFF previous good output"
SR = 32000


def _write_inputs(folder: Path) -> None:
    """Audio prompt files: good, silent, empty, unreadable (all next to the outputs of a case)."""
    t = np.arange(SR // 2) / SR
    sf.write(folder / "tone.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), SR)
    sf.write(folder / "silent.wav", np.zeros(SR // 5, np.float32), SR)  # 0.2 s of digital silence
    sf.write(folder / "empty.wav", np.zeros(0, np.float32), SR)
    (folder / "garbage.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 16)  # header, no data chunk


@dataclass(frozen=True)
class GenCase:
    name: str
    args: tuple[str, ...]  # "{w}" expands to the case folder
    needles: tuple[str, ...]
    model: str = "mono"  # or "melody"
    out: str = "song.wav"
    previous: bool = True  # --out already holds a file that must survive untouched
    prompt: bool = True  # pass --prompt "calm piano"
    duration: str = "0.1"

    def __str__(self) -> str:
        return self.name


CASES = [
    GenCase("duration-zero", (), ("--duration", "positive"), duration="0"),
    GenCase("duration-negative", (), ("--duration", "positive"), duration="-2"),
    GenCase("duration-nan", (), ("--duration", "nan", "positive"), duration="nan"),
    GenCase("top-k-negative", ("--top-k", "-1"), ("--top-k -1", ">= 0")),
    GenCase("top-p-above-one", ("--top-p", "1.5"), ("--top-p 1.5", "(0, 1]")),
    GenCase("top-p-negative", ("--top-p", "-0.1"), ("--top-p -0.1", "(0, 1]")),
    GenCase("temperature-zero", ("--temperature", "0"), ("--temperature", "> 0", "--greedy")),
    GenCase("temperature-negative", ("--temperature", "-1"), ("--temperature", "> 0")),
    GenCase("guidance-negative", ("--guidance", "-1"), ("--guidance", ">= 0")),
    GenCase("no-prompt", (), ("--prompt",), prompt=False),
    GenCase("melody-missing", ("--melody", "{w}/nope.wav"), ("--melody", "{w}/nope.wav", "not found"), model="melody"),
    GenCase("melody-unreadable", ("--melody", "{w}/garbage.wav"), ("{w}/garbage.wav", "cannot read audio"),
            model="melody"),
    GenCase("melody-empty", ("--melody", "{w}/empty.wav"), ("{w}/empty.wav", "empty"), model="melody"),
    GenCase("melody-silent", ("--melody", "{w}/silent.wav"), ("{w}/silent.wav", "silent"), model="melody"),
    GenCase("melody-on-text-only-model", ("--melody", "{w}/tone.wav"), ("--melody", "not a melody model")),
    GenCase("continuation-missing", ("--continue-from", "{w}/nope.wav"), ("--continue-from", "{w}/nope.wav", "not found")),
    GenCase("continuation-unreadable", ("--continue-from", "{w}/garbage.wav"), ("{w}/garbage.wav", "cannot read audio"),
            duration="0.5"),
    GenCase("continuation-empty", ("--continue-from", "{w}/empty.wav"), ("{w}/empty.wav", "empty"), duration="0.5"),
    # Continuing digital silence is almost surely a wrong file; the melody path already refuses it.
    GenCase("continuation-silent", ("--continue-from", "{w}/silent.wav"), ("{w}/silent.wav", "silent"), duration="0.5"),
    GenCase("out-in-missing-folder", (), ("{w}/no/such/dir/song.wav", "does not exist"), out="no/such/dir/song.wav",
            previous=False),
    GenCase("out-unsupported-extension", (), ("{w}/song.mp3", ".mp3", ".wav"), out="song.mp3"),
    GenCase("stream-needs-wav", ("--stream",), ("--out", "{w}/song.flac", "WAV"), out="song.flac"),
]


def _job(case: GenCase, models: Mapping[str, Path], work: Path) -> Callable[[], tuple[CliRun, Path]]:
    def job() -> tuple[CliRun, Path]:
        work.mkdir(parents=True)
        _write_inputs(work)
        if case.previous:
            (work / case.out).write_bytes(PREVIOUS_AUDIO)
        args = ["generate", "--model", str(models[case.model]), "--duration", case.duration, "--seed", "0",
                "--out", str(work / case.out), "--quiet", *(a.format(w=work) for a in case.args)]
        if case.prompt:
            args += ["--prompt", "calm piano"]
        return run_cli(args), work
    return job


@pytest.fixture(scope="module")
def models(mlx_folder) -> dict[str, Path]:
    return {"mono": mlx_folder("mono"), "melody": mlx_folder("melody")}


@pytest.fixture(scope="module")
def results(request, models, tmp_path_factory) -> dict[str, Future]:
    root = tmp_path_factory.mktemp("reliability-generate")
    jobs: dict[str, Callable[[], object]] = {c.name: _job(c, models, root / c.name) for c in selected_params(request)
                                              if isinstance(c, GenCase)}
    if any(item.name.startswith("test_long_prompt") for item in request.session.items):
        jobs["long-prompt"] = _long_prompt_job(models["mono"], root / "long-prompt")
    return prefetch(jobs)


INPUTS = {"tone.wav", "silent.wav", "empty.wav", "garbage.wav"}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_generate_refuses(case: GenCase, results):
    run, work = results[case.name].result()
    assert_cli_error(run, "generate", [n.format(w=work) for n in case.needles])
    files = set(os.listdir(work)) - INPUTS
    if case.previous:
        assert (work / case.out).read_bytes() == PREVIOUS_AUDIO, "the previous output file was modified"
        assert files == {case.out}, f"stray files: {sorted(files)}"
    else:
        assert files == set(), f"stray files: {sorted(files)}"


# -- a prompt over the text encoder's 512 tokens: truncated with a warning, still generated --------

def _long_prompt_job(model: Path, work: Path) -> Callable[[], CliRun]:
    def job() -> CliRun:
        work.mkdir(parents=True)
        prompt = " ".join(["calm piano jazz drums"] * 200)  # ~800 tokens with the tiny tokenizer
        return run_cli(["generate", "--model", str(model), "--prompt", prompt, "--duration", "0.1", "--seed", "0",
                        "--out", str(work / "song.wav"), "--quiet"])
    return job


def test_long_prompt_is_truncated_with_a_warning(results):
    run: CliRun = results["long-prompt"].result()
    assert run.returncode == 0, run.describe()
    assert "Traceback" not in run.stderr
    assert "longer than 512 tokens" in run.stderr and "truncated" in run.stderr, run.describe()
    out = Path(run.argv[run.argv.index("--out") + 1])
    data, sr = sf.read(out)
    assert sr == SR and len(data) == 5 * 640  # 0.1 s at 50 frames/s, hop 640


# -- the pipeline API: same rules, our exception types ------------------------------------------

@dataclass(frozen=True)
class ApiCase:
    name: str
    call: Callable[..., object]  # (pipe, work folder) -> generate(...)
    exc: type[BaseException]
    needles: tuple[str, ...]
    model: str = "mono"
    kwargs: Mapping[str, object] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.name


API_CASES = [
    ApiCase("empty-prompt-list", lambda p, w: p.generate([], 0.1), ValueError, ("prompts", "at least one")),
    ApiCase("non-string-prompt", lambda p, w: p.generate(["ok", 3], 0.1), ValueError, ("prompts", "string")),
    ApiCase("duration-inf", lambda p, w: p.generate("x", float("inf")), ValueError, ("duration", "positive")),
    ApiCase("top-p-nan", lambda p, w: p.generate("x", 0.1, top_p=float("nan")), ValueError, ("top_p", "(0, 1]")),
    ApiCase("melody-silent-waveform", lambda p, w: p.generate("x", 0.1, melody=(np.zeros(SR, np.float32), SR)),
            AudioInputError, ("<waveform>", "silent"), model="melody"),
    ApiCase("melody-bad-rate", lambda p, w: p.generate("x", 0.1, melody=(np.ones(SR, np.float32), 0)),
            AudioInputError, ("<waveform>", "sample rate"), model="melody"),
    ApiCase("continuation-nonfinite", lambda p, w: p.generate("x", 0.5, audio_prompt=(np.full(SR, np.nan), SR)),
            AudioInputError, ("<waveform>", "NaN")),
]


@pytest.fixture(scope="module")
def pipes(models) -> dict[str, object]:
    from mlx_music.runtime import load

    return {name: load(path) for name, path in models.items()}


@pytest.mark.parametrize("case", API_CASES, ids=str)
def test_pipeline_refuses(case: ApiCase, pipes, tmp_path):
    with pytest.raises(BaseException) as info:
        case.call(pipes[case.model], tmp_path)
    assert_api_error(info.value, case.exc, case.needles)
