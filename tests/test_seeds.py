"""Seeds (issue 22 item 3): one documented range, checked before any work everywhere; derived
seeds (row ``seed + i``, window ``seed + w``) wrap inside it; the CLI prints the seed it used and
every written file records its seed and settings in its metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from mlx_music.runtime.generation import Request
from mlx_music.runtime.sampling import SEED_MAX, check_seed, derive_seed
from generation_helpers import run_cli as cli

BAD_SEEDS = [-1, SEED_MAX + 1, 2**64 - 1, 18446744073709551615 * 4, True, 1.5, "3", np.float32(2)]


# ------------------------------------------------------------------------------ the range

def test_seed_range_and_wrapping():
    assert SEED_MAX == 2**32 - 1
    for ok in (0, 1, SEED_MAX, np.uint32(SEED_MAX), np.int64(7)):
        assert check_seed(ok) == int(ok) and type(check_seed(ok)) is int
    assert check_seed(None) is None
    for bad in BAD_SEEDS:
        with pytest.raises(ValueError, match=r"^seed .*\[0, 4294967295\]"):
            check_seed(bad)
    with pytest.raises(ValueError, match=r"^row_seed "):
        check_seed(-1, "row_seed")
    assert derive_seed(SEED_MAX, 1) == 0 and derive_seed(SEED_MAX, 3) == 2 and derive_seed(5, 2) == 7


# ------------------------------------------------------------------------------ the API

@pytest.mark.parametrize("bad", BAD_SEEDS, ids=repr)
def test_api_refuses_bad_seeds_with_value_error(pipe, bad):
    with pytest.raises(ValueError, match="^seed "):
        pipe.generate("x", 0.1, seed=bad)
    with pytest.raises(ValueError, match="^seed "):
        pipe.stream("x", 0.1, seed=bad)


def test_batch_rows_are_checked_before_any_work(pipe, monkeypatch):
    """A bad seed in row 2 is refused before row 1's audio prompt is encoded."""
    def no_work(*a, **k):
        raise AssertionError("work started before the seeds were checked")

    monkeypatch.setattr(pipe, "encode_audio", no_work)
    rows = [Request("a", 0.5, seed=1, audio_prompt=(np.ones(3200, np.float32), 32000)),
            Request("b", 0.1, seed=-1)]
    with pytest.raises(ValueError, match="^seed -1"):
        pipe.generate_batch(rows)


def test_derived_seeds_wrap_inside_the_range(pipe):
    """Row i uses (seed + i) mod 2**32 and window w (seed + w) mod 2**32, so the top of the range
    works and equals the wrapped seed run alone."""
    res = pipe.generate(["a", "a"], 0.1, seed=SEED_MAX)
    assert res.seeds == [SEED_MAX, 0]
    alone = pipe.generate("a", 0.1, seed=0)
    np.testing.assert_array_equal(res.codes[1], alone.codes[0])
    assert not np.array_equal(res.codes[0], res.codes[1])
    # Several windows (a 0.2 s window, 0.5 s of audio): window 1 uses seed 0, no overflow.
    old = pipe.config["generation"].get("max_duration")
    pipe.config["generation"]["max_duration"] = 0.2
    try:
        top = pipe.generate("a", 0.5, seed=SEED_MAX, extend_stride=0.1)
        assert top.seeds == [SEED_MAX] and top.codes[0].shape[-1] == 25
    finally:
        pipe.config["generation"]["max_duration"] = old


def test_random_seeds_are_in_the_range(pipe):
    res = pipe.generate(["a", "b"], 0.04)
    assert all(0 <= s <= SEED_MAX for s in res.seeds)
    assert res.seeds[1] == derive_seed(res.seeds[0], 1)  # one seed for the call, as with seed=


# ------------------------------------------------------------------------------ the CLI

@pytest.mark.parametrize("bad", ["-1", "18446744073709551615", "4294967296"])
def test_cli_refuses_bad_seed_before_loading(tmp_path, bad):
    # the model does not exist: the seed is refused first, in one line naming --seed
    r = cli("generate", "--model", str(tmp_path / "no-model"), "--prompt", "x", "--duration", "0.1",
            "--seed", bad, "--out", str(tmp_path / "a.wav"))
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --seed {bad}: must be an integer in [0, 4294967295]")
    assert not (tmp_path / "a.wav").exists()


def test_cli_prints_and_records_the_seed_it_used(tmp_path, model):
    r = cli("generate", "--model", str(model), "--prompt", "calm piano", "--prompt", "drums", "--duration", "0.1",
            "--top-k", "50", "--quiet", "--out", str(tmp_path / "a.wav"))
    assert r.exit_code == 0, r.stderr
    seeds = []
    for i in range(2):
        tags = json.loads(sf.SoundFile(str(tmp_path / f"a-{i}.wav")).comment)
        assert f"wrote {tmp_path / f'a-{i}.wav'}" in r.output and f"seed {tags['seed']}" in r.output
        assert tags["prompt"] == ["calm piano", "drums"][i] and tags["duration"] == 0.1
        assert tags["settings"]["top_k"] == 50 and tags["settings"]["guidance_scale"] == 3.0
        assert tags["model"] == str(model)
        seeds.append(tags["seed"])
    assert seeds[1] == derive_seed(seeds[0], 1)
    assert f"--seed {seeds[0]}" in r.output  # how to reproduce it
    # the printed seed reproduces the files' samples
    r2 = cli("generate", "--model", str(model), "--prompt", "calm piano", "--prompt", "drums", "--duration", "0.1",
             "--top-k", "50", "--quiet", "--seed", str(seeds[0]), "--out", str(tmp_path / "b.wav"))
    assert r2.exit_code == 0, r2.stderr
    assert "--seed" not in r2.output  # given, not announced
    for i in range(2):
        a, b = sf.read(str(tmp_path / f"a-{i}.wav"))[0], sf.read(str(tmp_path / f"b-{i}.wav"))[0]
        np.testing.assert_array_equal(a, b)
        assert json.loads(sf.SoundFile(str(tmp_path / f"b-{i}.wav")).comment)["seed"] == seeds[i]


def test_cli_stream_records_the_seed(tmp_path, model):
    r = cli("generate", "--model", str(model), "--prompt", "x", "--duration", "0.1", "--seed", "4294967295",
            "--stream", "--chunk-seconds", "0.04", "--out", str(tmp_path / "s.wav"))
    assert r.exit_code == 0, r.stderr
    assert "seed 4294967295" in r.output
    # the same "wrote" line as without --stream, sample rate included
    assert f"wrote {tmp_path / 's.wav'} (0.10 s, {sf.info(str(tmp_path / 's.wav')).channels} ch, 32000 Hz, " \
           "seed 4294967295)" in r.output, r.output
    tags = json.loads(sf.SoundFile(str(tmp_path / "s.wav")).comment)
    assert tags["seed"] == SEED_MAX and tags["prompt"] == "x"
    assert sf.info(str(tmp_path / "s.wav")).frames == 5 * 640


def test_long_prompts_still_record_the_seed(tmp_path):
    """libsndfile silently drops a WAV's INFO strings past about 2 KB: the prompt is shortened so
    the seed and settings always arrive."""
    from mlx_music.runtime.audio_io import generation_tags, save_audio

    info = {"seed": 9, "prompt": "é" * 5000, "duration": 1.0, "settings": {"top_k": 250}}
    for ext in ("wav", "flac"):
        p = save_audio(tmp_path / f"long.{ext}", np.zeros((2, 640), np.float32), 32000, tags=generation_tags(info))
        tags = json.loads(sf.SoundFile(str(p)).comment)
        assert tags["seed"] == 9 and tags["settings"] == {"top_k": 250}
        assert tags["prompt"].startswith("éé") and tags["prompt_truncated"] is True


@pytest.mark.parametrize("args", [["--reference-mlx-path", "ref"], ["--hf-path", "hf"]])
def test_parity_seed_uses_the_same_range(tmp_path, args):
    """The same kind: `parity --seed` (its fixed inputs) is checked first too, in one line."""
    r = cli("parity", "--mlx-path", str(tmp_path / "m"), *args, "--seed", "-1")
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == ["error: --seed -1: must be an integer in [0, 4294967295] "
                                             "(the seed of parity's fixed inputs; default 0)"]


@pytest.mark.parametrize("bad", [-1, 2**32, 18446744073709551615])
def test_train_seed_uses_the_same_range(tmp_path, bad):
    """The same kind: `train --seed` seeds numpy, mx.random.key and mx.random.seed(seed * 1000003 +
    step); a negative or huge seed failed with a TypeError after the data was prepared."""
    from mlx_music.train.run import TrainOptions

    with pytest.raises(ValueError, match=rf"^--seed {bad}: must be an integer in \[0, 4294967295\]"):
        TrainOptions(data="d", model="m", out=str(tmp_path / "o"), seed=bad).check()
    r = cli("train", str(tmp_path / "no-data"), "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o"),
            "--seed", str(bad))
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: --seed {bad}: must be an integer"), r.stderr
