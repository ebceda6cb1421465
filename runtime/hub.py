"""Resolve a local folder or a Hugging Face hub repo id to a local folder: `--model` (an MLX
checkpoint, resolve_model_path) and `convert --hf-path` (a PyTorch checkpoint, resolve_source).

Hub repos are fetched with `huggingface_hub.snapshot_download`, restricted to the files an MLX
checkpoint needs, so the standard HF cache (HF_HOME / HF_HUB_CACHE), tokens and offline mode all
work as users expect. Environment variables are read at *call* time (huggingface_hub freezes them at
import), so setting HF_HUB_OFFLINE=1 or HF_HUB_CACHE after import is honoured too.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mlx_music.runtime.checkpoint import (METADATA_FILES, RECORD, MissingFilesError, checkpoint_problems,
                                          config_problems, verify_checkpoint)

__all__ = ["ALLOW_PATTERNS", "IncompleteCheckpointError", "ModelNotFoundError", "NotConvertedError", "Source",
           "checkpoint_problems", "hub_cache_dir", "resolve_model_path", "resolve_source"]

# Everything an MLX checkpoint folder can contain (notes/SPEC.md); nothing else is downloaded.
ALLOW_PATTERNS = [*METADATA_FILES, "*.safetensors", RECORD]

_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class ModelNotFoundError(FileNotFoundError):
    """The model folder / hub repo / revision cannot be resolved. str() is one line."""


class IncompleteCheckpointError(ModelNotFoundError):
    """The folder exists but is not a complete MLX checkpoint."""


class NotConvertedError(IncompleteCheckpointError):
    """The folder or hub snapshot holds a model that is not an MLX checkpoint at all (an original
    PyTorch / transformers or audiocraft checkpoint): converters.autoconvert converts it.

    folder: the local folder, or the hub snapshot (holding config.json only, when there is one);
    repo_id / revision: the hub repo and the commit it resolved to (None for a local folder)."""

    def __init__(self, message: str, folder: Path, repo_id: str | None = None, revision: str | None = None):
        super().__init__(message)
        self.folder, self.repo_id, self.revision = folder, repo_id, revision


def _unconverted(folder: Path, problems: list[str]) -> bool:
    """config.json says "not an MLX checkpoint" (absent, or another format), and nothing of an MLX
    checkpoint is there (a conversion record means an MLX checkpoint that lost files)."""
    return bool(problems) and problems[0].startswith("config.json") and not (folder / RECORD).exists()


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def is_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set *now*, or as huggingface_hub saw at import."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub would use given the current environment."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expanduser(os.path.expandvars(os.environ[var])))
    if os.environ.get("HF_HOME"):
        return Path(os.path.expanduser(os.path.expandvars(os.environ["HF_HOME"]))) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _looks_like_path(s: str) -> bool:
    return (s.startswith((".", "/", "~", "\\")) or s.count("/") > 1 or os.sep != "/" and os.sep in s
            or not _REPO_ID.match(s))


def _check_local(folder: Path, label: str) -> Path:
    problems = config_problems(folder)
    if _unconverted(folder, problems):
        raise NotConvertedError(f"{label} is not an MLX checkpoint: {problems[0]}", folder)
    try:
        verify_checkpoint(folder, "files")
    except MissingFilesError as e:
        raise IncompleteCheckpointError(f"{label} is not a complete MLX checkpoint: {'; '.join(e.problems)}") from None
    return folder


def _local_folder(raw: str, revision: str | None, what: str, kind: str) -> Path | None:
    """The existing local folder `raw`, None when `raw` can only be a hub repo id; else raise."""
    local = Path(os.path.expanduser(raw))
    if local.exists():
        if not local.is_dir():
            raise ModelNotFoundError(f"{what} path {raw} is a file; expected {kind} folder")
        if revision is not None:
            raise ModelNotFoundError(f"revision {revision} only applies to hub repo ids, not the local folder {raw}")
        return local
    if _looks_like_path(raw):
        raise ModelNotFoundError(f"{what} folder {raw} does not exist (and it is not a valid hub repo id 'org/name')")
    return None


class _HubRepo:
    """One hub repo id at a revision, read through huggingface_hub with the settings of the current
    environment; every huggingface_hub failure becomes a one-line ModelNotFoundError."""

    def __init__(self, repo_id: str, revision: str | None, token: str | bool | None, cache_dir: str | Path | None):
        self.repo_id, self.revision, self.token = repo_id, revision, token
        self.offline = is_offline()
        # huggingface_hub freezes HF_ENDPOINT at import (and builds file URLs from it): read it now.
        self.endpoint = os.environ.get("HF_ENDPOINT") or None
        self.cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
        self.at = f"{repo_id}@{revision or 'main'}"

    def _call(self, fn):
        try:
            from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, IncompleteSnapshotError,
                                                LocalEntryNotFoundError, RepositoryNotFoundError,
                                                RevisionNotFoundError)
        except ImportError as e:  # pragma: no cover - huggingface_hub is a hard dependency
            raise ModelNotFoundError(f"{self.repo_id}: huggingface_hub is needed to download hub models ({e})") from None
        raw, at, where = self.repo_id, self.at, f"the local Hugging Face cache ({self.cache})"
        if Path(raw.split("/")[0]).is_dir():  # "out/modle": more likely a mistyped local folder
            at = f"no local folder {raw}; as a hub repo id, {at}"
        try:
            return fn()
        except RevisionNotFoundError:
            raise ModelNotFoundError(f"revision {self.revision!r} not found in hub repo {raw}") from None
        except GatedRepoError:
            raise ModelNotFoundError(f"hub repo {raw} is gated: accept its terms on the Hub and log in "
                                     "(`hf auth login` or HF_TOKEN)") from None
        except RepositoryNotFoundError:
            lead = f"{at.split(';')[0]}; " if at.startswith("no local folder") else ""
            raise ModelNotFoundError(f"{lead}hub repo {raw} not found (or private: log in with `hf auth login` "
                                     "or set HF_TOKEN)") from None
        except IncompleteSnapshotError as e:
            raise IncompleteCheckpointError(f"{at}: {str(e).splitlines()[0]}") from None
        except LocalEntryNotFoundError:
            if self.offline:
                raise ModelNotFoundError(f"{at}: not in {where}, and HF_HUB_OFFLINE=1 forbids "
                                         "downloading it") from None
            raise ModelNotFoundError(f"{at}: the Hub cannot be reached and the model is not in {where}") from None
        except HfHubHTTPError as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ModelNotFoundError(f"{at}: Hub request failed ({msg})") from None
        except (ValueError, OSError) as e:  # HFValidationError (bad id/revision), disk
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ModelNotFoundError(f"{at}: {msg}") from None

    def download(self, patterns: list[str], revision: str | None = ...) -> Path:
        """snapshot_download of the files matching `patterns` (only looked up in the cache offline)."""
        from huggingface_hub import snapshot_download

        rev = self.revision if revision is ... else revision
        return Path(self._call(lambda: snapshot_download(
            self.repo_id, revision=rev, allow_patterns=patterns, cache_dir=str(self.cache),
            local_files_only=self.offline, token=self.token, endpoint=self.endpoint)))

    def list_files(self, revision: str | None) -> list[str]:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.endpoint, token=self.token)
        return self._call(lambda: api.list_repo_files(self.repo_id, revision=revision))

    @staticmethod
    def commit_of(snapshot: Path) -> str | None:
        """The commit hash a cache snapshot folder is named after (.../snapshots/<sha>), else None."""
        return snapshot.name if snapshot.parent.name == "snapshots" and _COMMIT.match(snapshot.name) else None


def resolve_model_path(path_or_repo_id: str | os.PathLike, revision: str | None = None, *,
                       token: str | bool | None = None, cache_dir: str | Path | None = None) -> Path:
    """Return a local folder holding the MLX checkpoint `path_or_repo_id`.

    * An existing local folder is validated and returned as is (`revision` must be None).
    * Otherwise it is a hub repo id ("org/name"): the checkpoint files are fetched into (or, with
      HF_HUB_OFFLINE=1, only looked up in) the HF cache at `revision` (branch, tag or commit hash).

    Raises ModelNotFoundError (IncompleteCheckpointError for a folder/snapshot missing files, its
    subclass NotConvertedError for a model that is not an MLX checkpoint at all, e.g. an original
    PyTorch repo) with a one-line message naming the path or repo id and revision.
    """
    raw = os.fspath(path_or_repo_id)
    local = _local_folder(raw, revision, "model", "an MLX checkpoint")
    if local is not None:
        return _check_local(local, f"folder {raw}")
    hub = _HubRepo(raw, revision, token, cache_dir)
    # First config.json alone: an unconverted PyTorch repo (e.g. facebook/musicgen-small) is
    # rejected before gigabytes of weights are downloaded.
    head = hub.download(["config.json"])
    problems = config_problems(head)
    if problems:
        msg = f"hub repo {hub.at} is not an MLX checkpoint: {problems[0]}"
        if _unconverted(head, problems):
            raise NotConvertedError(msg, head, raw, hub.commit_of(head) or revision)
        raise IncompleteCheckpointError(msg)
    # Pin the second fetch to the commit just resolved, so both come from the same snapshot.
    folder = hub.download(ALLOW_PATTERNS, hub.commit_of(head) or revision)
    return _check_local(folder, f"hub repo {hub.at} ({'cached' if hub.offline else 'downloaded'} snapshot {folder})")


@dataclass
class Source:
    """A Hugging Face (PyTorch) checkpoint resolved to a local folder, for the converter."""

    folder: Path
    repo_id: str | None = None
    revision: str | None = None  # the commit hash when known (hub cache snapshot), else as asked


def resolve_source(path_or_repo_id: str | os.PathLike, files: list[str], weights: dict[str, list[str]],
                   revision: str | None = None, *, token: str | bool | None = None,
                   cache_dir: str | Path | None = None) -> Source:
    """Resolve a Hugging Face checkpoint (`convert --hf-path`): a local folder as is, or a hub repo id.

    From the hub, `files` (patterns: config, tokenizer, ...) are fetched together with one weight
    format: the first of `weights` (format -> patterns, in order of preference) the repo holds; the
    others are never downloaded. Offline the repo cannot be listed, so whatever format the cache
    holds is used. Same cache, token, offline and error behaviour as resolve_model_path.
    """
    raw = os.fspath(path_or_repo_id)
    local = _local_folder(raw, revision, "hf_path", "a Hugging Face checkpoint")
    if local is not None:
        return Source(local.resolve())
    hub = _HubRepo(raw, revision, token, cache_dir)
    all_weights = [p for pats in weights.values() for p in pats]
    if hub.offline:
        folder = hub.download(list(files) + all_weights)
        return Source(folder, raw, hub.commit_of(folder) or revision)
    head = hub.download(["config.json"])
    pinned = hub.commit_of(head) or revision
    listing = hub.list_files(pinned)
    for patterns in weights.values():
        if any(fnmatch.fnmatch(f, pat) for f in listing for pat in patterns):
            folder = hub.download(list(files) + list(patterns), pinned)
            return Source(folder, raw, hub.commit_of(folder) or revision)
    raise ModelNotFoundError(f"hub repo {hub.at} holds no model weights (looked for {', '.join(all_weights)})")
