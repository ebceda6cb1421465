"""Training data: an audiofolder, cut into pieces, encoded once (EnCodec codes, T5 states) and cached.

Layout (Hugging Face ``audiofolder``): audio files (anything libsndfile reads: WAV, FLAC, OGG,
MP3) and ``metadata.jsonl`` (one JSON object per line) or ``metadata.csv`` with a ``file_name``
column (a path relative to the folder) and a caption column, the first present of ``text``,
``description``, ``caption``. Audio is read through the runtime (`read_audio`: block-wise, so
memory follows the samples in the file, whatever its header says; sample rates outside 4-384 kHz
refused), resampled to the codec rate and matched to the model's channels (`to_channels`: mono ->
both channels, stereo -> channel mean). Each file is cut into ``segment``-second pieces; a trailing
piece shorter than ``min_seconds`` is dropped and counted; a file shorter than that is an error.

Cache: ``<cache>/audio/<key>.npz`` holds a file's codes (and melody chroma), ``<cache>/text/<key>.npy``
a caption's T5 states; keys are sha256 of the file's sha256 (or the caption), the model's
fingerprint and the settings, so a changed file, model or setting is re-encoded and nothing else.

Every problem raises `DataError` (a ValueError), one line naming the file, column or option.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_music.runtime.audio_io import AudioInputError, read_audio, resample, to_channels
from mlx_music.runtime.checksums import sha256_file
from mlx_music.runtime.records import csv_records, jsonl_lines, loads_json

CAPTION_COLUMNS = ("text", "description", "caption")
METADATA = ("metadata.jsonl", "metadata.csv")
CACHE_VERSION = 1


class DataError(ValueError):
    """Bad training data; one line naming the file, column or option."""


@dataclass
class Item:
    path: Path
    caption: str


@dataclass
class Piece:
    """One training piece: codes (K, F) int32, its caption, chroma (T, 12) for melody models."""

    codes: np.ndarray
    caption: str
    source: str
    chroma: np.ndarray | None = None


@dataclass
class Dataset:
    train: list[Piece]
    val: list[Piece]
    text: dict[str, np.ndarray]  # caption -> T5 states (S, d_t5) float32
    dropped: int = 0  # trailing pieces shorter than the minimum
    fingerprint: str = ""  # sha256 of the files, captions and settings (what --resume compares)
    seconds: float = 0.0  # audio seconds in the train pieces
    files: list[dict] = field(default_factory=list)


# ------------------------------------------------------------------------------ reading
def _read_rows(folder: Path) -> tuple[Path, list[dict]]:
    for name in METADATA:
        path = folder / name
        if path.is_file():
            break
    else:
        what = "is empty" if not any(folder.iterdir()) else "has no metadata.jsonl or metadata.csv"
        raise DataError(f"DATA {folder}: {what} (expected audio files and a metadata.jsonl/metadata.csv with "
                        f"file_name and a caption column: {', '.join(CAPTION_COLUMNS)})")
    try:
        text = path.read_bytes().decode("utf-8")  # no newline translation (see runtime/records.py)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    rows: list[dict] = []
    if path.suffix == ".jsonl":
        for n, line in jsonl_lines(text):  # lines end at \n only: captions may hold U+2028
            try:
                row = loads_json(line)
            except ValueError as e:
                raise DataError(f"{path}: line {n}: not valid JSON ({' '.join(str(e).split())})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {n}: expected a JSON object")
            rows.append(row)
    else:
        try:
            rows = list(csv_records(text))  # the whole text: quoted fields keep their line breaks
        except csv.Error as e:
            raise DataError(f"{path}: not valid CSV ({e})") from None
    if not rows:
        raise DataError(f"{path}: no rows")
    return path, rows


def read_folder(folder: str | os.PathLike, caption_from_filename: bool = False) -> list[Item]:
    """The (audio file, caption) items of an audiofolder; DataError on any problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"DATA {folder}: not a folder")
    path, rows = _read_rows(folder)
    columns = set().union(*(r.keys() for r in rows))
    if "file_name" not in columns:
        raise DataError(f"{path}: no file_name column (found: {', '.join(sorted(columns)) or 'none'})")
    caption_col = next((c for c in CAPTION_COLUMNS if c in columns), None)
    if caption_col is None and not caption_from_filename:
        raise DataError(f"{path}: no caption column (expected one of {', '.join(CAPTION_COLUMNS)}; found "
                        f"{', '.join(sorted(columns))}); pass --caption-from-filename to use file names")
    items = []
    root = folder.resolve()
    for n, row in enumerate(rows, 1):
        name = row.get("file_name")
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{path}: row {n}: file_name is missing or empty")
        audio = (folder / name).resolve()
        if root not in audio.parents:
            raise DataError(f"{path}: row {n}: file_name {name!r} points outside the folder")
        if not audio.is_file():
            raise DataError(f"{path}: row {n}: {name}: file not found")
        caption = row.get(caption_col) if caption_col else None
        if not isinstance(caption, str) or not caption.strip():
            if not caption_from_filename:
                raise DataError(f"{path}: row {n}: {name}: no {caption_col} caption (or pass --caption-from-filename)")
            caption = Path(name).stem.replace("_", " ").replace("-", " ")
        items.append(Item(audio, caption.strip()))
    return items


# ----------------------------------------------------------------------------- encoding
def model_fingerprint(folder: Path) -> str:
    """sha256 naming a checkpoint's weights: its conversion record (file hashes) or its config + sizes."""
    h = hashlib.sha256()
    rec = folder / "conversion.json"
    if rec.is_file():
        h.update(rec.read_bytes())
    else:
        h.update((folder / "config.json").read_bytes())
        for p in sorted(folder.glob("*.safetensors")):
            h.update(f"{p.name}:{p.stat().st_size}".encode())
    return h.hexdigest()


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _atomic_save(path: Path, save) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".partial-{os.getpid()}-{path.name}"
    save(tmp)
    os.replace(tmp, path)


def segment(wav: np.ndarray, sr: int, seconds: float, min_seconds: float) -> tuple[list[np.ndarray], int]:
    """Cut (C, S) into pieces of `seconds`; returns (pieces, dropped trailing pieces < min_seconds)."""
    n = int(round(seconds * sr))
    pieces = [wav[:, i:i + n] for i in range(0, wav.shape[1], n)]
    keep = [p for p in pieces if p.shape[1] >= min_seconds * sr]
    return keep, len(pieces) - len(keep)


@dataclass(frozen=True)
class DataSettings:
    segment: float = 30.0  # seconds per piece (at most one model window)
    min_seconds: float = 1.0  # shorter trailing pieces are dropped, shorter files refused
    val_fraction: float = 0.05
    caption_from_filename: bool = False

    def check(self, window: float) -> None:
        if not (math.isfinite(self.segment) and 0 < self.segment <= window + 1e-9):
            raise DataError(f"--segment {self.segment}: expected seconds in (0, {window:g}] (one model window)")
        if not (math.isfinite(self.min_seconds) and 0 < self.min_seconds <= self.segment):
            raise DataError(f"--min-seconds {self.min_seconds}: expected seconds in (0, --segment]")
        if not (0.0 <= self.val_fraction < 1.0):
            raise DataError(f"--val-fraction {self.val_fraction}: expected a number in [0, 1)")


def prepare(items: list[Item], pipe, model_folder: Path, settings: DataSettings, cache: Path, seed: int = 0,
            progress: bool = True) -> Dataset:
    """Read, cut, encode (EnCodec codes; T5 states; melody: chroma of each piece) with a disk cache.

    pipe: the loaded `MusicGenPipeline` (its codec, tokenizer and T5 are used; all frozen).
    The val pieces are a seeded choice of ``round(val_fraction * pieces)`` pieces (at least one
    when val_fraction > 0 and there are two pieces or more)."""
    sr, channels = pipe.sample_rate, pipe.audio_channels
    model_id = model_fingerprint(Path(model_folder))
    settings.check(pipe.window_seconds)
    audio_settings = {"sr": sr, "channels": channels, "segment": settings.segment, "min": settings.min_seconds,
                      "v": CACHE_VERSION}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc="preparing", unit="file", dynamic_ncols=True, leave=False)
    pieces: list[Piece] = []
    files, dropped = [], 0
    for item in items:
        digest = sha256_file(item.path)
        files.append({"file": item.path.name, "sha256": digest, "caption": item.caption})
        path = cache / "audio" / f"{_key(digest, model_id, audio_settings)}.npz"
        if path.is_file():
            z = np.load(path)
            codes = [z[f"codes{i}"] for i in range(int(z["n"]))]
            chroma = [z[f"chroma{i}"] for i in range(int(z["n"]))] if pipe.is_melody else None
            dropped += int(z["dropped"])
        else:
            codes, chroma, d = _encode_file(item.path, pipe, settings)
            dropped += d
            arrays = {f"codes{i}": c for i, c in enumerate(codes)}
            if chroma is not None:
                arrays.update({f"chroma{i}": c for i, c in enumerate(chroma)})
            _atomic_save(path, lambda p: np.savez(p, n=len(codes), dropped=d, **arrays))
        for i, c in enumerate(codes):
            pieces.append(Piece(c, item.caption, f"{item.path.name}#{i}", chroma[i] if chroma is not None else None))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    text = {}
    for caption in sorted({p.caption for p in pieces}):
        path = cache / "text" / f"{_key(caption, model_id, CACHE_VERSION)}.npy"
        if path.is_file():
            text[caption] = np.load(path)
        else:
            ids, mask = pipe.tokenizer([caption])
            states = np.array(pipe.model.text_encoder(mx.array(ids), mx.array(mask)).astype(mx.float32))[0]
            _atomic_save(path, lambda p: np.save(p, states))
            text[caption] = states
    rng = np.random.default_rng([seed, 7])
    n_val = int(round(settings.val_fraction * len(pieces)))
    if settings.val_fraction > 0 and len(pieces) >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, len(pieces) - 1)
    order = rng.permutation(len(pieces))
    val_idx = set(order[:n_val].tolist())
    train = [p for i, p in enumerate(pieces) if i not in val_idx]
    val = [p for i, p in enumerate(pieces) if i in val_idx]
    fp = _key(files, model_id, audio_settings, settings.val_fraction)
    frame_rate = pipe.frame_rate
    secs = sum(p.codes.shape[1] for p in train) / frame_rate
    return Dataset(train, val, text, dropped, fp, secs, files)


def _encode_file(path: Path, pipe, settings: DataSettings):
    sr_out = pipe.sample_rate
    wav, sr = read_audio(path, require_signal=True)
    if wav.shape[1] < settings.min_seconds * sr:
        raise DataError(f"{path}: {wav.shape[1] / sr:.2f} s long; shorter than the minimum of "
                        f"{settings.min_seconds:g} s (--min-seconds)")
    try:
        wav = to_channels(wav, pipe.audio_channels)
    except AudioInputError as e:  # name the file, not "<waveform>"
        raise DataError(f"{path}: {e.problem}") from None
    if sr != sr_out:
        wav = resample(wav, sr, sr_out)
    parts, dropped = segment(wav, sr_out, settings.segment, settings.min_seconds)
    codes = [pipe.codec.encode(np.ascontiguousarray(p, dtype=np.float32)) for p in parts]
    chroma = None
    if pipe.is_melody:
        from mlx_music.runtime.conditioning import melody_waveform

        ext = pipe.conditioner.extractor
        csr = int(pipe.conditioner.melody["sampling_rate"])
        chroma = [ext([melody_waveform((p, sr_out), csr)], csr)[0].astype(np.float32) for p in parts]
    return codes, chroma, dropped


# ------------------------------------------------------------------------------ batches
def collate(pieces: list[Piece], text: dict[str, np.ndarray], drop: np.ndarray, audio_channels: int,
            pad_id: int, chroma_length: int | None = None) -> dict[str, mx.array]:
    """Pieces -> the batch `mlx_music.train.step` takes (labels/inputs in the dreambooth layout,
    T5 states padded on the right with their mask, chroma tiled to a common length; dropped rows
    get the null chroma)."""
    from mlx_music.train.loss import build_labels, decoder_inputs

    labels = build_labels([p.codes for p in pieces], audio_channels, pad_id)
    states = [text[p.caption] for p in pieces]
    s = max(x.shape[0] for x in states)
    d = states[0].shape[1]
    t5 = np.zeros((len(pieces), s, d), np.float32)
    mask = np.zeros((len(pieces), s), np.int32)
    for i, x in enumerate(states):
        t5[i, :x.shape[0]] = x
        mask[i, :x.shape[0]] = 1
    batch = {"inputs": mx.array(decoder_inputs(labels, pad_id, pad_id)), "labels": mx.array(labels),
             "text": mx.array(t5), "text_mask": mx.array(mask), "drop": mx.array(drop.astype(bool))}
    if pieces[0].chroma is not None:
        null = np.zeros((1, pieces[0].chroma.shape[1]), np.float32)
        null[0, 0] = 1.0
        rows = [null if dr else p.chroma for p, dr in zip(pieces, drop)]
        t = max(chroma_length or 1, *(r.shape[0] for r in rows))
        batch["chroma"] = mx.array(np.stack([np.tile(r, (-(-t // r.shape[0]), 1))[:t] for r in rows]))
    return batch


__all__ = ["DataError", "DataSettings", "Dataset", "Item", "Piece", "collate", "model_fingerprint", "prepare",
           "read_folder", "segment"]
