"""A melody-model row is bit-identical alone or batched (issue 21 item 3).

On melody models the text sits in the decoder prefix. A shorter prompt in a batch used to be padded
with zero states that were attended to, and every later position shifted: 98.8% of a short prompt's
codes changed when a longer one joined it. Now every row has the same slot layout alone or batched
(text padded to the model's text limit), its padding is masked and its positions count only its own
slots, so it computes what it computes alone: through `generate_batch` / `stream_batch` (the server's
batcher), batch jobs (`mlx-music batch`) and the Python API alike.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mlx_music.runtime.generation import Request
from tests.generation_helpers import cached_pipe, melody_tones

SHORT = "rock"
LONG = "a much longer prompt with many words zzz"


@pytest.fixture(scope="module")
def pipe(mlx_folder):
    return cached_pipe(mlx_folder("melody"))


def test_prompts_differ_in_token_length(pipe):
    ids, mask = pipe.tokenizer([SHORT, LONG])
    n_short, n_long = mask.sum(axis=1)
    assert n_long >= n_short + 5  # the batch pads the short prompt by 5 tokens or more


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_generate_batch_row_equals_row_alone(pipe, greedy):
    mel = melody_tones(3.0)
    a = Request(SHORT, 1.0, seed=2, greedy=greedy, melody=mel)
    b = Request(LONG, 1.0, seed=3, greedy=greedy)
    c = Request(LONG, 0.6, seed=4, greedy=greedy, melody=(melody_tones(2.0)[0][::-1].copy(), 32000))
    alone = {k: pipe.generate_batch([r]) for k, r in (("a", a), ("b", b), ("c", c))}
    together = pipe.generate_batch([a, b, c])
    swapped = pipe.generate_batch([c, b, a])
    for i, k in enumerate("abc"):
        np.testing.assert_array_equal(together.codes[i], alone[k].codes[0])
        np.testing.assert_array_equal(together.audio[i], alone[k].audio[0])
        np.testing.assert_array_equal(swapped.codes[2 - i], alone[k].codes[0])
    # The rows really differ from each other (the comparison is not between equal outputs).
    assert not np.array_equal(alone["a"].codes[0], alone["b"].codes[0])
    assert len(np.unique(alone["a"].codes[0])) > 10


def test_stream_batch_row_equals_row_alone(pipe):
    a = Request(SHORT, 0.8, seed=2, greedy=True, melody=melody_tones(3.0))
    b = Request(LONG, 0.8, seed=9, greedy=True)
    alone = np.concatenate([c.audio[0] for c in pipe.stream_batch([a], chunk_seconds=0.3)], axis=-1)
    both = [c.audio[1] for c in pipe.stream_batch([b, a], chunk_seconds=0.3)]
    np.testing.assert_array_equal(np.concatenate(both, axis=-1), alone)
    np.testing.assert_array_equal(alone, pipe.generate_batch([a]).audio[0])


def test_several_windows_and_lengths(mlx_folder):
    # A 1 s window: the long row slides over 3 windows, the short row fits one and uses its melody
    # whole, as it would alone.
    pipe = cached_pipe(mlx_folder("melody"), 1.0)
    a = Request(SHORT, 0.9, seed=2, greedy=True, melody=melody_tones(4.0))
    b = Request(LONG, 2.5, seed=5, greedy=True, melody=melody_tones(2.0))
    both = pipe.generate_batch([a, b])
    for i, r in enumerate((a, b)):
        alone = pipe.generate_batch([r])
        np.testing.assert_array_equal(both.codes[i], alone.codes[0])
        np.testing.assert_array_equal(both.audio[i], alone.audio[0])


def _cli_batch(prompts: Path, model: Path, out: Path, batch_size: int) -> dict[str, str]:
    r = subprocess.run([sys.executable, "-m", "mlx_music.cli", "batch", str(prompts), "--model", str(model),
                        "--out-dir", str(out), "--batch-size", str(batch_size), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    entries = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [e["status"] for e in entries] == ["ok"] * 4
    return {e["id"]: e["sha256"] for e in entries}


def test_cli_batch_sizes_give_identical_files(mlx_folder, tmp_path):
    tones, sr = melody_tones(3.0)
    sf.write(tmp_path / "hum.wav", tones, sr, subtype="FLOAT")
    rows = [{"id": "short", "prompt": SHORT, "duration": 0.6, "seed": 2, "greedy": True, "melody": "hum.wav"},
            {"id": "long", "prompt": LONG, "duration": 0.6, "seed": 2, "greedy": True, "melody": "hum.wav"},
            {"id": "short-plain", "prompt": SHORT, "duration": 0.4, "seed": 3},
            {"id": "long-plain", "prompt": LONG + " and more", "duration": 0.6, "seed": 4}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = mlx_folder("melody")
    one = _cli_batch(prompts, model, tmp_path / "one", 1)
    four = _cli_batch(prompts, model, tmp_path / "four", 4)
    assert one == four
    a, _ = sf.read(tmp_path / "one" / "short.wav")
    b, _ = sf.read(tmp_path / "one" / "long.wav")
    assert not np.array_equal(a, b)
