"""Bad-input matrix for `mlx-music publish` (real subprocesses).

Nothing here can reach the network: HF_ENDPOINT points at a local port nobody listens on, and
HF_HOME at an empty folder (no stored login). Each refused case: exit 2, one error line naming
the folder/file/repo id and what was expected, no traceback, and the folder is untouched byte for
byte (publish fills the model card's repo id in place, so a failed publish must not have done it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.test_reliability_convert import (CliRun, assert_cli_error, cli_env, copy_tree, free_port, prefetch,
                                            run_cli, selected_params, tree_digest)

SHARD = "model-00001-of-00001.safetensors"
TOKEN = "hf_reliability_test_token"


def _edit_record(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        rec = json.loads((folder / "conversion.json").read_text())
        edit(rec)
        (folder / "conversion.json").write_text(json.dumps(rec))
    return mutate


def _same_size_corruption(folder: Path) -> None:
    raw = bytearray((folder / SHARD).read_bytes())
    raw[-10] ^= 0x55
    (folder / SHARD).write_bytes(bytes(raw))


def _truncate(folder: Path) -> None:
    raw = (folder / SHARD).read_bytes()
    (folder / SHARD).write_bytes(raw[: len(raw) // 3])


@dataclass(frozen=True)
class PublishCase:
    name: str
    mutate: Callable[[Path], None]  # applied to a copy of a good MLX checkpoint
    needles: tuple[str, ...]  # "{f}" expands to the folder given on the command line
    repo: str = "me/tiny-musicgen-mlx"
    token: bool = True
    folder: str = "ckpt"  # what is passed as FOLDER, relative to the case folder
    extra: tuple[str, ...] = ()
    logs_plan: bool = False  # validation passed, so the upload plan was printed before the failure

    def __str__(self) -> str:
        return self.name


CASES = [
    PublishCase("no-token", lambda f: None, ("no Hugging Face token", "me/tiny-musicgen-mlx", "HF_TOKEN"), token=False),
    PublishCase("repo-id-no-slash", lambda f: None, ("invalid repo id 'tiny'", "org/name"), repo="tiny"),
    PublishCase("repo-id-three-parts", lambda f: None, ("invalid repo id 'a/b/c'", "org/name"), repo="a/b/c"),
    PublishCase("repo-id-double-dash", lambda f: None, ("invalid repo id 'me/x--y'", "--"), repo="me/x--y"),
    PublishCase("repo-id-traversal", lambda f: None, ("invalid repo id '../etc'", "org/name"), repo="../etc"),
    PublishCase("repo-id-space", lambda f: None, ("invalid repo id 'me/my model'",), repo="me/my model"),
    PublishCase("folder-missing", lambda f: None, ("{f}", "not a folder"), folder="nope"),
    PublishCase("folder-is-a-file", lambda f: None, ("{f}", "not a folder"), folder="ckpt/config.json"),
    PublishCase("folder-is-huggingface-checkpoint", lambda f: (f / "config.json").write_text('{"model_type": "musicgen"}'),
                ("{f}", "not a complete MLX checkpoint", "mlx-music convert")),
    PublishCase("shard-missing", lambda f: (f / SHARD).unlink(), ("{f}", "missing weight shard", SHARD)),
    PublishCase("shard-truncated", _truncate, ("{f}/" + SHARD, "size", "conversion.json")),
    PublishCase("shard-modified-same-size", _same_size_corruption, ("{f}/" + SHARD, "sha256", "conversion.json")),
    PublishCase("shard-truncated-dry-run", _truncate, ("{f}/" + SHARD, "size"), token=False, extra=("--dry-run",)),
    PublishCase("record-missing", lambda f: (f / "conversion.json").unlink(), ("{f}", "conversion.json missing")),
    PublishCase("record-path-traversal",
                _edit_record(lambda r: r["files"].__setitem__("../../etc/passwd", {"sha256": "0" * 64, "size": 1})),
                ("{f}", "invalid file name", "../../etc/passwd")),
    PublishCase("tokenizer-missing", lambda f: (f / "tokenizer.json").unlink(), ("{f}", "tokenizer.json missing")),
    PublishCase("unrecorded-shard", lambda f: (f / "model-extra.safetensors").write_bytes(b"x"),
                ("{f}", "model-extra.safetensors", "not listed in conversion.json")),
    # A valid folder, but the Hub cannot be reached: still one line, and the folder unchanged.
    PublishCase("hub-unreachable", lambda f: None, ("me/tiny-musicgen-mlx", "failed"), logs_plan=True),
]


def _job(case: PublishCase, good: Path, work: Path) -> Callable[[], tuple[CliRun, Path, dict]]:
    def job() -> tuple[CliRun, Path, dict]:
        (work / "hf-home").mkdir(parents=True)
        ckpt = copy_tree(good, work / "ckpt")
        case.mutate(ckpt)
        before = tree_digest(work)
        env = cli_env(HF_HOME=str(work / "hf-home"), HF_TOKEN=TOKEN if case.token else None,
                      HUGGING_FACE_HUB_TOKEN=None, HF_TOKEN_PATH=None, HF_HUB_OFFLINE=None,
                      HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", HF_HUB_DISABLE_TELEMETRY="1",
                      HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")
        args = ["publish", str(work / case.folder), "--repo", case.repo, *case.extra]
        return run_cli(args, env=env, timeout=120), work, before
    return job


@pytest.fixture(scope="module")
def results(request, mlx_folder, tmp_path_factory) -> dict[str, Future]:
    root = tmp_path_factory.mktemp("reliability-publish")
    good = mlx_folder("mono")
    return prefetch({c.name: _job(c, good, root / c.name) for c in selected_params(request)})


@pytest.mark.parametrize("case", CASES, ids=str)
def test_publish_refuses(case: PublishCase, results):
    run, work, before = results[case.name].result()
    assert_cli_error(run, "publish", [n.format(f=work / case.folder) for n in case.needles], stdout_ok=case.logs_plan)
    assert tree_digest(work) == before, "a refused publish modified the checkpoint folder"
