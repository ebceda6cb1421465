"""Bad-input matrix for loading MLX checkpoints: `runtime.load` (API) and `mlx-music generate --model`.

What the loader promises (runtime/loader.py, runtime/hub.py): sizes of weight files are checked
against conversion.json on every load, sha256 with verify=True / --verify; everything else that is
wrong with a folder (missing files, unreadable JSON, weights that do not fit config.json) is a
one-line CheckpointError / ModelNotFoundError naming the file or key. A refused load writes no
audio file: `--out` stays absent (or the previous file stays byte-for-byte the same).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mlx_music.runtime import load
from mlx_music.runtime.hub import IncompleteCheckpointError, ModelNotFoundError
from mlx_music.runtime.loader import CheckpointError
from tests.test_reliability_convert import (CliRun, assert_api_error, assert_cli_error, copy_tree, prefetch,
                                            run_cli, selected_params)

SHARD = "model-00001-of-00001.safetensors"
INDEX = "model.safetensors.index.json"
PREVIOUS_AUDIO = b"RIFF previous good output"


def _rewrite_record(folder: Path, name: str) -> None:
    """Make conversion.json agree with `name` again, so only the intended defect is left."""
    rec = json.loads((folder / "conversion.json").read_text())
    data = (folder / name).read_bytes()
    rec["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (folder / "conversion.json").write_text(json.dumps(rec, indent=2))


def _flip_byte(folder: Path) -> None:
    raw = bytearray((folder / SHARD).read_bytes())
    raw[-100] ^= 0xFF  # inside the tensor data: the header still parses, the size is unchanged
    (folder / SHARD).write_bytes(bytes(raw))


def _truncate(folder: Path) -> None:
    raw = (folder / SHARD).read_bytes()
    (folder / SHARD).write_bytes(raw[:-1000])


def _edit_json(name: str, edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        edit(data)
        (folder / name).write_text(json.dumps(data))
    return mutate


def _drop_scales(folder: Path) -> None:
    import mlx.core as mx

    weights = mx.load(str(folder / SHARD))
    key = "decoder.layers.0.fc1.scales"
    del weights[key]
    mx.save_safetensors(str(folder / SHARD), weights, metadata={"format": "mlx"})
    _edit_json(INDEX, lambda idx: idx["weight_map"].pop(key))(folder)
    _rewrite_record(folder, SHARD)


def _garbage_shard(folder: Path) -> None:
    size = (folder / SHARD).stat().st_size
    (folder / SHARD).write_bytes(b"\xff" * size)
    _rewrite_record(folder, SHARD)


@dataclass(frozen=True)
class LoadCase:
    name: str
    mutate: Callable[[Path], None]
    exc: type[BaseException]
    needles: tuple[str, ...]  # "{m}" expands to the model folder
    verify: bool = False
    quantized: bool = False
    cli: bool = False  # also run through `mlx-music generate --model`
    kwargs: Mapping[str, object] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.name


LOAD_CASES = [
    LoadCase("missing-shard", lambda m: (m / SHARD).unlink(), IncompleteCheckpointError,
             ("{m}", SHARD, "missing"), cli=True),
    LoadCase("sha256-differs-verify", _flip_byte, CheckpointError, ("{m}/" + SHARD, "sha256", "conversion record"),
             verify=True, cli=True),
    LoadCase("truncated-shard", _truncate, CheckpointError, ("{m}/" + SHARD, "size", "truncated"), cli=True),
    LoadCase("config-ffn-contradicts-weights", _edit_json("config.json", lambda c: c["decoder"].__setitem__("ffn_dim", 64)),
             CheckpointError, ("{m}", "config.json", "decoder.layers.0.fc1.weight")),
    LoadCase("config-layers-contradict-weights", _edit_json("config.json", lambda c: c["decoder"].__setitem__("num_layers", 3)),
             CheckpointError, ("{m}", "config.json", "decoder.layers.2")),
    LoadCase("quantized-missing-scales", _drop_scales, CheckpointError, ("{m}", "decoder.layers.0.fc1.scales"),
             quantized=True, cli=True),
    LoadCase("quantized-config-dropped", _edit_json("config.json", lambda c: c.__setitem__("quantization", None)),
             CheckpointError, ("{m}", "config.json", "scales"), quantized=True),
    LoadCase("config-not-json", lambda m: (m / "config.json").write_text("{"), IncompleteCheckpointError,
             ("{m}", "config.json unreadable")),
    LoadCase("config-is-huggingface", _edit_json("config.json", lambda c: c.pop("format")), IncompleteCheckpointError,
             ("{m}", "mlx-music convert")),
    LoadCase("tokenizer-missing", lambda m: (m / "tokenizer.json").unlink(), IncompleteCheckpointError,
             ("{m}", "tokenizer.json missing")),
    # A corrupt tokenizer.json must be reported like every other corrupt file (ValueError family).
    LoadCase("tokenizer-corrupt", lambda m: (m / "tokenizer.json").write_text('{"version": "1.0"}'), ValueError,
             ("{m}/tokenizer.json",), cli=True),
    LoadCase("index-not-json", lambda m: (m / INDEX).write_text("nah"), IncompleteCheckpointError,
             ("{m}", INDEX, "unreadable")),
    LoadCase("verify-without-record", lambda m: (m / "conversion.json").unlink(), CheckpointError,
             ("{m}/conversion.json", "verify=True"), verify=True),  # the API names its parameter
    # A hand-edited record (an entry without its size) must be named, not crash with KeyError.
    LoadCase("record-entry-malformed", _edit_json("conversion.json", lambda r: r["files"][SHARD].pop("size")),
             CheckpointError, ("{m}/conversion.json", SHARD), cli=True),
    LoadCase("shard-not-safetensors", _garbage_shard, CheckpointError, ("{m}/" + SHARD, "cannot read")),
    LoadCase("model-path-is-a-file", lambda m: None, ModelNotFoundError, ("config.json", "is a file"),
             kwargs={"path": "config.json"}),
]


@pytest.fixture(scope="module")
def sources(mlx_folder, hf_folder, tmp_path_factory) -> dict[bool, Path]:
    """quantized? -> a good MLX checkpoint to copy (fp32 from the shared fixture; a 4-bit one here)."""
    from mlx_music.converters.convert import QuantizeOptions, convert_checkpoint

    q = tmp_path_factory.mktemp("reliability-loader") / "mono-q4"
    convert_checkpoint(hf_folder("mono"), q, quantize=QuantizeOptions(4, 32), progress=False)
    return {False: mlx_folder("mono"), True: q}


def _prepare(case: LoadCase, sources: dict[bool, Path], work: Path) -> Path:
    model = copy_tree(sources[case.quantized], work / "model")
    case.mutate(model)
    return model


@pytest.mark.parametrize("case", LOAD_CASES, ids=str)
def test_load_refuses(case: LoadCase, sources, tmp_path):
    model = _prepare(case, sources, tmp_path)
    target = model / str(case.kwargs["path"]) if "path" in case.kwargs else model
    with pytest.raises(BaseException) as info:
        load(target, verify=case.verify)
    assert_api_error(info.value, case.exc, [n.format(m=model) for n in case.needles])


def test_sha256_is_only_checked_with_verify(sources, tmp_path):
    # Documented trade-off: a same-size corruption loads without --verify (hashing GBs on every
    # load is too slow), and is caught with it.
    model = copy_tree(sources[False], tmp_path / "model")
    _flip_byte(model)
    assert load(model).sample_rate == 32000
    with pytest.raises(CheckpointError, match="sha256"):
        load(model, verify=True)


# -- the same defects through `mlx-music generate --model` ---------------------------------------

CLI_CASES = [c for c in LOAD_CASES if c.cli]


def _cli_job(case: LoadCase, sources: dict[bool, Path], work: Path) -> Callable[[], tuple[CliRun, Path]]:
    def job() -> tuple[CliRun, Path]:
        work.mkdir(parents=True)
        model = _prepare(case, sources, work)
        (work / "song.wav").write_bytes(PREVIOUS_AUDIO)
        args = ["generate", "--model", model, "--prompt", "calm piano", "--duration", "0.1", "--seed", "0",
                "--out", work / "song.wav", "--quiet", *(["--verify"] if case.verify else [])]
        return run_cli(args), model
    return job


@pytest.fixture(scope="module")
def cli_results(request, sources, tmp_path_factory) -> dict[str, Future]:
    root = tmp_path_factory.mktemp("reliability-loader-cli")
    cases = [c for c in selected_params(request, "cli_case")]
    return prefetch({c.name: _cli_job(c, sources, root / c.name) for c in cases})


@pytest.mark.parametrize("cli_case", CLI_CASES, ids=str)
def test_generate_cli_refuses_bad_model(cli_case: LoadCase, cli_results):
    run, model = cli_results[cli_case.name].result()
    assert_cli_error(run, "generate", [n.format(m=model) for n in cli_case.needles])
    out = model.parent / "song.wav"
    assert out.read_bytes() == PREVIOUS_AUDIO, "the previous output file was modified"
    assert sorted(os.listdir(model.parent)) == ["model", "song.wav"], "stray files next to the output"
