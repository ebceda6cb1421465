"""Where the Hugging Face checkpoint comes from: a local folder in hub layout, or a hub repo id
(downloaded with huggingface_hub, only the files the manifest names, one weight format)."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import SourceError


@dataclass
class Source:
    folder: Path
    repo_id: str | None = None
    revision: str | None = None


def _looks_like_repo_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))


def resolve_source(hf_path: str, files: dict, revision: str | None = None) -> Source:
    """A local folder as is; a repo id through the hub cache (honours HF_HUB_OFFLINE)."""
    p = Path(hf_path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise SourceError(f"--hf-path {hf_path}: not a folder")
        return Source(p.resolve())
    if not _looks_like_repo_id(hf_path):
        raise SourceError(f"--hf-path {hf_path}: no such folder, and not a hub repo id (org/name)")
    return _download(hf_path, files, revision)


def _download(repo_id: str, files: dict, revision: str | None) -> Source:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    base = list(files["config"]) + list(files["tokenizer"]) + list(files.get("extra", []))
    weights = files["weights"]
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    # huggingface_hub freezes these at import; read them now so a late setting is honoured.
    cache_dir = os.environ.get("HF_HUB_CACHE") or (
        os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None)
    try:
        if offline:
            # Offline we cannot list the repo: take whatever weight format the cache holds.
            path = snapshot_download(repo_id, revision=revision, local_files_only=True, cache_dir=cache_dir,
                                     allow_patterns=base + [p for f in files["weights_preference"] for p in weights[f]])
            return Source(Path(path), repo_id, revision)
        listing = HfApi().list_repo_files(repo_id, revision=revision)
        for fmt in files["weights_preference"]:
            if any(fnmatch.fnmatch(f, pat) for f in listing for pat in weights[fmt]):
                path = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                         allow_patterns=base + list(weights[fmt]))
                return Source(Path(path), repo_id, revision)
        raise SourceError(f"{repo_id}: the repo holds no MusicGen weights (looked for "
                          f"{', '.join(p for f in files['weights_preference'] for p in weights[f])})")
    except RepositoryNotFoundError:
        raise SourceError(f"{repo_id}: repository not found on the hub (or it is gated/private)") from None
    except LocalEntryNotFoundError:
        raise SourceError(f"{repo_id}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set") from None
    except (HfHubHTTPError, OSError) as e:
        raise SourceError(f"{repo_id}: download failed ({str(e).splitlines()[0][:200]})") from None
