"""runtime/hub.py: resolve local folders and hub repo ids from a real on-disk HF cache, offline.

The cache is laid out the way huggingface_hub writes it (models--org--name/{blobs,snapshots,refs}),
in tmp, and HF_HUB_OFFLINE=1 guarantees no request leaves the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save as st_save

from mlx_music.runtime.hub import (IncompleteCheckpointError, ModelNotFoundError, NotConvertedError,
                                   checkpoint_problems, resolve_model_path)

COMMIT_A = "a" * 8 + hashlib.sha1(b"A").hexdigest()[8:]
COMMIT_B = hashlib.sha1(b"B").hexdigest()


def fake_checkpoint_files(tag: str = "x", shards: int = 2) -> dict[str, bytes]:
    """Bytes of a small but structurally complete MLX checkpoint (config, index, shards, tokenizer,
    card, conversion record with sha256/size of every file)."""
    rng = np.random.default_rng(len(tag))
    files: dict[str, bytes] = {}
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {}
    for i, name in enumerate(names):
        tensors = {f"decoder.layers.{i}.fc1.weight": rng.standard_normal((8, 4)).astype(np.float32),
                   f"decoder.layers.{i}.fc2.weight": rng.standard_normal((4, 8)).astype(np.float32)}
        files[name] = st_save(tensors)
        weight_map.update({k: name for k in tensors})
    files["model.safetensors.index.json"] = json.dumps(
        {"metadata": {"format": "mlx"}, "weight_map": weight_map}, indent=2).encode()
    files["config.json"] = json.dumps({"format": "mlx-music", "format_version": 1, "model_type": "musicgen",
                                       "variant": f"musicgen-{tag}", "dtype": "float32"}).encode()
    files["tokenizer.json"] = json.dumps({"version": "1.0", "model": {"type": "Unigram"}}).encode()
    files["README.md"] = f"---\nlibrary_name: mlx\n---\n# {tag}\n".encode()
    record = {"converter": "mlx-music 0.1.0", "dtype": "float32",
              "files": {n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)}
                        for n, b in sorted(files.items())}}
    files["conversion.json"] = json.dumps(record, indent=2).encode()
    return files


def write_folder(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def write_cache_repo(cache: Path, repo_id: str, snapshots: dict[str, dict[str, bytes]],
                     refs: dict[str, str]) -> Path:
    """Lay out `repo_id` in an HF hub cache like huggingface_hub does: content-addressed blobs,
    per-commit snapshot folders of relative symlinks, refs/<name> files holding a commit hash."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for commit, files in snapshots.items():
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            # LFS files are keyed by sha256, regular files by their git blob sha1.
            if name.endswith(".safetensors"):
                blob = hashlib.sha256(data).hexdigest()
            else:
                blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            (repo / "blobs" / blob).write_bytes(data)
            link = snap / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))
    for ref, commit in refs.items():
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no trailing newline, as huggingface_hub writes it
    return repo


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf_home" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # belt and braces: nothing listens there
    write_cache_repo(cache, "org/musicgen-small-mlx",
                     {COMMIT_A: fake_checkpoint_files("old"), COMMIT_B: fake_checkpoint_files("new", shards=3)},
                     {"main": COMMIT_B, "v1": COMMIT_A})
    unconverted = {"config.json": json.dumps({"model_type": "musicgen"}).encode(),
                   "model.safetensors": st_save({"x": np.zeros(2, np.float32)})}
    write_cache_repo(cache, "facebook/musicgen-small", {COMMIT_A: unconverted}, {"main": COMMIT_A})
    partial = fake_checkpoint_files("partial")
    del partial["model-00002-of-00002.safetensors"]
    write_cache_repo(cache, "org/partial-mlx", {COMMIT_A: partial}, {"main": COMMIT_A})
    return cache


def _variant(folder: Path) -> str:
    return json.loads((folder / "config.json").read_text())["variant"]


def test_local_folder_returned_as_is(tmp_path):
    folder = write_folder(tmp_path / "ckpt", fake_checkpoint_files())
    assert resolve_model_path(folder) == folder
    assert resolve_model_path(str(folder)) == folder
    assert checkpoint_problems(folder) == []


def test_local_folder_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist") as e:
        resolve_model_path(str(tmp_path / "nope"))
    assert str(tmp_path / "nope") in str(e.value) and "\n" not in str(e.value)
    folder = write_folder(tmp_path / "ckpt", fake_checkpoint_files())
    (folder / "model-00002-of-00002.safetensors").unlink()
    (folder / "tokenizer.json").unlink()
    with pytest.raises(IncompleteCheckpointError) as e:
        resolve_model_path(folder)
    msg = str(e.value)
    assert "model-00002-of-00002.safetensors" in msg and "tokenizer.json missing" in msg and "\n" not in msg
    with pytest.raises(ModelNotFoundError, match="revision"):
        resolve_model_path(write_folder(tmp_path / "ok", fake_checkpoint_files()), revision="main")
    cfg = tmp_path / "ok" / "config.json"
    cfg.write_text(json.dumps({"model_type": "musicgen"}))
    with pytest.raises(IncompleteCheckpointError, match="not 'mlx-music'"):
        resolve_model_path(tmp_path / "ok")


def test_offline_resolves_from_cache(offline_cache):
    main = resolve_model_path("org/musicgen-small-mlx")
    assert main == offline_cache / "models--org--musicgen-small-mlx" / "snapshots" / COMMIT_B
    assert _variant(main) == "musicgen-new" and (main / "model-00003-of-00003.safetensors").is_file()
    assert resolve_model_path("org/musicgen-small-mlx", revision="main") == main
    by_commit = resolve_model_path("org/musicgen-small-mlx", revision=COMMIT_A)
    assert by_commit.name == COMMIT_A and _variant(by_commit) == "musicgen-old"
    by_tag = resolve_model_path("org/musicgen-small-mlx", revision="v1")
    assert by_tag == by_commit
    # Files are readable through the blob symlinks.
    assert json.loads((by_tag / "conversion.json").read_text())["converter"].startswith("mlx-music")


def test_hf_home_only(offline_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE")
    assert resolve_model_path("org/musicgen-small-mlx").parent.parent.parent == offline_cache


def test_offline_missing_repo_and_revision(offline_cache):
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model_path("org/does-not-exist")
    msg = str(e.value)
    assert "org/does-not-exist@main" in msg and "HF_HUB_OFFLINE=1" in msg and "\n" not in msg
    with pytest.raises(ModelNotFoundError, match="org/musicgen-small-mlx@v9"):
        resolve_model_path("org/musicgen-small-mlx", revision="v9")
    with pytest.raises(ModelNotFoundError, match="f" * 40):
        resolve_model_path("org/musicgen-small-mlx", revision="f" * 40)


def test_offline_unconverted_and_partial(offline_cache):
    with pytest.raises(IncompleteCheckpointError, match="facebook/musicgen-small@main is not an MLX checkpoint"):
        resolve_model_path("facebook/musicgen-small")
    with pytest.raises(IncompleteCheckpointError, match="model-00002-of-00002.safetensors"):
        resolve_model_path("org/partial-mlx")


def test_not_converted_is_told_apart_from_incomplete(offline_cache, tmp_path):
    """An original (PyTorch) repo or folder raises NotConvertedError, carrying what the converter
    needs (folder, repo id, commit); an MLX checkpoint that lost files does not."""
    with pytest.raises(NotConvertedError) as e:
        resolve_model_path("facebook/musicgen-small")
    assert e.value.repo_id == "facebook/musicgen-small" and e.value.revision == COMMIT_A
    assert e.value.folder == offline_cache / "models--facebook--musicgen-small" / "snapshots" / COMMIT_A
    plain = write_folder(tmp_path / "pt", {"config.json": json.dumps({"model_type": "musicgen"}).encode()})
    with pytest.raises(NotConvertedError) as e:
        resolve_model_path(plain)
    assert e.value.folder == plain and e.value.repo_id is None and "not an MLX checkpoint" in str(e.value)
    audiocraft = write_folder(tmp_path / "ac", {"state_dict.bin": b"x"})  # no config.json at all
    with pytest.raises(NotConvertedError):
        resolve_model_path(audiocraft)
    lost = write_folder(tmp_path / "lost", fake_checkpoint_files())
    (lost / "config.json").unlink()
    with pytest.raises(IncompleteCheckpointError) as e:
        resolve_model_path(lost)
    assert not isinstance(e.value, NotConvertedError) and "config.json missing" in str(e.value)
    with pytest.raises(IncompleteCheckpointError) as e:
        resolve_model_path("org/partial-mlx")
    assert not isinstance(e.value, NotConvertedError)


def test_bad_ids(offline_cache):
    for bad in ("org/name/extra", "a b/c", "./relative/missing"):
        with pytest.raises(ModelNotFoundError):
            resolve_model_path(bad)
