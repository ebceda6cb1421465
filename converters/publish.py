"""Upload a converted MLX checkpoint folder to the Hugging Face Hub.

`publish()` refuses to upload anything that is not a complete, self-consistent checkpoint: every
file the runtime needs must be present and match the size and sha256 recorded in conversion.json
(a half-copied shard uploaded to the Hub is far more expensive to notice than to check here).
Only the recorded checkpoint files are uploaded; stray files in the folder are left out.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable

from mlx_music.runtime.checkpoint import RECORD, CheckpointError, verify_checkpoint

from .model_card import REPO_PLACEHOLDER
from mlx_music.runtime.records import loads_json

_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class PublishError(ValueError):
    """The folder, repo id, token or upload is not acceptable. str() is one line."""


def validate_repo_id(repo_id: str) -> str:
    """Check the Hub's repo-id rules for `org/name` (raises PublishError)."""
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    ok = len(parts) == 2 and all(
        _REPO_PART.match(p) and not p.endswith((".", "-")) and ".." not in p and "--" not in p
        and len(p) <= 96 for p in parts) and not parts[1].endswith(".git")
    if not ok:
        raise PublishError(f"invalid repo id {repo_id!r}: expected 'org/name' (letters, digits, '-', '_', '.'; "
                           "no '--' or '..', at most 96 characters each)")
    return repo_id


def find_token(token: str | None = None) -> str | None:
    """The token to upload with: argument, then HF_TOKEN, then huggingface_hub's stored login."""
    if token:
        return token
    env = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if env and env.strip():
        return env.strip()
    try:
        import huggingface_hub

        return huggingface_hub.get_token()
    except Exception:  # a broken stored-token file must not hide the clear "no token" error below
        return None



def validate_folder(folder: str | Path) -> list[tuple[str, int]]:
    """Validate an MLX checkpoint folder for publishing; return [(relative path, size)] to upload.

    The folder must pass runtime.checkpoint.verify_checkpoint at level "exact": every checkpoint
    file listed in conversion.json with the size and sha256 it has. Raises PublishError (one line).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError(f"{folder}: not a folder")
    try:
        files = verify_checkpoint(folder, "exact").record["files"]
    except CheckpointError as e:
        raise PublishError(str(e)) from None
    plan = [(n, files[n]["size"]) for n in sorted(files)]
    plan.append((RECORD, (folder / RECORD).stat().st_size))
    return sorted(plan)


def _card_fill(folder: Path, repo_id: str) -> dict[str, bytes]:
    """New bytes for README.md (placeholder repo id -> `repo_id`) and conversion.json (README's
    updated sha256/size), or {} when the card needs no change."""
    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    text = readme.read_text(encoding="utf-8")
    if REPO_PLACEHOLDER not in text:
        return {}
    new = text.replace(REPO_PLACEHOLDER, repo_id).encode("utf-8")
    record = loads_json((folder / RECORD).read_text(encoding="utf-8"))
    record["files"]["README.md"] = {"sha256": hashlib.sha256(new).hexdigest(), "size": len(new)}
    return {"README.md": new, RECORD: (json.dumps(record, indent=2) + "\n").encode("utf-8")}


def _fnmatch_escape(name: str) -> str:
    # upload_folder's allow_patterns are fnmatch patterns; make each file name match only itself.
    return re.sub(r"([*?\[])", r"[\1]", name)


def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def publish(folder: str | Path, repo_id: str, private: bool = False, dry_run: bool = False,
            token: str | None = None, revision: str | None = None, commit_message: str | None = None,
            *, endpoint: str | None = None, log: Callable[[str], None] | None = print) -> list[str]:
    """Upload the MLX checkpoint in `folder` to the Hub model repo `repo_id`.

    Returns the relative paths uploaded (or, with dry_run, that would be uploaded), sorted.
    `log` receives human-readable lines (the file list with sizes; None = silent). `endpoint`
    defaults to HF_ENDPOINT (read now) or huggingface.co. `revision` is a branch, created if
    missing. If README.md still has the placeholder repo id, it is filled in with `repo_id`
    (README.md and its conversion.json entry are rewritten; not in a dry run).
    """
    say = log or (lambda _line: None)
    folder = Path(folder)
    validate_repo_id(repo_id)
    tok = find_token(token)
    if tok is None and not dry_run:
        raise PublishError(f"no Hugging Face token to upload {repo_id}: pass token=TOKEN, set HF_TOKEN, "
                           "or run `hf auth login`")
    plan = dict(validate_folder(folder))
    fill = _card_fill(folder, repo_id)
    plan.update({name: len(data) for name, data in fill.items()})
    names = sorted(plan)

    total = sum(plan.values())
    target = f"{repo_id}" + (f"@{revision}" if revision else "")
    say(f"{'Would upload' if dry_run else 'Uploading'} {len(names)} files ({total:,} bytes) "
        f"to {'private ' if private else ''}model repo {target}:")
    for n in names:
        say(f"  {plan[n]:>14,}  {n}")
    if dry_run:
        return names

    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=tok)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        # The filled-in README and record go up from memory: the folder is only changed after a
        # successful upload, so a failed publish leaves it exactly as it was.
        ops = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=fill[n] if n in fill else str(folder / n))
               for n in names]
        info = api.create_commit(repo_id, ops, repo_type="model", revision=revision,
                                 commit_message=commit_message or f"Upload MLX checkpoint ({len(names)} files)")
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = {401: " (token invalid or expired)", 403: " (token lacks write access to this namespace)"}
        raise PublishError(f"upload to {target} failed: HTTP {status}{hint.get(status, '')}: "
                           f"{_one_line(e)}") from None
    except Exception as e:  # connection errors (httpx's are not OSError), malformed server answers
        raise PublishError(f"upload to {target} failed: {type(e).__name__}: {_one_line(e)}") from None
    for name, data in fill.items():  # README placeholder -> real repo id, record kept consistent
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, folder / name)
    say(f"Uploaded: {getattr(info, 'commit_url', info)}")
    return names
