"""An unconverted hub repo / folder named as --model (or to mlx_music.load) is converted once into
the conversion cache and loaded from there (converters/autoconvert.py, `mlx-music cache`).

The Hugging Face cache is a real on-disk layout in tmp (models--org--name/{blobs,snapshots,refs})
holding the tiny random-weight stereo MusicGen of tests/data, unconverted; HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import mlx_music  # noqa: F401 - before mlx.core (binds MLX's CPU BLAS)
import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from mlx_music.cli import main
from mlx_music.converters.autoconvert import cache_dir, list_cache, remove_cache, resolve_model
from mlx_music.runtime.checkpoint import verify_checkpoint
from tests.test_hub import write_cache_repo

TINY = Path(__file__).parent / "data" / "tiny-musicgen-stereo"
COMMIT_A = hashlib.sha1(b"tiny-a").hexdigest()
COMMIT_B = hashlib.sha1(b"tiny-b").hexdigest()
ON_CPU = mx.default_device().type == mx.DeviceType.cpu


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """HF_HOME/hub holding org/tiny unconverted: main -> COMMIT_B, tag v1 -> COMMIT_A (other weights)."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("MLX_MUSIC_CACHE", raising=False)
    files = {p.name: p.read_bytes() for p in TINY.iterdir()}
    from safetensors.numpy import load as st_load, save as st_save

    other = st_load(files["model.safetensors"])
    key = next(k for k in sorted(other) if k.endswith("fc1.weight"))
    other[key] = other[key] * 0.5  # v1 really holds other weights
    write_cache_repo(home / "hub", "org/tiny", {COMMIT_B: files, COMMIT_A: {**files, "model.safetensors": st_save(other)}},
                     {"main": COMMIT_B, "v1": COMMIT_A})
    return home


def _gen(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, ["generate", "--prompt", "calm piano", "--duration", "0.2", "--seed", "3",
                                  "--quiet", *args])
    return r.exit_code, r.stdout, r.stderr


def _entries() -> list[str]:
    return sorted(p.name for p in cache_dir().iterdir()) if cache_dir().is_dir() else []


def test_generate_converts_once_then_loads_from_the_cache(hf_cache, tmp_path):
    rc, out, err = _gen("--model", "org/tiny", "--out", str(tmp_path / "a.wav"))
    assert rc == 0, err
    entry = f"org--tiny--{COMMIT_B[:12]}--float32"
    assert cache_dir() == hf_cache / "mlx-music"  # beside the hub cache
    assert _entries() == [entry]
    assert f"converting org/tiny (revision {COMMIT_B}, float32) once into the cache" in err
    folder = cache_dir() / entry
    assert verify_checkpoint(folder, "exact").config["format"] == "mlx-music"
    record = json.loads((folder / "conversion.json").read_text())
    assert record["source"]["repo_id"] == "org/tiny" and record["source"]["revision"] == COMMIT_B
    stamp = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    rc, out, err = _gen("--model", "org/tiny", "--out", str(tmp_path / "b.wav"))
    assert rc == 0, err
    assert "converting" not in err and _entries() == [entry]
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamp  # not written again
    a, sr = sf.read(tmp_path / "a.wav")
    b, _ = sf.read(tmp_path / "b.wav")
    assert sr == 32000 and a.shape == (6400, 2) and np.array_equal(a, b) and np.abs(a).max() > 0

    # The same audio as from an explicit `mlx-music convert` of the same snapshot.
    snap = hf_cache / "hub" / "models--org--tiny" / "snapshots" / COMMIT_B
    r = CliRunner().invoke(main, ["convert", "--hf-path", str(snap), "--mlx-path", str(tmp_path / "conv"), "--quiet"])
    assert r.exit_code == 0, r.output
    rc, out, err = _gen("--model", str(tmp_path / "conv"), "--out", str(tmp_path / "c.wav"))
    assert rc == 0 and "converting" not in err and _entries() == [entry]  # an MLX checkpoint is used as is
    assert np.array_equal(sf.read(tmp_path / "c.wav")[0], a)


def test_settings_and_revision_choose_the_entry(hf_cache, tmp_path):
    # The tiny model's hidden size is 24: group size 32 quantizes its fc2 layers (input 96).
    rc, _, err = _gen("--model", "org/tiny", "-q", "--q-bits", "8", "--q-group-size", "32", "--out", str(tmp_path / "q.wav"))
    assert rc == 0, err
    q8 = f"org--tiny--{COMMIT_B[:12]}--float32-q8-g32"
    assert _entries() == [q8]
    cfg = json.loads((cache_dir() / q8 / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 8 and sorted(cfg["quantization"]["modules"]) == [
        "decoder.layers.0.fc2", "decoder.layers.1.fc2"]
    warned = [line for line in err.splitlines() if "slow on a CPU" in line]
    assert len(warned) == (1 if ON_CPU else 0)

    rc, _, err = _gen("--model", "org/tiny", "--dtype", "float16", "--revision", "v1", "--out", str(tmp_path / "h.wav"))
    assert rc == 0, err
    f16 = f"org--tiny--{COMMIT_A[:12]}--float16"
    assert _entries() == sorted([q8, f16])
    assert "slow on a CPU" not in err
    assert json.loads((cache_dir() / f16 / "config.json").read_text())["dtype"] == "float16"
    # The v1 weights really are the other commit's: the same seed gives other audio.
    assert not np.array_equal(sf.read(tmp_path / "q.wav")[0], sf.read(tmp_path / "h.wav")[0])

    # --dtype on an MLX checkpoint that is not in that dtype: one line naming the flag.
    rc, _, err = _gen("--model", str(cache_dir() / f16), "--dtype", "float32", "--out", str(tmp_path / "x.wav"))
    assert rc == 2 and err.startswith("error: --dtype 'float32': ") and "float16" in err and err.count("\n") == 1
    with pytest.raises(ValueError, match=r"^dtype 'float32'"):
        resolve_model(cache_dir() / f16, dtype="float32")
    with pytest.raises(ValueError, match=r"^quantize: "):
        resolve_model(cache_dir() / f16, quantize=4)
    from mlx_music.converters.convert import QuantizeOptions

    assert resolve_model(cache_dir() / q8, quantize=QuantizeOptions(8, 32)) == cache_dir() / q8


def test_cache_list_and_remove(hf_cache, tmp_path, monkeypatch):
    for extra in ([], ["-q"]):
        assert _gen("--model", "org/tiny", *extra, "--out", str(tmp_path / "o.wav"))[0] == 0
    r = CliRunner().invoke(main, ["cache", "list", "--json"])
    rows = json.loads(r.stdout)
    assert [(x["source"], x["revision"], x["settings"]) for x in rows] == [
        ("org/tiny", COMMIT_B, "float32"), ("org/tiny", COMMIT_B, "float32-q4-g64")]
    for x in rows:
        assert x["bytes"] == sum(p.stat().st_size for p in Path(x["path"]).rglob("*") if p.is_file()) > 10_000
    text = CliRunner().invoke(main, ["cache", "list"]).stdout
    assert f"org/tiny  revision {COMMIT_B[:12]}  float32-q4-g64" in text and "2 entries" in text

    r = CliRunner().invoke(main, ["cache", "remove", rows[1]["name"]])
    assert r.exit_code == 0 and f"removed {rows[1]['name']}" in r.stdout
    assert _entries() == [rows[0]["name"]]
    r = CliRunner().invoke(main, ["cache", "remove", "org/nope"])
    assert r.exit_code == 2 and r.stderr.startswith("error: org/nope: no such cached conversion") \
        and r.stderr.count("\n") == 1 and _entries() == [rows[0]["name"]]
    r = CliRunner().invoke(main, ["cache", "remove", "org/tiny"])  # by source: every entry of it
    assert r.exit_code == 0 and _entries() == [] and list_cache() == []

    # MLX_MUSIC_CACHE moves the cache.
    monkeypatch.setenv("MLX_MUSIC_CACHE", str(tmp_path / "elsewhere"))
    assert _gen("--model", "org/tiny", "--out", str(tmp_path / "o.wav"))[0] == 0
    assert [p.name for p in (tmp_path / "elsewhere").iterdir()] == [f"org--tiny--{COMMIT_B[:12]}--float32"]
    assert not (hf_cache / "mlx-music").exists() or _entries() == [f"org--tiny--{COMMIT_B[:12]}--float32"]
    assert [e.name for e in remove_cache(everything=True)] == [f"org--tiny--{COMMIT_B[:12]}--float32"]


def test_local_folder_api_fingerprint_and_damage(hf_cache, tmp_path):
    import mlx_music

    src = tmp_path / "my-finetune"
    shutil.copytree(TINY, src)
    logs: list[str] = []
    first = resolve_model(src, log=logs.append, progress=False)
    assert first.parent == cache_dir() and first.name.startswith("local-my-finetune-") and len(logs) == 1
    assert resolve_model(src, log=logs.append, progress=False) == first and len(logs) == 1
    (src / ".git").mkdir()  # version control or tool caches in the folder are not the model
    (src / ".git" / "index").write_bytes(b"x" * 10)
    assert resolve_model(src, log=logs.append, progress=False) == first and len(logs) == 1
    model = mlx_music.load(src, progress=False)
    assert model.audio_channels == 2 and model.path == first

    # Editing the source folder (another file content, so another size or mtime) is a new revision.
    cfg = json.loads((src / "generation_config.json").read_text())
    cfg["_edited"] = True
    (src / "generation_config.json").write_text(json.dumps(cfg))
    second = resolve_model(src, log=logs.append, progress=False)
    assert second != first and len(logs) == 2 and len(list_cache()) == 2

    # A damaged entry (a shard removed by hand) is converted again, and verified.
    (second / "model.safetensors").unlink() if (second / "model.safetensors").exists() else \
        next(second.glob("model-*.safetensors")).unlink()
    assert resolve_model(src, log=logs.append, progress=False) == second
    assert "is damaged" in logs[-1] and verify_checkpoint(second, "exact")


def test_interrupted_conversion_leaves_no_entry(hf_cache, monkeypatch):
    from mlx_music.converters import safetensors_writer

    calls = {"n": 0}
    real = safetensors_writer.ShardWriter.write

    def dies(self, key, arr):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # as a Ctrl-C would, mid-shard
        return real(self, key, arr)

    monkeypatch.setattr(safetensors_writer.ShardWriter, "write", dies)
    with pytest.raises(KeyboardInterrupt):
        resolve_model("org/tiny", progress=False)
    assert calls["n"] == 5 and list_cache() == [] and [p for p in _entries() if not p.startswith(".")] == []
    monkeypatch.setattr(safetensors_writer.ShardWriter, "write", real)
    assert verify_checkpoint(resolve_model("org/tiny", progress=False), "exact")


def test_bin_source_without_torch_names_the_extra(hf_cache, tmp_path, monkeypatch):
    import torch
    from safetensors.numpy import load_file

    src = tmp_path / "bin-model"
    shutil.copytree(TINY, src)
    state = {k: torch.from_numpy(v.copy()) for k, v in load_file(src / "model.safetensors").items()}
    torch.save(state, src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails as if not installed
    rc, _, err = _gen("--model", str(src), "--out", str(tmp_path / "o.wav"))
    assert rc == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1] == "error: reading checkpoints needs torch: pip install 'mlx-music-toolkit[convert]'"
    assert list_cache() == [] and not (tmp_path / "o.wav").exists()
    # An audiocraft-format folder (torch pickles): the same line, from the API as a ValueError.
    from mlx_music.converters.errors import SourceError

    with pytest.raises(SourceError, match=r"^reading checkpoints needs torch: pip install 'mlx-music-toolkit\[convert\]'$"):
        resolve_model(Path(__file__).parent / "data" / "audiocraft" / "mono", progress=False)
    assert list_cache() == []


def test_batch_and_serve_take_an_unconverted_model(hf_cache, tmp_path, monkeypatch):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "calm piano", "duration": 0.2, "seed": 1}) + "\n")
    r = CliRunner().invoke(main, ["batch", str(prompts), "--model", "org/tiny", "--out-dir", str(tmp_path / "b"),
                                  "--quiet"])
    assert r.exit_code == 0, r.output
    entry = cache_dir() / f"org--tiny--{COMMIT_B[:12]}--float32"
    assert _entries() == [entry.name] and "converting org/tiny" in r.stderr
    rows = [json.loads(line) for line in (tmp_path / "b" / "results.jsonl").read_text().splitlines() if line]
    assert len(rows) == 1 and sf.info(str(tmp_path / "b" / rows[0]["file"])).frames == 6400

    import mlx_music.server

    seen = {}
    monkeypatch.setattr(mlx_music.server, "serve", lambda specs, **kw: seen.update(specs))
    r = CliRunner().invoke(main, ["serve", "--model", "tiny=org/tiny", "--model", str(entry)])
    assert r.exit_code == 0, r.output
    assert seen == {"tiny": str(entry), entry.name: str(entry)} and "converting" not in r.stderr


def test_convert_q_on_a_cpu_warns_once(tmp_path):
    """musicgen-small q8 runs at 1.7 steps/s on a CPU against 13.7 in fp32: `convert -q` says so on
    a CPU device (one line), and says nothing when nothing was quantized."""
    r = CliRunner().invoke(main, ["convert", "--hf-path", str(TINY), "--mlx-path", str(tmp_path / "q"), "--quiet",
                                  "-q", "--q-bits", "8", "--q-group-size", "32"])
    assert r.exit_code == 0, r.output
    warned = [line for line in r.stderr.splitlines() if line.startswith("warning: ") and "slow on a CPU" in line]
    assert len(warned) == (1 if ON_CPU else 0) and "quantized 2 modules" in r.stdout
    r = CliRunner().invoke(main, ["convert", "--hf-path", str(TINY), "--mlx-path", str(tmp_path / "n"), "--quiet", "-q"])
    assert r.exit_code == 0 and "slow on a CPU" not in r.stderr  # group size 64: nothing quantized


def test_audiocraft_folder_converts_once(tmp_path, monkeypatch):
    """An audiocraft-format folder (state_dict.bin + compression_state_dict.bin; its T5 from the
    HF cache) as load()'s source: converted once, the same model as an explicit convert."""
    import mlx_music
    from mlx_music.converters.convert import convert_checkpoint

    monkeypatch.setenv("HF_HUB_CACHE", str(Path(__file__).parent / "data" / "audiocraft" / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MLX_MUSIC_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "mono"
    shutil.copytree(Path(__file__).parent / "data" / "audiocraft" / "mono", src)
    logs: list[str] = []
    folder = resolve_model(src, log=logs.append, progress=False)
    assert resolve_model(src, log=logs.append, progress=False) == folder and len(logs) == 1
    source = json.loads((folder / "conversion.json").read_text())["source"]
    assert (source["format"], source["path"]) == ("audiocraft", str(src.resolve()))
    convert_checkpoint(src, tmp_path / "explicit", progress=False)
    a = mlx_music.load(src, progress=False).generate("calm piano", duration=0.2, seed=5).audio[0]
    b = mlx_music.load(tmp_path / "explicit").generate("calm piano", duration=0.2, seed=5).audio[0]
    assert a.shape == (1, 6400) and np.array_equal(a, b) and np.abs(a).max() > 0
