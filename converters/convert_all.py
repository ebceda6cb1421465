"""Convert every known variant (or a chosen list) in one go, resumably.

Each variant goes to `out_dir/<variant>[-<dtype>][-<quantization>]`, e.g. `musicgen-small`,
`musicgen-small-fp16`, `musicgen-stereo-medium-4bit`, `musicgen-large-mixed-4-8-g32`.

Resumable by construction: `convert_checkpoint` builds each output in a temporary folder and renames
it into place only when complete, so an interrupted run leaves no half-written output. On the next
run an output is skipped only when the recorded options (dtype, quantization, variant, source) are
the ones asked for, no file of a local source folder changed after the conversion (same path is
not same contents), and the folder passes runtime.checkpoint.verify_checkpoint at level "exact"
(every checkpoint file listed in `conversion.json` with its size and sha256); anything else is
converted again.

A variant that fails (missing source, manifest mismatch, corrupt weights, disk full, ...) is
reported in its row and the others still run; Ctrl-C stops the whole run.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .convert import QuantizeOptions, convert_checkpoint
from .errors import ConvertError
from .manifest import load_manifest, variant_names
from mlx_music.runtime.checkpoint import RECORD, CheckpointError, verify_checkpoint
from mlx_music.runtime.dtypes import FLOAT_DTYPES
from mlx_music.runtime.records import loads_json

STATUSES = ("converted", "skipped", "failed")
_DEFAULT_GROUP_SIZE = 64


@dataclass
class Row:
    variant: str
    status: str  # one of STATUSES
    seconds: float
    size: int  # bytes of the output folder on disk (0 when failed)
    message: str = ""
    path: Path | None = None


def output_name(variant: str, dtype: str = "float32", quantize: QuantizeOptions | None = None) -> str:
    """Folder name for one variant + options; every option that changes the weights is in it, so
    different settings never overwrite each other."""
    name = variant + ("" if dtype == "float32" else f"-{FLOAT_DTYPES[dtype].short}")
    if quantize is not None:
        name += f"-{quantize.recipe}" if quantize.recipe else f"-{quantize.bits}bit"
        if quantize.group_size != _DEFAULT_GROUP_SIZE:
            name += f"-g{quantize.group_size}"
    return name



def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _quant_options(q: dict | None) -> tuple | None:
    return None if not q else (int(q["bits"]), int(q["group_size"]), q.get("recipe"))


def verify_output(folder: Path, *, dtype: str, quantize: QuantizeOptions | None,
                  variant: str | None, source: str) -> str | None:
    """None when `folder` is a complete conversion with these options, else why not (one line).

    `variant` None accepts any recorded manifest (auto-detected conversions); `source` is the hub
    repo id or the resolved local folder the output must have been converted from.
    """
    record_path = folder / RECORD
    if not record_path.is_file():
        return f"no {RECORD} (not a finished mlx-music conversion)"
    try:
        record = loads_json(record_path.read_text())
    except (OSError, ValueError) as e:
        return f"conversion record unreadable ({type(e).__name__}: {e})"
    if not isinstance(record, dict):
        return f"conversion record unreadable ({RECORD} is not a JSON object)"
    # Cheap checks first, so options mismatches don't pay for hashing gigabytes.
    if record.get("dtype") != dtype:
        return f"recorded dtype {record.get('dtype')!r} differs from {dtype!r}"
    want_q = None if quantize is None else (quantize.bits, quantize.group_size, quantize.recipe)
    got_q = _quant_options(record.get("quantization"))
    if got_q != want_q:
        return f"recorded quantization {got_q} differs from {want_q} (bits, group size, recipe)"
    if variant is not None and record.get("variant") != variant:
        return f"recorded variant {record.get('variant')!r} differs from {variant!r}"
    src = record.get("source", {})
    if source not in (src.get("repo_id"), src.get("path")):
        return f"converted from {src.get('repo_id') or src.get('path')}, not {source}"
    changed = _changed_since(Path(source), record_path.stat().st_mtime) if Path(source).is_dir() else None
    if changed:  # the same path is not the same source: a file replaced after the conversion
        return f"source file {changed} changed after this conversion"
    try:
        verify_checkpoint(folder, "exact")
    except CheckpointError as e:
        return str(e)
    return None


def _changed_since(folder: Path, when: float) -> str | None:
    """The first file of a local source folder modified after ``when`` (the conversion record's
    mtime), or None. Cheap (no hashing): a source replaced in place is converted again."""
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.stat().st_mtime > when:
            return p.name
    return None


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def convert_all(
    out_dir: str | Path,
    variants: Sequence[str] | None = None,
    hf_root: str | Path | None = None,
    dtype: str = "float32",
    quantize: QuantizeOptions | None = None,
    force: bool = False,
    *,
    check_variant: bool = True,
    max_shard_size: str | int = "5GB",
    workers: int = 4,
    progress: bool = False,
    on_row: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Convert each variant (default: every manifest in manifests/) to out_dir; returns one Row each.

    Source of a variant: its manifest's hub repo id, or `hf_root/<variant>` when `hf_root` is given
    (a local mirror, or offline test fixtures).

    check_variant=True converts with the variant's manifest, so the source's config must match the
    manifest's expectations (a wrong or mislabeled source fails). check_variant=False auto-detects
    the manifest as `mlx-music convert` without --variant does: a source detected as a *different*
    known variant still fails, but one matching no known variant is converted with the shared rules
    (recorded as variant null, reported as "custom"). That mode exists for sources that are
    MusicGen-shaped but not the real checkpoints, e.g. the tiny fixtures the tests put in hf_root.
    """
    if dtype not in FLOAT_DTYPES:
        raise ConvertError(f"dtype {dtype!r}: expected one of {', '.join(FLOAT_DTYPES)}")
    names = list(variants) if variants is not None else variant_names()
    # Unknown names fail up front: a typo should not surface hours into a run.
    manifests = {name: load_manifest(name) for name in names}
    out_root = Path(out_dir).expanduser().absolute()
    root = Path(hf_root).expanduser().absolute() if hf_root is not None else None
    rows: list[Row] = []
    for name in names:
        manifest = manifests[name]
        variant = manifest.name or name
        out = out_root / output_name(variant, dtype, quantize)
        t0 = time.perf_counter()

        def row(status: str, message: str) -> Row:
            size = _folder_size(out) if status != "failed" and out.is_dir() else 0
            r = Row(variant, status, time.perf_counter() - t0, size, message, out)
            rows.append(r)
            if on_row:
                on_row(r)
            return r

        if root is not None:
            src_path = root / variant
            if not src_path.is_dir():
                row("failed", f"source folder {src_path} does not exist")
                continue
            source, expected_source = str(src_path), str(src_path.resolve())
        else:
            if not manifest.repo_id:
                row("failed", f"manifest {variant} names no repo_id; pass hf_root")
                continue
            source = expected_source = manifest.repo_id

        reason = None
        if out.exists():
            reason = "forced" if force else verify_output(
                out, dtype=dtype, quantize=quantize, variant=variant if check_variant else None,
                source=expected_source)
            if reason is None:
                row("skipped", "already converted and verified")
                continue
        try:
            result = convert_checkpoint(source, out, variant=variant if check_variant else None, dtype=dtype,
                                        quantize=quantize, max_shard_size=max_shard_size, force=out.exists(),
                                        workers=workers, progress=progress)
        except Exception as e:  # one variant's failure must not stop the others (Ctrl-C still does)
            row("failed", _one_line(e))
            continue
        if result.variant not in (variant, None):
            # Auto-detection found another real variant: the source folder is mislabeled.
            shutil.rmtree(out, ignore_errors=True)
            row("failed", f"source {source} is {result.variant}, not {variant}; output removed")
            continue
        notes = []
        if reason:
            notes.append(f"re-converted ({reason})")
        if result.variant is None:
            notes.append("auto-detected as custom (matches no manifest); shared rules used")
        if quantize is not None:
            notes.append(f"{len(result.quantized)} modules quantized, {len(result.skipped)} skipped")
        row("converted", "; ".join(notes))
    return rows


def _human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def format_summary(rows: Sequence[Row]) -> str:
    """Plain-text table of a convert_all run plus a totals line."""
    header = ("output", "status", "time", "size", "message")
    body = [((r.path.name if r.path else r.variant), r.status, f"{r.seconds:.1f}s",
             _human_size(r.size) if r.size else "-", r.message) for r in rows]
    widths = [max(len(header[i]), *(len(b[i]) for b in body)) if body else len(header[i]) for i in range(4)]
    lines = ["  ".join(h.ljust(w) if i != 2 and i != 3 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))
             + "  " + header[4]]
    for b in body:
        lines.append("  ".join([b[0].ljust(widths[0]), b[1].ljust(widths[1]), b[2].rjust(widths[2]),
                                b[3].rjust(widths[3])]) + "  " + b[4])
    counts = {s: sum(r.status == s for r in rows) for s in STATUSES}
    lines.append(", ".join(f"{counts[s]} {s}" for s in STATUSES)
                 + f" in {sum(r.seconds for r in rows):.1f} s")
    return "\n".join(lines)
