"""Any model source → a local MLX checkpoint folder: unconverted sources are converted once, into a
cache, and loaded from there next time (`mlx_music.load`, `generate/serve/batch --model`).

A source is an MLX checkpoint (folder or hub repo id: returned as runtime.hub resolves it), or an
unconverted Hugging Face MusicGen repo / folder or audiocraft-format folder (runtime.hub raises
NotConvertedError for it). An unconverted source is converted by converters.convert into

    $MLX_MUSIC_CACHE/<source>--<revision>--<settings>      (default: <HF_HOME>/mlx-music/...)

keyed by the source (hub repo id; or a local folder's absolute path), its revision (the hub commit;
or, for a local folder, a fingerprint of its files' names, sizes and modification times) and the
conversion settings (dtype, quantization). The default folder sits beside the Hugging Face hub cache
(`hub_cache_dir().parent`, i.e. HF_HOME); MLX_MUSIC_CACHE moves it. convert_checkpoint writes the
entry into a temporary folder renamed into place, so an interrupted conversion leaves nothing that
looks complete; a new entry is verified at the "exact" level (every file's size and sha256 against
its conversion record) and a reused one at the "sizes" level, like any checkpoint the loader reads.
`mlx-music cache list|remove` (list_cache, remove_cache) shows and frees the entries.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import OutputError
from mlx_music.runtime.checkpoint import RECORD, CheckpointError, verify_checkpoint
from mlx_music.runtime.dtypes import DTYPE_NAMES
from mlx_music.runtime.hub import NotConvertedError, hub_cache_dir, resolve_model_path
from mlx_music.runtime.records import loads_json

__all__ = ["CACHE_ENV", "CacheEntry", "cache_dir", "list_cache", "load", "remove_cache", "resolve_model"]

CACHE_ENV = "MLX_MUSIC_CACHE"
_SEP = "--"  # between the parts of an entry name; hub repo names cannot hold "--"


def cache_dir() -> Path:
    """The conversion cache: $MLX_MUSIC_CACHE, else `mlx-music/` beside the hub cache (in HF_HOME).
    Read at call time, like the hub cache's own variables."""
    if os.environ.get(CACHE_ENV):
        return Path(os.path.expanduser(os.path.expandvars(os.environ[CACHE_ENV])))
    return hub_cache_dir().parent / "mlx-music"


def _quantize_options(quantize):
    """None, a bit count (4 / 8) or converters.convert.QuantizeOptions → QuantizeOptions | None."""
    from .convert import QuantizeOptions

    if quantize is None or quantize is False:
        return None
    if quantize is True:
        return QuantizeOptions()
    if isinstance(quantize, QuantizeOptions):
        return quantize
    if isinstance(quantize, int) and quantize in (4, 8):
        return QuantizeOptions(bits=quantize)
    raise ValueError(f"quantize {quantize!r}: expected None, 4, 8 or a QuantizeOptions")


def settings_name(dtype: str, quantize) -> str:
    """The settings part of an entry name: "float32", "float16-q4-g64", "float32-q4-g64-mixed-4-8"."""
    q = _quantize_options(quantize)
    if q is None:
        return dtype
    return f"{dtype}-q{q.bits}-g{q.group_size}" + (f"-{q.recipe}" if q.recipe else "")


def _folder_fingerprint(folder: Path) -> str:
    """The revision of a local folder: sha256 over every file's relative name, size and mtime
    (a replaced or edited file gives another entry; nothing is read but the directory). Hidden
    files and folders (.git, .cache, ...) are not part of the model and are left out."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts):
            st = p.stat()
            h.update(f"{p.relative_to(folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "-", text).strip("-.") or "model"


def entry_name(err: NotConvertedError, settings: str) -> tuple[str, str, str]:
    """(entry folder name, source label, revision) for an unconverted source."""
    if err.repo_id:
        rev = err.revision or "main"
        rev_part = rev[:12] if re.fullmatch(r"[0-9a-f]{40}", rev) else _slug(rev).replace(_SEP, "-")
        return _SEP.join((err.repo_id.replace("/", _SEP), rev_part, settings)), err.repo_id, rev
    folder = Path(err.folder).resolve()
    where = hashlib.sha256(str(folder).encode()).hexdigest()[:8]
    rev = _folder_fingerprint(folder)
    name = _slug(folder.name).replace(_SEP, "-")
    return _SEP.join((f"local-{name}-{where}", rev, settings)), str(folder), rev


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _mlx_settings(folder: Path) -> tuple[str, dict | None]:
    cfg = loads_json((folder / "config.json").read_text())
    return cfg.get("dtype", "float32"), cfg.get("quantization")


def _check_settings(folder: Path, source: str, dtype: str | None, quantize) -> None:
    """An MLX checkpoint is used as it is: dtype / quantize, when given, must describe it."""
    if dtype is None and quantize is None:
        return
    have_dtype, have_q = _mlx_settings(folder)
    if dtype is not None and dtype != have_dtype:
        raise ValueError(f"dtype {dtype!r}: {source} is already an MLX checkpoint in {have_dtype}; dtype and "
                         "quantize choose the conversion of an unconverted source only")
    q = _quantize_options(quantize)
    if q is not None and not (have_q and have_q.get("bits") == q.bits and have_q.get("group_size") == q.group_size
                              and have_q.get("recipe") == q.recipe):
        have = f"{have_q['bits']}-bit" if have_q else "not quantized"
        raise ValueError(f"quantize: {source} is already an MLX checkpoint ({have}); dtype and quantize choose "
                         "the conversion of an unconverted source only")


def resolve_model(source: str | os.PathLike, revision: str | None = None, *, dtype: str | None = None,
                  quantize=None, progress: bool = True, log: Callable[[str], None] | None = None,
                  cache: str | os.PathLike | None = None) -> Path:
    """A local MLX checkpoint folder for `source`, converting an unconverted one once.

    source: an MLX checkpoint (folder or hub repo id), an unconverted Hugging Face MusicGen repo id
    or folder, or an audiocraft-format folder. revision: hub branch, tag or commit (repo ids only).
    dtype ("float32", "float16", "bfloat16"; default float32) and quantize (None, 4, 8 or a
    QuantizeOptions) choose the cached conversion of an unconverted source; for an MLX checkpoint
    they must match it or be None. progress: conversion progress bar (on stderr). log: receives
    one line when a conversion starts or a damaged entry is replaced (default: stderr when
    progress, else nothing). cache: the cache folder (default: cache_dir()).

    Raises runtime.hub.ModelNotFoundError for a source that cannot be found, ValueError naming
    the parameter for bad settings, converters.errors.ConvertError (a ValueError) for a source
    that cannot be converted (e.g. `.bin` weights without torch: names the extra to install).
    """
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPE_NAMES)}")
    qopts = _quantize_options(quantize)
    say = log if log is not None else (_stderr if progress else (lambda _m: None))
    try:
        folder = resolve_model_path(os.fspath(source), revision=revision)
    except NotConvertedError as e:
        return _cached_conversion(e, os.fspath(source), dtype or DTYPE_NAMES[0], qopts, progress, say,
                                  Path(cache) if cache is not None else cache_dir())
    _check_settings(folder, os.fspath(source), dtype, quantize)
    return folder


def _cached_conversion(err: NotConvertedError, source: str, dtype: str, qopts, progress: bool,
                       say: Callable[[str], None], cache: Path) -> Path:
    from .convert import convert_checkpoint

    name, label, rev = entry_name(err, settings_name(dtype, qopts))
    entry = cache / name
    force = False
    if entry.exists():
        try:
            verify_checkpoint(entry, "sizes")
            return entry
        except CheckpointError as e:
            say(f"cached conversion {entry} is damaged ({e}); converting {label} again")
            force = True
    else:
        say(f"converting {label} (revision {rev}, {settings_name(dtype, qopts)}) once into the cache: {entry}")
    hub_source = err.repo_id is not None
    try:
        convert_checkpoint(err.repo_id if hub_source else str(err.folder), entry, dtype=dtype, quantize=qopts,
                           revision=err.revision if hub_source else None, force=force, progress=progress)
    except OutputError:
        # Another process (an `mlx.launch` rank, a second terminal) finished the same entry first.
        if not entry.exists():
            raise
    verify_checkpoint(entry, "exact")
    return entry


def load(path_or_repo_id: str | os.PathLike, revision: str | None = None, verify: bool = False, adapter=None, *,
         dtype: str | None = None, quantize=None, progress: bool = True):
    """`mlx_music.load`: resolve_model (converting an unconverted source once, into the cache),
    then runtime.loader.load on the MLX checkpoint folder. Returns a MusicGenPipeline.

    verify: check every weight file's sha256 against the conversion record. adapter: an MLX LoRA
    adapter folder / repo id applied on top. dtype / quantize / progress: as resolve_model."""
    from mlx_music.runtime.loader import load as load_folder

    folder = resolve_model(path_or_repo_id, revision, dtype=dtype, quantize=quantize, progress=progress)
    return load_folder(folder, verify=verify, adapter=adapter)


@dataclass
class CacheEntry:
    """One cached conversion: its folder, what it was converted from, and its size on disk."""

    name: str
    path: Path
    source: str          # hub repo id or local folder
    revision: str        # hub commit, or a local folder's fingerprint
    settings: str        # dtype and quantization, e.g. "float16-q4-g64"
    bytes: int
    created: str | None


def _entry(path: Path) -> CacheEntry | None:
    parts = path.name.rsplit(_SEP, 2)
    if len(parts) != 3 or not (path / RECORD).is_file():
        return None
    try:
        record = loads_json((path / RECORD).read_text())
        src = record.get("source", {})
    except (OSError, ValueError, AttributeError):
        record, src = {}, {}
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    source = src.get("repo_id") or src.get("path") or parts[0]
    revision = src.get("revision") if src.get("repo_id") and src.get("revision") else parts[1]
    return CacheEntry(path.name, path, source, revision, parts[2], size, record.get("created"))


def list_cache(cache: str | os.PathLike | None = None) -> list[CacheEntry]:
    """Every complete entry of the cache (temporary folders of running conversions are skipped),
    sorted by source then settings."""
    root = Path(cache) if cache is not None else cache_dir()
    if not root.is_dir():
        return []
    entries = [_entry(p) for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted((e for e in entries if e is not None), key=lambda e: (e.source, e.settings, e.name))


def remove_cache(names: list[str] | tuple[str, ...] = (), *, everything: bool = False,
                 cache: str | os.PathLike | None = None) -> list[CacheEntry]:
    """Delete entries named by entry name or by source (hub repo id / local folder: all its
    entries), or every entry with everything=True. Returns the removed entries. Each entry is first
    renamed aside (atomic), so a half-deleted folder never looks like a cached conversion.

    Raises ValueError naming `names` when one of them matches no entry (nothing is removed then)."""
    entries = list_cache(cache)
    if everything:
        chosen = entries
    else:
        chosen, unknown = [], []
        for n in names:
            hits = [e for e in entries if n in (e.name, e.source) or os.path.abspath(os.path.expanduser(n)) == e.source]
            if not hits:
                unknown.append(n)
            chosen += [e for e in hits if e not in chosen]
        if unknown:
            known = ", ".join(e.name for e in entries) or "the cache is empty"
            raise ValueError(f"names {', '.join(unknown)}: no such cached conversion (entries: {known})")
    for e in chosen:
        aside = e.path.parent / f".{e.name}.removing-{os.getpid()}"
        os.replace(e.path, aside)
        shutil.rmtree(aside, ignore_errors=True)
    return chosen
