"""Resolve `--model` (a local MLX checkpoint folder or a Hugging Face hub repo id) to a folder.

Hub repos are fetched with `huggingface_hub.snapshot_download`, restricted to the files an MLX
checkpoint needs, so the standard HF cache (HF_HOME / HF_HUB_CACHE), tokens and offline mode all
work as users expect. Environment variables are read at *call* time (huggingface_hub freezes them at
import), so setting HF_HUB_OFFLINE=1 or HF_HUB_CACHE after import is honoured too.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mlx_music.runtime.checkpoint import (METADATA_FILES, RECORD, MissingFilesError, checkpoint_problems,
                                          config_problems, verify_checkpoint)

__all__ = ["ALLOW_PATTERNS", "IncompleteCheckpointError", "ModelNotFoundError", "checkpoint_problems",
           "resolve_model_path"]

# Everything an MLX checkpoint folder can contain (notes/SPEC.md); nothing else is downloaded.
ALLOW_PATTERNS = [*METADATA_FILES, "*.safetensors", RECORD]

_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class ModelNotFoundError(FileNotFoundError):
    """The model folder / hub repo / revision cannot be resolved. str() is one line."""


class IncompleteCheckpointError(ModelNotFoundError):
    """The folder exists but is not a complete MLX checkpoint."""


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
    try:
        verify_checkpoint(folder, "files")
    except MissingFilesError as e:
        raise IncompleteCheckpointError(f"{label} is not a complete MLX checkpoint: {'; '.join(e.problems)}") from None
    return folder


def resolve_model_path(path_or_repo_id: str | os.PathLike, revision: str | None = None, *,
                       token: str | bool | None = None, cache_dir: str | Path | None = None) -> Path:
    """Return a local folder holding the MLX checkpoint `path_or_repo_id`.

    * An existing local folder is validated and returned as is (`revision` must be None).
    * Otherwise it is a hub repo id ("org/name"): the checkpoint files are fetched into (or, with
      HF_HUB_OFFLINE=1, only looked up in) the HF cache at `revision` (branch, tag or commit hash).

    Raises ModelNotFoundError (IncompleteCheckpointError for a folder/snapshot missing files)
    with a one-line message naming the path or repo id and revision.
    """
    raw = os.fspath(path_or_repo_id)
    local = Path(os.path.expanduser(raw))
    if local.exists():
        if not local.is_dir():
            raise ModelNotFoundError(f"model path {raw} is a file; expected an MLX checkpoint folder")
        if revision is not None:
            raise ModelNotFoundError(f"--revision {revision} only applies to hub repo ids, not the local folder {raw}")
        return _check_local(local, f"folder {raw}")
    if _looks_like_path(raw):
        raise ModelNotFoundError(f"model folder {raw} does not exist (and it is not a valid hub repo id 'org/name')")

    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, IncompleteSnapshotError,
                                            LocalEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
    except ImportError as e:  # pragma: no cover - huggingface_hub is a hard dependency
        raise ModelNotFoundError(f"{raw}: huggingface_hub is needed to download hub models ({e})") from None

    offline = is_offline()
    # huggingface_hub freezes HF_ENDPOINT at import (and builds file URLs from it): read it now.
    endpoint = os.environ.get("HF_ENDPOINT") or None
    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    at = f"{raw}@{revision or 'main'}"
    where = f"the local HF cache ({cache})"

    def fetch(patterns: list[str], rev: str | None) -> Path:
        try:
            return Path(snapshot_download(raw, revision=rev, allow_patterns=patterns, cache_dir=str(cache),
                                          local_files_only=offline, token=token, endpoint=endpoint))
        except RevisionNotFoundError:
            raise ModelNotFoundError(f"revision {revision!r} not found in hub repo {raw}") from None
        except GatedRepoError:
            raise ModelNotFoundError(f"hub repo {raw} is gated: accept its terms on the Hub and log in "
                                     "(`hf auth login` or HF_TOKEN)") from None
        except RepositoryNotFoundError:
            raise ModelNotFoundError(f"hub repo {raw} not found (or private: log in with `hf auth login` "
                                     "or set HF_TOKEN)") from None
        except IncompleteSnapshotError as e:
            raise IncompleteCheckpointError(f"{at}: {str(e).splitlines()[0]}") from None
        except LocalEntryNotFoundError:
            if offline:
                raise ModelNotFoundError(f"{at} is not in {where} and HF_HUB_OFFLINE=1 forbids "
                                         "downloading it") from None
            raise ModelNotFoundError(f"{at}: the Hub cannot be reached and the model is not in {where}") from None
        except HfHubHTTPError as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ModelNotFoundError(f"{at}: Hub request failed ({msg})") from None
        except (ValueError, OSError) as e:  # HFValidationError (bad id/revision), IncompleteSnapshotError, disk
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ModelNotFoundError(f"{at}: {msg}") from None

    # First config.json alone: an unconverted PyTorch repo (e.g. facebook/musicgen-small) is
    # rejected before gigabytes of weights are downloaded.
    head = fetch(["config.json"], revision)
    problems = config_problems(head)
    if problems:
        raise IncompleteCheckpointError(f"hub repo {at} is not an MLX checkpoint: {problems[0]}")
    # Pin the second fetch to the commit just resolved, so both come from the same snapshot.
    pinned = head.name if head.parent.name == "snapshots" and _COMMIT.match(head.name) else revision
    folder = fetch(ALLOW_PATTERNS, pinned)
    return _check_local(folder, f"hub repo {at} ({'cached' if offline else 'downloaded'} snapshot {folder})")
