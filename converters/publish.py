"""Upload a converted MLX checkpoint folder, or a trained LoRA adapter folder, to the Hugging Face Hub.

`publish()` refuses to upload anything that is not a complete, self-consistent checkpoint: every
file the runtime needs must be present and match the size and sha256 recorded in conversion.json
(a half-copied shard uploaded to the Hub is far more expensive to notice than to check here).
Only the recorded checkpoint files are uploaded; stray files in the folder are left out.

An adapter folder (the output of `mlx-music train`: ``adapter_config.json`` at its top) uploads the
MLX adapter (checked against its conversion.json), the PEFT copy in ``peft/`` (which must hold the
very same factors: a folder whose save was interrupted between the two, or an edited copy, is
refused), and the model card; the base model is named by its Hub id in the card and both configs.
Checkpoint or adapter, everything goes up in one commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable

from mlx_music.runtime import adapters as rt
from mlx_music.runtime.checkpoint import RECORD, CheckpointError, verify_checkpoint
from mlx_music.runtime.checksums import sha256_file
from mlx_music.runtime.records import loads_json

from .model_card import (ADAPTER_PLACEHOLDER, BASE_PLACEHOLDER, REPO_PLACEHOLDER, adapter_card_data,
                         render_adapter_card)

PEFT_DIR = "peft"  # where `mlx-music train` writes the PEFT copy of the adapter

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


def is_adapter_folder(folder: str | Path) -> bool:
    """True when `folder` holds an MLX adapter (adapter_config.json at its top), as `mlx-music
    train` and `convert-adapter` write; a checkpoint never has one."""
    return (Path(folder) / rt.CONFIG).is_file()


def _hub_id(name: object) -> str | None:
    if not isinstance(name, str) or name.startswith(("/", "~", ".")):
        return None
    try:
        return validate_repo_id(name)
    except PublishError:
        return None


def adapter_base_model(folder: Path, config: dict, base_model: str | None = None) -> str:
    """The Hub id of the model the adapter was trained on: `base_model` if given, else
    adapter_config.json's base_model when it is a Hub id, else (a local MLX checkpoint folder) the
    Hub id its conversion.json records. Raises PublishError naming the option to pass."""
    if base_model is not None:
        try:
            return validate_repo_id(base_model)
        except PublishError as e:
            raise PublishError(f"base_model: {e}") from None
    raw = config.get("base_model")
    local = Path(os.path.expanduser(raw)) if isinstance(raw, str) and raw else None
    if local is not None and local.is_dir():
        try:
            rec = loads_json((local / RECORD).read_text(encoding="utf-8"))
            src = rec.get("source") if isinstance(rec.get("source"), dict) else {}
            found = _hub_id(rec.get("base_model")) or _hub_id(src.get("repo_id"))
        except (OSError, ValueError, AttributeError):
            found = None
        if found:
            return found
    elif _hub_id(raw):
        return raw
    raise PublishError(f"{folder / rt.CONFIG}: base model {raw!r} is not a Hugging Face Hub id (a local "
                       "folder that records none); pass base_model='ORG/NAME', the Hub model it was trained on")


def _json_bytes(data: dict) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode("utf-8")


def _adapter_card(folder: Path, config: dict, base: str, repo_id: str) -> bytes:
    """The train run's README.md (or one rendered from adapter_config.json's metadata when there is
    none) with the adapter's and the base's real locations filled in and `base` as its base_model."""
    from huggingface_hub import ModelCard, ModelCardData

    info = config.get("training") if isinstance(config.get("training"), dict) else {}
    readme = folder / "README.md"
    if readme.is_file():
        try:
            text = readme.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise PublishError(f"{readme}: unreadable model card ({type(e).__name__})") from None
        step = re.search(r"^\| steps \| (\S+) \|$", text, re.M)
        if step and "step" in info and step.group(1) != str(info["step"]):
            raise PublishError(f"{readme}: card says {step.group(1)} steps but {rt.CONFIG} holds the adapter of "
                               f"step {info['step']} (a save was interrupted); resume or rerun the training")
    else:
        text = render_adapter_card(base_model=base, info=info, modules=sorted(config["modules"]),
                                   rank=int(config.get("r") or 0), alpha=float(config.get("lora_alpha") or 0))
    old = config.get("base_model")
    if isinstance(old, str) and old and old != base:
        text = text.replace(old, base)  # a local path must not reach a public card
    text = (text.replace(f'"{ADAPTER_PLACEHOLDER}/peft"', f'"{repo_id}", subfolder="{PEFT_DIR}"')
            .replace(f"from_pretrained({BASE_PLACEHOLDER})", f'from_pretrained("{base}")')
            .replace(f"--model {BASE_PLACEHOLDER} ", f"--model {base} ")
            .replace(ADAPTER_PLACEHOLDER, repo_id))
    card = ModelCard(text)
    want = adapter_card_data(base).to_dict()
    have = card.data.to_dict()
    if any(have.get(k) != v for k, v in want.items()):  # a card from before, or edited: the Hub metadata fixed
        card.data = ModelCardData(**{**have, **want, "tags": list(dict.fromkeys([*want["tags"],
                                                                                 *(have.get("tags") or [])]))})
        text = str(card)
    return text.encode("utf-8")


def validate_adapter_folder(folder: str | Path, repo_id: str, base_model: str | None = None
                            ) -> tuple[dict[str, int], dict[str, bytes]]:
    """Check a LoRA adapter folder for publishing; return ({relative path: size to upload},
    {relative path: bytes uploaded from memory}).

    The MLX adapter must match the size and sha256 its conversion.json records and load
    (runtime.adapters.load_adapter); ``peft/`` must be a readable PEFT LoRA adapter holding exactly
    the MLX adapter's factors and scales (converters.adapters.read_peft_adapter); a README.md must
    describe the same step. The uploaded configs name the base by its Hub id
    (`adapter_base_model`), the card is `_adapter_card`'s, and the uploaded conversion.json records
    every uploaded file. The folder itself is never changed. Raises PublishError (one line)."""
    import numpy as np

    from .adapters import PEFT_CONFIG, PEFT_WEIGHTS, read_peft_adapter
    from .errors import ConvertError

    folder = Path(folder)
    rec_path = folder / RECORD
    try:
        record = loads_json(rec_path.read_text(encoding="utf-8"))
        files = record["files"]
        entries = [files[n] for n in (rt.CONFIG, rt.WEIGHTS)]
    except FileNotFoundError:
        raise PublishError(f"{rec_path} missing: an adapter folder needs the record `mlx-music train` "
                           "writes") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PublishError(f"{rec_path}: unreadable or does not list {rt.CONFIG} and {rt.WEIGHTS} "
                           f"({type(e).__name__})") from None
    for name, meta in zip((rt.CONFIG, rt.WEIGHTS), entries):
        path = folder / name
        if not (isinstance(meta, dict) and isinstance(meta.get("size"), int) and isinstance(meta.get("sha256"), str)):
            raise PublishError(f"{rec_path}: entry for {name} is malformed (needs size and sha256)")
        if not path.is_file():
            raise PublishError(f"{path} missing (listed in {RECORD})")
        if path.stat().st_size != meta["size"]:
            raise PublishError(f"{path}: size {path.stat().st_size} differs from {meta['size']} recorded in "
                               f"{RECORD}; the file is truncated, replaced or modified after training")
        if sha256_file(path) != meta["sha256"].lower():
            raise PublishError(f"{path}: sha256 differs from {RECORD}; the file is corrupt or modified "
                               "after training")
    try:
        adapter = rt.load_adapter(folder)
    except rt.AdapterError as e:
        raise PublishError(str(e)) from None
    config = adapter.config
    peft = folder / PEFT_DIR
    for name in (PEFT_CONFIG, PEFT_WEIGHTS):
        if not (peft / name).is_file():
            raise PublishError(f"{peft / name} missing: the PEFT copy `mlx-music train` writes next to the "
                               "MLX adapter is incomplete")
    try:
        pa = read_peft_adapter(peft)
    except ConvertError as e:
        raise PublishError(str(e)) from None
    if set(pa.modules) != set(adapter.modules):
        diff = sorted(set(pa.modules) ^ set(adapter.modules))[0]
        raise PublishError(f"{peft / PEFT_WEIGHTS}: module {diff} is in only one of it and {folder / rt.WEIGHTS} "
                           "(not the same adapter)")
    for name, mod in sorted(pa.modules.items()):
        a, b = (np.array(x) for x in adapter.arrays[name])
        scale = float(adapter.modules[name]["scale"])
        same = (mod.a.shape == a.shape and mod.b.shape == b.shape and np.array_equal(mod.a, a)
                and np.array_equal(mod.b, b) and abs(mod.scale - scale) <= 1e-6 * abs(scale))
        if not same:
            raise PublishError(f"{peft / PEFT_WEIGHTS}: module {mod.source} differs from the MLX adapter in "
                               f"{folder / rt.WEIGHTS} (a save was interrupted or a file was edited)")

    base = adapter_base_model(folder, config, base_model)
    mem: dict[str, bytes] = {"README.md": _adapter_card(folder, config, base, repo_id)}
    if config.get("base_model") != base:  # the local path the run was given -> the Hub id
        cfg = dict(config, base_model=base)
        if isinstance(cfg.get("training"), dict) and "base_model" in cfg["training"]:
            cfg["training"] = dict(cfg["training"], base_model=base)
        mem[rt.CONFIG] = _json_bytes(cfg)
    if pa.config.get("base_model_name_or_path") != base:
        mem[f"{PEFT_DIR}/{PEFT_CONFIG}"] = _json_bytes(dict(pa.config, base_model_name_or_path=base))
    plan = {n: (folder / n).stat().st_size for n in (rt.CONFIG, rt.WEIGHTS, f"{PEFT_DIR}/{PEFT_CONFIG}",
                                                     f"{PEFT_DIR}/{PEFT_WEIGHTS}")}
    plan.update({n: len(d) for n, d in mem.items()})
    # The uploaded record lists every uploaded file as uploaded (sha256 + size).
    known = {rt.CONFIG: entries[0]["sha256"], rt.WEIGHTS: entries[1]["sha256"],
             **{f"{PEFT_DIR}/{n}": m["sha256"] for n, m in pa.files.items()}}
    listed = {n: {"sha256": hashlib.sha256(mem[n]).hexdigest() if n in mem else known[n], "size": plan[n]}
              for n in sorted(plan)}
    mem[RECORD] = _json_bytes(dict(record, files=listed, base_model=base))
    plan[RECORD] = len(mem[RECORD])
    return plan, mem


def _fnmatch_escape(name: str) -> str:
    # upload_folder's allow_patterns are fnmatch patterns; make each file name match only itself.
    return re.sub(r"([*?\[])", r"[\1]", name)


def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def publish(folder: str | Path, repo_id: str, private: bool = False, dry_run: bool = False,
            token: str | None = None, revision: str | None = None, commit_message: str | None = None,
            *, endpoint: str | None = None, log: Callable[[str], None] | None = print,
            base_model: str | None = None) -> list[str]:
    """Upload the MLX checkpoint or the LoRA adapter (`is_adapter_folder`) in `folder` to the Hub
    model repo `repo_id`, in one commit.

    Returns the relative paths uploaded (or, with dry_run, that would be uploaded), sorted.
    `log` receives human-readable lines (the file list with sizes; None = silent). `endpoint`
    defaults to HF_ENDPOINT (read now) or huggingface.co. `revision` is a branch, created if
    missing. Checkpoint: if README.md still has the placeholder repo id, it is filled in with
    `repo_id` (README.md and its conversion.json entry are rewritten; not in a dry run). Adapter:
    see `validate_adapter_folder` (the folder is not changed); `base_model` is the Hub id of the
    model it was trained on, needed when the run's --model was a local folder recording none.
    """
    say = log or (lambda _line: None)
    folder = Path(folder)
    validate_repo_id(repo_id)
    tok = find_token(token)
    if tok is None and not dry_run:
        raise PublishError(f"no Hugging Face token to upload {repo_id}: pass token=TOKEN, set HF_TOKEN, "
                           "or run `hf auth login`")
    adapter = folder.is_dir() and is_adapter_folder(folder)
    if adapter:
        plan, mem = validate_adapter_folder(folder, repo_id, base_model)
        fill: dict[str, bytes] = {}  # the training folder stays as it is
    else:
        if base_model is not None:
            raise PublishError(f"base_model: only for an adapter folder; {folder} is not one "
                               f"(no {rt.CONFIG}); a checkpoint's card names its source already")
        plan = dict(validate_folder(folder))
        mem = fill = _card_fill(folder, repo_id)
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
        ops = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=mem[n] if n in mem else str(folder / n))
               for n in names]
        what = "LoRA adapter" if adapter else "MLX checkpoint"
        info = api.create_commit(repo_id, ops, repo_type="model", revision=revision,
                                 commit_message=commit_message or f"Upload {what} ({len(names)} files)")
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
