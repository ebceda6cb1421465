"""Batch jobs: a prompts file in, one audio file per row and a ``results.jsonl`` manifest out.

    summary = run_batch("prompts.jsonl", "out/musicgen-small", "clips/", batch_size=8)

The prompts file is JSONL (one object per line) or CSV (a header row), one row per clip, with the
keys of `KEYS`: ``prompt`` and ``duration`` are required; ``id`` defaults to the row number
(``00001``, ...), ``seed`` to the row number too, so every row has a fixed seed; ``melody`` and
``audio_prompt`` are paths relative to the prompts file; the sampling settings are the ones
`Request` takes. A row's output depends only on the row and the model, never on the batch it ran
in or on how many processes ran the job (a row gives bit-identical codes alone or in a batch).

What a job writes into ``out_dir``:

- ``<id>.wav`` (or ``.flac``) per row, written under a hidden temporary name and renamed into
  place, so a file with the final name is always complete;
- ``results.part-<rank>.jsonl``: each process appends one line per finished row (flushed and
  fsync'ed), so a killed job keeps what it finished;
- ``results.jsonl``: the merged manifest, one line per row of the prompts file, in file order
  (``ok``, ``failed``, or ``missing``: not finished yet), ASCII JSON, always replaced atomically:
  by rank 0 at the start (what earlier runs finished, checked), by every rank after each of its
  batches (under a lock file), and by rank 0 at the end. So a killed job leaves a complete,
  current manifest, never an empty or torn one; `batch_status` (``mlx-music batch --status DIR``)
  also reads the parts newer than it. ``mlx.launch`` does not forward the ranks' exit codes:
  check with `batch_status` after it.

A rerun skips rows listed ``ok`` whose file still has the recorded sha256 and whose request (prompt,
duration, seed, settings, inputs, model checksum, format) is unchanged, and redoes the others.

Many processes: run the same command under ``mlx.launch``; `mx.distributed.init()` gives each
process its rank. Rank 0 consolidates the manifest, a barrier (an ``all_sum``) lets every rank read
the same view, the rows left to do are sorted (settings, duration, row) and dealt round-robin, each
rank generates its share, and after a last barrier rank 0 merges the parts. A rank that dies leaves
its unfinished rows out of the manifest; the next run redoes them.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from mlx_music.runtime.checkpoint import RECORD
from mlx_music.runtime.checksums import sha256_file
from mlx_music.runtime.records import csv_records, json_objects, jsonl_lines, loads_json
from mlx_music.runtime.sampling import check_seed

SETTINGS = ("guidance_scale", "temperature", "top_k", "top_p", "greedy")
KEYS = ("id", "prompt", "duration", "seed", "melody", "audio_prompt", *SETTINGS)
FORMATS = ("wav", "flac")
MANIFEST = "results.jsonl"
MISSING = "missing"  # the status of a row no run has finished
PART_GLOB = "results.part-*.jsonl"
TEMP_PREFIX = ".partial-"
_MAX_ID_BYTES = 150  # the id is a file name: leave room for the temporary name's prefix
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


class BatchError(ValueError):
    """The job cannot run (unreadable prompts file, bad option, --strict and a bad row). One line."""


@dataclass
class PromptRow:
    """One row of the prompts file; ``error`` is set (one line) when the row cannot run."""

    number: int  # 1-based data row (JSONL: non-blank line; CSV: row after the header)
    line: int  # line of the file where the row starts, for messages
    id: str
    prompt: str | None = None
    duration: float | None = None
    seed: int | None = None
    settings: dict = field(default_factory=dict)  # only the keys the row gives
    melody: str | None = None  # as written in the file
    audio_prompt: str | None = None
    error: str | None = None
    input_sha256: dict = field(default_factory=dict)  # "melody"/"audio_prompt" -> sha256 of the file read
    id_error: bool = False  # the id is unusable (bad, or a duplicate): the row has no file name
    resolved: dict | None = None  # the checkpoint's defaults + settings, once checked

    @property
    def frames_key(self) -> tuple:
        """Rows sharing this key batch well (same CFG doubling, same sampling path, prompt or not)."""
        s = self.resolved or {}
        return (s.get("guidance_scale") != 1.0, bool(s.get("greedy")), self.audio_prompt is not None)


@dataclass
class BatchSummary:
    rows: int = 0  # rows in the prompts file
    ok: int = 0  # in the manifest, ok (after the merge: every rank's rows; rank > 0: its own)
    failed: int = 0
    missing: int = 0  # rows left unfinished (after the merge; 0 when every rank finished)
    skipped: int = 0  # already done by an earlier run
    generated: int = 0  # rows this process generated
    audio_seconds: float = 0.0  # audio this process generated
    seconds: float = 0.0  # this process's wall time generating (model load excluded)
    rank: int = 0
    size: int = 1
    manifest: Path | None = None
    failures: list[str] = field(default_factory=list)  # "id: reason" (after the merge: all rows)


# ------------------------------------------------------------------------------- reading
def _one_line(msg: Any) -> str:
    return " ".join(str(msg).split())


def _number(key: str, v: Any, integer: bool = False) -> float | int:
    if isinstance(v, str):
        try:
            v = int(v) if integer else float(v)
        except ValueError:
            raise ValueError(f"{key} {v!r}: must be {'an integer' if integer else 'a number'}") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise ValueError(f"{key} {v!r}: must be {'an integer' if integer else 'a number'}")
    return v


def _bool(key: str, v: Any) -> bool:
    if isinstance(v, str) and v.strip().lower() in _TRUE + _FALSE:
        return v.strip().lower() in _TRUE
    if not isinstance(v, bool):
        raise ValueError(f"{key} {v!r}: must be true or false")
    return v


def _check_id(v: Any) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"id {v!r}: must be a non-empty string")
    if v != v.strip() or v.startswith(".") or any(c in v for c in "/\\\0") or not v.isprintable():
        raise ValueError(f"id {v!r}: must be a plain file name (no slashes, no leading dot or space)")
    if len(v.encode("utf-8")) > _MAX_ID_BYTES:
        raise ValueError(f"id {v[:20]!r}...: longer than {_MAX_ID_BYTES} bytes")
    return v


def _parse_row(row: PromptRow, data: Any, csv_row: bool) -> None:
    """Fill ``row`` from one record (dict); sets ``row.error`` on the first problem."""
    try:
        if not isinstance(data, dict):
            raise ValueError(f"not a JSON object ({type(data).__name__})")
        if csv_row:  # an empty cell is an absent key; an unknown column only matters when filled
            if None in data:
                raise ValueError("more fields than the header has columns")
            data = {k: v for k, v in data.items() if v not in (None, "")}
        data = {k: v for k, v in data.items() if v is not None}
        if "id" in data:
            row.id_error = True
            row.id = _check_id(data["id"])
            row.id_error = False
        unknown = sorted(k for k in data if k not in KEYS)
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} (expected: {', '.join(KEYS)})")
        if not isinstance(data.get("prompt"), str):
            raise ValueError("prompt: missing" if "prompt" not in data else "prompt: must be a string")
        row.prompt = data["prompt"]
        if "duration" not in data:
            raise ValueError("duration: missing")
        d = float(_number("duration", data["duration"]))
        if not math.isfinite(d) or d <= 0:
            raise ValueError(f"duration {data['duration']!r}: must be a positive number of seconds")
        row.duration = d
        if "seed" in data:  # the one seed range of every entry point (sampling.check_seed)
            row.seed = check_seed(int(_number("seed", data["seed"], integer=True)))
        else:
            row.seed = row.number
        for key in ("melody", "audio_prompt"):
            if key in data:
                if not isinstance(data[key], str) or not data[key]:
                    raise ValueError(f"{key} {data[key]!r}: must be a file path")
                setattr(row, key, data[key])
        for key in SETTINGS:
            if key in data:
                v = data[key]
                row.settings[key] = _bool(key, v) if key == "greedy" else _number(key, v, integer=key == "top_k")
    except ValueError as e:
        row.error = _one_line(e)


def read_prompts(path: str | os.PathLike[str]) -> list[PromptRow]:
    """Rows of a JSONL (``.jsonl``, ``.ndjson``, ``.json``) or CSV (``.csv``) prompts file.

    A row that cannot be parsed comes back with ``error`` set; a file that cannot be read at all
    raises BatchError. Duplicate ids (compared case-insensitively, as some file systems do) mark
    the later row bad."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in (".jsonl", ".ndjson", ".json", ".csv"):
        raise BatchError(f"{path}: unsupported prompts file {ext or '(no extension)'!r}; use .jsonl or .csv")
    try:
        # No newline translation: CSV fields may hold \r, and rows end only where each format says.
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise BatchError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BatchError(f"{path}: cannot read ({_one_line(e)})") from None
    rows: list[PromptRow] = []
    if ext == ".csv":
        reader = csv_records(text, strict=True)  # records end at unquoted line ends only
        try:
            if not reader.fieldnames or not any(f.strip() for f in reader.fieldnames):
                raise BatchError(f"{path}: no header row (expected columns like prompt,duration,seed)")
            if len(set(reader.fieldnames)) != len(reader.fieldnames):
                raise BatchError(f"{path}: the header repeats a column")
            reader.fieldnames = [f.strip() for f in reader.fieldnames]
            for rec in reader:
                if not any((v or "").strip() for k, v in rec.items() if k is not None) and None not in rec:
                    continue  # an empty line
                n = len(rows) + 1
                row = PromptRow(n, reader.line_num, f"{n:05d}")
                _parse_row(row, rec, csv_row=True)
                rows.append(row)
        except csv.Error as e:
            raise BatchError(f"{path} line {reader.line_num}: not valid CSV ({_one_line(e)})") from None
    else:
        for i, line in jsonl_lines(text):  # lines end at \n only
            n = len(rows) + 1
            row = PromptRow(n, i, f"{n:05d}")
            try:
                data = loads_json(line)
            except ValueError as e:
                row.error = f"not valid JSON ({_one_line(e)})"
            else:
                _parse_row(row, data, csv_row=False)
            rows.append(row)
    if not rows:
        raise BatchError(f"{path}: no rows")
    seen: dict[str, PromptRow] = {}
    for row in rows:
        if row.id_error:
            continue
        first = seen.setdefault(row.id.casefold(), row)
        if first is not row:
            row.id_error = True
            row.error = f"id {row.id!r}: already used by row {first.number}"
    return rows


def check_rows(rows: Sequence[PromptRow], pipe: Any, base: Path) -> None:
    """Check each parsed row against the model: settings valid for it, input files present, no
    melody on a model without melody conditioning. Sets ``error`` and ``resolved``."""
    from mlx_music.runtime.sampling import SamplingConfig

    for row in rows:
        if row.error:
            continue
        try:
            cfg = SamplingConfig.from_defaults(pipe.defaults, **row.settings)
            row.resolved = dataclasses.asdict(cfg)
            for key in ("melody", "audio_prompt"):
                p = getattr(row, key)
                if p is not None and not (base / p).is_file():
                    raise ValueError(f"{key} {p}: file not found")
                if p is not None:  # the row's identity is the file's contents, not its path
                    row.input_sha256[key] = sha256_file(base / p)
            if row.melody is not None and not pipe.is_melody:
                raise ValueError("melody: this checkpoint is not a melody model (use a musicgen-melody variant)")
        except ValueError as e:
            row.error = _one_line(e)


# ------------------------------------------------------------------------------ manifest
def model_checksum(folder: str | os.PathLike[str]) -> str:
    """sha256 identifying a checkpoint: of its conversion.json, which records the sha256 of every
    file; a folder without one (hand-made) hashes config.json plus each file's name and size."""
    folder = Path(folder)
    if (folder / RECORD).is_file():
        return sha256_file(folder / RECORD)
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for p in sorted(folder.iterdir()):
        if p.is_file():
            h.update(f"\0{p.name}\0{p.stat().st_size}".encode())
    return h.hexdigest()


def _request(row: PromptRow, model: str, model_sha: str, fmt: str) -> dict:
    """What a manifest line must hold for a row's file to count as this row's output."""
    return {"id": row.id, "file": f"{row.id}.{fmt}", "prompt": row.prompt, "duration": row.duration,
            "seed": row.seed, "settings": row.resolved, "melody": row.melody,
            "melody_sha256": row.input_sha256.get("melody"), "audio_prompt": row.audio_prompt,
            "audio_prompt_sha256": row.input_sha256.get("audio_prompt"), "model": model, "model_sha256": model_sha}


_MATCH = ("id", "file", "prompt", "duration", "seed", "settings", "melody", "melody_sha256", "audio_prompt",
          "audio_prompt_sha256", "model_sha256")


def _matches(entry: dict, req: dict) -> bool:
    return entry.get("status") == "ok" and all(entry.get(k) == req[k] for k in _MATCH)


def _read_jsonl(path: Path) -> list[dict]:
    """Lines of a manifest; a torn last line (a process killed mid-write) is ignored."""
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        return []
    return [e for e in json_objects(text) if isinstance(e.get("id"), str)]  # we write ASCII JSON, one per \n


def _line(entry: dict) -> str:
    """One manifest line: ASCII JSON (\\uXXXX escapes), so no character of a prompt can break a
    line for any reader, whatever it splits lines on."""
    return json.dumps(entry, ensure_ascii=True) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{path.name}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _collect(out_dir: Path) -> dict[str, dict]:
    """The latest entry per id over results.jsonl and every part (parts are newer)."""
    latest: dict[str, dict] = {}
    for e in _read_jsonl(out_dir / MANIFEST):
        latest[e["id"]] = e
    for part in sorted(out_dir.glob(PART_GLOB)):
        for e in _read_jsonl(part):
            latest[e["id"]] = e
    return latest


def _missing(row: PromptRow) -> dict:
    """The line of a row no run has finished yet (pending, or lost with a killed process)."""
    entry = {"id": row.id, "row": row.number, "prompt": row.prompt, "duration": row.duration, "seed": row.seed}
    return {**{k: v for k, v in entry.items() if v is not None}, "status": MISSING,
            "reason": "not generated yet (rerun the same command to finish it)"}


def _consolidate(out_dir: Path, rows: Sequence[PromptRow], verify: bool,
                 failed: Callable[[PromptRow], dict], cleanup: bool = True) -> list[dict]:
    """Merge results.jsonl and the parts into results.jsonl: one line per row of the prompts
    file, in file order, ``missing`` for rows without a finished entry, written atomically (never
    empty, never torn). ``verify``: an ok entry whose file is gone or has another sha256 becomes
    missing (the row will be redone). Rows without a usable id (bad or duplicate) get their
    failed line, ``failed(row)``, here. ``cleanup`` (rank 0, no other rank running): also remove
    the parts and temporary files, whose lines are now in results.jsonl."""
    latest = _collect(out_dir)
    entries = []
    for row in rows:
        if row.id_error:
            entries.append(failed(row))
            continue
        e = latest.get(row.id)
        if e is not None and e.get("status") == "ok" and verify:
            f = out_dir / str(e.get("file", ""))
            if f.parent != out_dir or not f.is_file() or sha256_file(f) != e.get("sha256"):
                e = None
        entries.append(_missing(row) if e is None or e.get("status") not in ("ok", "failed") else e)
    _write_atomic(out_dir / MANIFEST, "".join(_line(e) for e in entries))
    if cleanup:
        for p in [*out_dir.glob(PART_GLOB), *out_dir.glob(TEMP_PREFIX + "*")]:
            p.unlink(missing_ok=True)
    return entries


def _merge_now(out_dir: Path, rows: Sequence[PromptRow], failed: Callable[[PromptRow], dict]) -> None:
    """Any rank, after each batch: results.jsonl brought up to date with every part, so a killed
    job leaves a manifest that lists what was done. A lock file keeps two ranks' merges from
    replacing each other's newer view."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover (not POSIX: merge without the lock)
        fcntl = None
    with open(out_dir / f"{TEMP_PREFIX}lock", "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            _consolidate(out_dir, rows, verify=False, failed=failed, cleanup=False)
        finally:
            if fcntl is not None:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


@dataclass
class BatchStatus:
    """What a batch output folder holds: row ids by state, in prompts-file order."""

    ok: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # finished, but the row could not be generated
    missing: list[str] = field(default_factory=list)  # not finished: rerun the job
    reasons: dict[str, str] = field(default_factory=dict)  # failed id -> one-line reason

    @property
    def rows(self) -> int:
        return len(self.ok) + len(self.failed) + len(self.missing)

    @property
    def exit_code(self) -> int:
        """0: every row ok; 3: rows missing (unfinished: rerun the same command); 1: finished, but
        rows failed (fix them in the prompts file, then rerun)."""
        return 3 if self.missing else 1 if self.failed else 0


def batch_status(out_dir: str | os.PathLike[str]) -> BatchStatus:
    """The state of every row of a job from its folder alone (results.jsonl, which lists every
    row, and the part files newer than it, e.g. after a killed run); reads, never writes. An ok
    row whose file is gone counts as missing. Raises BatchError (one line) when ``out_dir`` holds
    no results.jsonl."""
    out = Path(out_dir)
    if not (out / MANIFEST).is_file():
        raise BatchError(f"out_dir {out}: no {MANIFEST} (not a batch output folder)")
    latest = _collect(out)
    st = BatchStatus()
    for entry in _read_jsonl(out / MANIFEST):
        e = latest[entry["id"]]
        status = e.get("status")
        if status == "ok" and not (out / str(e.get("file", ""))).is_file():
            status = MISSING
        if status == "ok":
            st.ok.append(e["id"])
        elif status == "failed":
            st.failed.append(e["id"])
            st.reasons[e["id"]] = _one_line(e.get("reason", ""))
        else:
            st.missing.append(e["id"])
    return st


# ------------------------------------------------------------------------------ the job
class _Ranks:
    """The mx.distributed group (size 1 when not launched by mlx.launch) and a barrier."""

    def __init__(self, group: Any = None):
        import mlx.core as mx

        self.mx = mx
        self.group = group if group is not None else mx.distributed.init()
        self.rank, self.size = self.group.rank(), self.group.size()

    def barrier(self) -> None:
        if self.size > 1:
            mx = self.mx
            # The ring backend runs collectives on the CPU; NCCL (CUDA builds) on the GPU.
            cuda = mx.default_device() == mx.gpu and mx.cuda.is_available()
            mx.eval(mx.distributed.all_sum(mx.array(1.0), group=self.group, stream=None if cuda else mx.cpu))


def split_rows(todo: Sequence[PromptRow], rank: int, size: int) -> list[PromptRow]:
    """This rank's share: rows sorted by (batching key, duration, row), dealt round-robin, so
    every rank gets a similar amount of audio and batches of similar lengths."""
    good = sorted((r for r in todo if not r.error), key=lambda r: (r.frames_key, r.duration, r.number))
    bad = [r for r in todo if r.error]
    return (good + bad)[rank::size]


def run_batch(prompts: str | os.PathLike[str], model: str | os.PathLike[str] | Any, out_dir: str | os.PathLike[str],
              *, batch_size: int = 4, fmt: str = "wav", strict: bool = False, progress: bool = True,
              group: Any = None, log: Callable[[str], None] | None = None, model_name: str | None = None,
              revision: str | None = None, verify: bool = False) -> BatchSummary:
    """Run (or resume) a batch job; see the module docstring. ``model``: a checkpoint folder, hub
    repo id, or a loaded pipeline (then ``model_name`` is what the manifest records).

    Raises BatchError (one line) when the job cannot start: prompts file unreadable, bad option,
    or with ``strict`` a bad row (naming it). Bad rows otherwise become failed manifest lines."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise BatchError(f"batch_size {batch_size!r}: must be an integer >= 1")
    if fmt not in FORMATS:
        raise BatchError(f"format {fmt!r}: must be one of {', '.join(FORMATS)}")
    prompts = Path(prompts)
    out = Path(out_dir)
    rows = read_prompts(prompts)
    if not out.parent.is_dir():
        raise BatchError(f"{out}: parent folder {str(out.parent)!r} does not exist")
    if out.exists() and not out.is_dir():
        raise BatchError(f"{out}: exists and is not a folder")
    if isinstance(model, (str, os.PathLike)):
        from mlx_music.runtime.loader import load

        pipe = load(model, revision=revision, verify=verify)
        model_name = model_name or str(model)
    else:
        pipe = model
        model_name = model_name or str(pipe.path)
    check_rows(rows, pipe, prompts.parent)
    bad = [r for r in rows if r.error]
    if strict and bad:
        more = f" (and {len(bad) - 1} more bad rows)" if len(bad) > 1 else ""
        raise BatchError(f"{prompts} row {bad[0].number} (line {bad[0].line}, id {bad[0].id!r}): "
                         f"{bad[0].error}{more}")
    model_sha = model_checksum(pipe.path)

    ranks = _Ranks(group)
    out.mkdir(exist_ok=True)
    summary = BatchSummary(rows=len(rows), rank=ranks.rank, size=ranks.size)
    def failed(row: PromptRow) -> dict:
        return _failed(row, model_name, model_sha, fmt, row.error)

    if ranks.rank == 0:  # one view of what earlier runs finished, for every rank
        _consolidate(out, rows, verify=True, failed=failed)
    ranks.barrier()
    previous = {e["id"]: e for e in _read_jsonl(out / MANIFEST)}
    todo = []
    for row in rows:
        if row.id_error:
            continue  # rank 0 writes its line when merging
        e = previous.get(row.id)
        if row.error is None and e is not None and _matches(e, _request(row, model_name, model_sha, fmt)):
            summary.skipped += 1
        else:
            todo.append(row)
    mine = split_rows(todo, ranks.rank, ranks.size)

    part = out / f"results.part-{ranks.rank}.jsonl"
    t0 = time.perf_counter()
    with open(part, "a", encoding="utf-8") as part_file, \
            _Bar(progress and ranks.rank == 0, sum(_frames(r, pipe) for r in mine if not r.error), pipe.frame_rate,
                 f"rank 0/{ranks.size}" if ranks.size > 1 else "batch") as bar:
        def record(entry: dict) -> None:
            part_file.write(_line(entry))
            part_file.flush()
            os.fsync(part_file.fileno())
            if entry["status"] == "ok":
                summary.ok += 1
            else:
                summary.failed += 1
                summary.failures.append(f"{entry['id']}: {entry['reason']}")

        for row in (r for r in mine if r.error):
            record(failed(row))
        if any(r.error for r in mine):
            _merge_now(out, rows, failed)
        # A row with an audio prompt runs alone: prompts of different lengths in one batch would
        # change its codes (see MusicGenPipeline.generate_batch), and files must not depend on
        # how the rows were batched or split over ranks.
        alone = [[r] for r in mine if not r.error and r.audio_prompt is not None]
        good = [r for r in mine if not r.error and r.audio_prompt is None]
        batches = [good[i:i + batch_size] for i in range(0, len(good), batch_size)] + alone
        for batch in batches:
            for row, result in _generate(pipe, batch, prompts.parent, bar):
                req = _request(row, model_name, model_sha, fmt)
                if isinstance(result, str):
                    record(_failed(row, model_name, model_sha, fmt, result))
                    continue
                made = {k: req[k] for k in ("id", "seed", "prompt", "duration", "settings", "model", "melody",
                                            "audio_prompt") if req[k] is not None}
                sha, samples = _write_audio(out / req["file"], result, pipe.sample_rate, ranks.rank, made)
                record({**req, "sha256": sha, "samples": samples, "sample_rate": pipe.sample_rate,
                        "channels": int(result.shape[0]), "status": "ok"})
                summary.generated += 1
                summary.audio_seconds += samples / pipe.sample_rate
            _merge_now(out, rows, failed)
    summary.seconds = time.perf_counter() - t0

    ranks.barrier()  # every rank has finished its share
    if ranks.rank == 0:
        entries = _consolidate(out, rows, verify=False, failed=failed)
        summary.manifest = out / MANIFEST
        summary.ok = sum(e.get("status") == "ok" for e in entries)
        summary.failed = sum(e.get("status") == "failed" for e in entries)
        summary.missing = len(entries) - summary.ok - summary.failed
        summary.failures = [f"{e['id']}: {e.get('reason')}" for e in entries if e.get("status") == "failed"]
        if log:
            missing = f", {summary.missing} missing" if summary.missing else ""
            log(f"{len(rows)} rows: {summary.ok} ok ({summary.skipped} done earlier), {summary.failed} failed"
                f"{missing}; manifest {summary.manifest}")
    ranks.barrier()  # nobody leaves (and maybe restarts) before the merge is on disk
    return summary


def _failed(row: PromptRow, model: str, model_sha: str, fmt: str, reason: str) -> dict:
    entry = {k: v for k, v in _request(row, model, model_sha, fmt).items() if v is not None}
    entry.pop("file", None)
    return {**entry, "row": row.number, "status": "failed", "reason": _one_line(reason)}


def _frames(row: PromptRow, pipe: Any) -> int:
    """Frames of a row's audio, as the progress bar counts them (integers: the bar never passes
    its total)."""
    return max(1, round(row.duration * pipe.frame_rate))


def _generate(pipe: Any, batch: list[PromptRow], base: Path, bar: "_Bar"):
    """(row, audio [C, S] or a one-line reason) for each row of a batch: the rows run through one
    token loop (`pipe.frames`, what `generate_batch` runs), each with its own seed and settings.
    A batch that raises ValueError is retried row by row, so one bad input fails only its own row."""
    from mlx_music.runtime.generation import Request

    def req(r: PromptRow) -> Request:
        return Request(r.prompt, r.duration, r.seed, melody=None if r.melody is None else str(base / r.melody),
                       audio_prompt=None if r.audio_prompt is None else str(base / r.audio_prompt), **r.settings)

    def run(rows: list[PromptRow]):
        frames = [_frames(r, pipe) for r in rows]
        shown = 0

        def on_frames(final: int) -> None:
            nonlocal shown
            now = sum(min(final, f) for f in frames)
            bar.update(now - shown)
            shown = now

        try:
            gen = pipe.frames([req(r) for r in rows])  # generate_batch's token loop
            for final in gen:
                on_frames(final)
            codes = gen.codes(gen.num_frames)
            # Each row decoded alone: EnCodec on a batch of B > 1 rows can differ from the row
            # alone in the last float bit, which can flip a 16-bit sample; alone, a row's file is
            # the same whatever batch or rank produced it.
            return [pipe.decode_codes(codes[i:i + 1, :, :r.frames])[0] for i, r in enumerate(gen.rows)]
        finally:
            bar.update(sum(frames) - shown)  # a failed batch's audio counts as done

    try:
        return list(zip(batch, run(batch)))
    except ValueError as e:
        if len(batch) == 1:
            return [(batch[0], _one_line(e))]
    bar.total_back(sum(_frames(r, pipe) for r in batch))
    out = []
    for r in batch:
        try:
            out.append((r, run([r])[0]))
        except ValueError as e:
            out.append((r, _one_line(e)))
    return out


def _write_audio(path: Path, audio: Any, sr: int, rank: int, made: dict) -> tuple[str, int]:
    """Write under a temporary name in the same folder (``made``, the row's seed and settings, in
    its metadata), hash it, rename into place."""
    from mlx_music.runtime.audio_io import generation_tags, save_audio

    tmp = path.with_name(f"{TEMP_PREFIX}{rank}-{os.getpid()}-{path.name}")
    try:
        save_audio(tmp, audio, sr, tags=generation_tags(made))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        sha = sha256_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return sha, int(audio.shape[-1])


class _Bar:
    """`progress.audio_bar` in integer frames of audio, with an ETA (a no-op when off)."""

    def __init__(self, on: bool, total_frames: int, frame_rate: int, desc: str):
        self.bar = None
        if on:
            from mlx_music.runtime.progress import audio_bar

            self.bar = audio_bar(total_frames, frame_rate, desc, dynamic_ncols=True)

    def update(self, frames: int) -> None:
        if self.bar is not None and frames > 0:
            self.bar.update(frames)

    def total_back(self, frames: int) -> None:
        """A batch is redone row by row: its audio counts again."""
        if self.bar is not None:
            self.bar.total += frames
            self.bar.refresh()

    def __enter__(self) -> "_Bar":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
