"""Audio file input/output for the runtime (numpy + soundfile + soxr only).

Layout convention everywhere: float32 ``[channels, samples]`` in [-1, 1]
(soundfile uses ``[samples, channels]``; we transpose at the boundary so model
code never has to think about it).

Every user-facing failure raises :class:`AudioInputError` (a ``ValueError``)
with a one-line message that starts with the offending file (or ``<waveform>``
for in-memory input) so the CLI can print it as is.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import soundfile as sf
import soxr

__all__ = [
    "AudioInputError",
    "ProgressiveWavWriter",
    "SUPPORTED_OUTPUT_EXTENSIONS",
    "MAX_SAMPLE_RATE",
    "MIN_SAMPLE_RATE",
    "audio_bytes",
    "check_sample_rate",
    "decode_audio_input",
    "generation_tags",
    "load_audio_input",
    "pcm_bytes",
    "read_audio",
    "resample",
    "save_audio",
    "to_channels",
    "wav_header",
]

# Output container and default sample format per extension. PCM_16 keeps files
# small and universally playable; OGG only supports Vorbis.
SUPPORTED_OUTPUT_EXTENSIONS: dict[str, tuple[str, str]] = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".ogg": ("OGG", "VORBIS"),
}

# Below this peak an input is treated as silent (about -120 dBFS; one 24-bit LSB).
_SILENCE_PEAK = 1e-6
# [channels, samples] inputs with more "channels" than this are almost surely
# [samples, channels]; refuse rather than guess. Files with more channels are refused too.
_MAX_CHANNELS = 8
# Sample rates accepted for input audio (melody, audio prompt), in Hz. Real recordings lie well
# inside; a rate outside is a wrong or hostile header, and resampling work grows with odd rates.
MIN_SAMPLE_RATE = 4_000
MAX_SAMPLE_RATE = 384_000
# Frames decoded per libsndfile call: memory follows the samples actually decoded, never a
# frame count claimed by a header.
_READ_BLOCK_SAMPLES = 1 << 18


class AudioInputError(ValueError):
    """Bad audio input or output request; ``str(err)`` is one line naming the file."""

    def __init__(self, source: str | os.PathLike[str], problem: str) -> None:
        self.source = str(source)
        self.problem = " ".join(str(problem).split())  # keep it one line
        super().__init__(f"{self.source}: {self.problem}")


# --------------------------------------------------------------------- helpers


def _to_numpy(x: Any) -> np.ndarray:
    """numpy view of numpy / MLX / list data (MLX arrays expose a buffer)."""
    return x if isinstance(x, np.ndarray) else np.asarray(x)


def _as_float32(arr: np.ndarray, source: str) -> np.ndarray:
    """Float32 samples in [-1, 1]; integer PCM is scaled by its full-scale value."""
    if arr.dtype.kind == "f":
        return arr.astype(np.float32, copy=False)
    if arr.dtype.kind == "i":
        return (arr.astype(np.float64) / float(2 ** (8 * arr.dtype.itemsize - 1))).astype(np.float32)
    if arr.dtype.kind == "u":
        half = float(2 ** (8 * arr.dtype.itemsize - 1))
        return ((arr.astype(np.float64) - half) / half).astype(np.float32)
    raise AudioInputError(source, f"waveform must be numeric, got dtype {arr.dtype}")


def _check_waveform(wav: np.ndarray, source: str, require_signal: bool) -> None:
    if wav.shape[-1] == 0:
        raise AudioInputError(source, "audio is empty (0 samples)")
    if not np.all(np.isfinite(wav)):
        raise AudioInputError(source, "audio contains NaN or infinite samples")
    if require_signal and float(np.max(np.abs(wav))) < _SILENCE_PEAK:
        raise AudioInputError(source, "audio is silent (peak below -120 dBFS)")


def _as_channels_first(arr: np.ndarray, source: str) -> np.ndarray:
    if arr.ndim == 1:
        return arr[None, :]
    if arr.ndim != 2:
        raise AudioInputError(source, f"waveform must be [samples] or [channels, samples], got shape {arr.shape}")
    if arr.shape[0] > _MAX_CHANNELS:
        raise AudioInputError(
            source,
            f"waveform shape {arr.shape} has {arr.shape[0]} channels; expected [channels, samples] "
            "(transpose a [samples, channels] array)",
        )
    return arr


# ------------------------------------------------------------------------ read


def check_sample_rate(sr: Any, source: str | os.PathLike[str]) -> int:
    """``sr`` as an int if it is a whole number of Hz in [`MIN_SAMPLE_RATE`, `MAX_SAMPLE_RATE`];
    else `AudioInputError` naming ``source``."""
    if isinstance(sr, bool) or not isinstance(sr, (int, np.integer, float, np.floating)) \
            or not math.isfinite(sr) or sr <= 0 or int(sr) != sr:
        raise AudioInputError(source, f"sample rate must be a positive integer, got {sr!r}")
    if not MIN_SAMPLE_RATE <= int(sr) <= MAX_SAMPLE_RATE:
        raise AudioInputError(source, f"sample rate {int(sr)} Hz is outside the supported "
                                      f"{MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz")
    return int(sr)


def _frame_limit(max_seconds: float | None, sr: int) -> int | None:
    if max_seconds is None:
        return None
    if not math.isfinite(max_seconds) or max_seconds <= 0:
        raise ValueError(f"max_seconds {max_seconds!r}: must be a positive number of seconds")
    return max(1, math.ceil(max_seconds * sr))


def read_audio(path: str | os.PathLike[str], require_signal: bool = False,
               max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Read WAV/FLAC/OGG (anything libsndfile decodes) as float32 ``[C, S]`` and its rate in Hz.

    ``max_seconds``: decode only the first that many seconds (the rest of the file is never
    decoded). The file is decoded in blocks, so memory follows the samples decoded, whatever its
    header claims. Raises `AudioInputError` naming the file: not found, undecodable, a sample rate
    outside [`MIN_SAMPLE_RATE`, `MAX_SAMPLE_RATE`], more than 8 channels, empty, non-finite, or
    (``require_signal``) silent.
    """
    path = Path(path)
    if not path.exists():
        raise AudioInputError(path, "file not found")
    if path.is_dir():
        raise AudioInputError(path, "is a directory, not an audio file")
    try:
        with sf.SoundFile(str(path)) as f:
            sr = check_sample_rate(f.samplerate, path)
            if f.channels > _MAX_CHANNELS:
                raise AudioInputError(path, f"has {f.channels} channels; at most {_MAX_CHANNELS} are supported")
            limit = _frame_limit(max_seconds, sr)
            block = max(1, _READ_BLOCK_SAMPLES // f.channels)
            parts, got = [], 0
            while limit is None or got < limit:
                want = block if limit is None else min(block, limit - got)
                data = f.read(want, dtype="float32", always_2d=True)
                if data.shape[0]:
                    parts.append(data)
                    got += data.shape[0]
                if data.shape[0] < want:
                    break
            channels = f.channels
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        # libsndfile's text varies by version ("Format not recognised", ...);
        # keep its reason but make the message ours and one line.
        raise AudioInputError(path, f"cannot read audio (unsupported or corrupt file: {err})") from None
    data = np.concatenate(parts) if parts else np.zeros((0, channels), np.float32)
    wav = np.ascontiguousarray(data.T)
    _check_waveform(wav, str(path), require_signal)
    return wav, sr


# ------------------------------------------------------------------ transforms


def to_channels(wav: Any, n: int) -> np.ndarray:
    """Convert ``[C, S]`` (or ``[S]``) to ``n`` channels.

    mono -> n copies; several -> mono by averaging (what MusicGen's own
    preprocessing does); equal counts pass through. Other mixes (e.g. 6 -> 2)
    are refused: there is no single right downmix.
    """
    arr = _as_channels_first(_to_numpy(wav), "<waveform>")
    c = arr.shape[0]
    if n < 1:
        raise ValueError(f"channel count must be >= 1, got {n}")
    if c == n:
        return arr
    if c == 1:
        return np.repeat(arr, n, axis=0)
    if n == 1:
        return arr.mean(axis=0, keepdims=True, dtype=np.float64).astype(arr.dtype)
    raise AudioInputError("<waveform>", f"cannot convert {c} channels to {n} (give mono or {n}-channel audio; "
                                        "no downmix of more channels is defined)")


def resample(wav: Any, sr_in: int, sr_out: int) -> np.ndarray:
    """High-quality (soxr HQ) resampling of ``[C, S]`` or ``[S]`` float audio."""
    arr = _to_numpy(wav)
    if sr_in <= 0 or sr_out <= 0:
        raise ValueError(f"sample rates must be positive, got {sr_in} -> {sr_out}")
    if int(sr_in) == int(sr_out):
        return arr.astype(np.float32, copy=False)
    x = np.asarray(arr, dtype=np.float32)
    # soxr wants [frames, channels] and a contiguous buffer.
    if x.ndim == 1:
        return soxr.resample(x, sr_in, sr_out, quality="HQ").astype(np.float32, copy=False)
    y = soxr.resample(np.ascontiguousarray(x.T), sr_in, sr_out, quality="HQ")
    return np.ascontiguousarray(y.T, dtype=np.float32)


def decode_audio_input(
    x: str | os.PathLike[str] | tuple[Any, int],
    require_signal: bool = False,
    max_seconds: float | None = None,
) -> tuple[np.ndarray, int, str]:
    """Path or ``(waveform, sample_rate)`` -> (float32 ``[C, S]``, rate in Hz, source name), not
    resampled, cut to the first ``max_seconds`` before any conversion (see `read_audio`).

    ``waveform`` may be 1-D or ``[C, S]``, numpy or MLX, float or integer PCM. Raises
    `AudioInputError` naming the file (or ``<waveform>``), as `read_audio`.
    """
    if isinstance(x, tuple):
        if len(x) != 2:
            raise AudioInputError("<waveform>", "expected a (waveform, sample_rate) tuple")
        source = "<waveform>"
        raw, sr = x
        sr = check_sample_rate(sr, source)
        raw = _to_numpy(raw)
        limit = _frame_limit(max_seconds, sr)
        if limit is not None and raw.ndim in (1, 2):
            raw = raw[..., :limit]  # crop before converting: work follows the seconds kept
        wav = _as_channels_first(_as_float32(raw, source), source)
        _check_waveform(wav, source, require_signal)
        return wav, sr, source
    if isinstance(x, (str, os.PathLike)):
        wav, sr = read_audio(x, require_signal=require_signal, max_seconds=max_seconds)
        return wav, sr, str(x)
    raise AudioInputError(
        "<input>", f"expected a file path or a (waveform, sample_rate) tuple, got {type(x).__name__}"
    )


def load_audio_input(
    x: str | os.PathLike[str] | tuple[Any, int],
    target_sr: int,
    channels: int | None = None,
    require_signal: bool = False,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Path or ``(waveform, sample_rate)`` -> float32 ``[C, S]`` at ``target_sr``.

    ``waveform`` may be 1-D or ``[C, S]``, numpy or MLX, float or integer PCM.
    ``channels`` (if given) converts with :func:`to_channels`.
    ``require_signal`` rejects silent input (e.g. an all-zero melody prompt,
    which would give meaningless chroma). ``max_seconds`` keeps only the first
    that many seconds, cut before decoding further or resampling (soxr, whose
    memory follows the samples kept).
    """
    wav, sr, source = decode_audio_input(x, require_signal, max_seconds)
    if channels is not None:
        try:
            wav = to_channels(wav, channels)
        except AudioInputError as err:
            raise AudioInputError(source, err.problem) from None
    wav = resample(wav, sr, target_sr)
    return np.ascontiguousarray(wav, dtype=np.float32)


# ----------------------------------------------------------------------- write


def _check_output_path(path: Path, allowed: dict[str, tuple[str, str]]) -> tuple[str, str]:
    ext = path.suffix.lower()
    if ext not in allowed:
        raise AudioInputError(
            path, f"unsupported output extension {ext or '(none)'!r}; use one of {', '.join(sorted(allowed))}"
        )
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise AudioInputError(path, f"output folder {str(parent)!r} does not exist")
    return allowed[ext]


def _prepare_output(audio: Any, source: str) -> np.ndarray:
    arr = _as_channels_first(_as_float32(_to_numpy(audio), source), source)
    if arr.shape[-1] == 0:
        raise AudioInputError(source, "audio to write is empty (0 samples)")
    if not np.all(np.isfinite(arr)):
        raise AudioInputError(source, "audio to write contains NaN or infinite samples")
    return arr


def _ready_for_subtype(arr: np.ndarray, subtype: str) -> np.ndarray:
    """Float32 ``[C, S]`` as every writer hands it to libsndfile: clipped to [-1, 1] for integer
    formats (libsndfile would otherwise wrap loud peaks around to the opposite sign).

    Every float -> PCM conversion in this package is libsndfile's own (``save_audio`` and
    ``ProgressiveWavWriter`` both write through soundfile), so offline and streamed files hold the
    same samples; never scale by 32767 / 32768 by hand.
    """
    if subtype not in ("FLOAT", "DOUBLE"):
        arr = np.clip(arr, -1.0, 1.0)
    return np.ascontiguousarray(arr.T, dtype=np.float32)


# libsndfile silently drops every INFO string of a WAV whose strings pass about 2 KB in all.
_MAX_TAG_BYTES = 1800
_TAG_NAMES = ("title", "copyright", "software", "artist", "comment", "date", "album", "license",
              "tracknumber", "genre")


def generation_tags(info: Mapping[str, Any]) -> dict[str, str]:
    """File tags recording how a clip was made: ``comment`` = ``info`` as one line of JSON
    (seed, prompt, duration, settings, model, ...), ``software`` = mlx-music.

    Read back with ``json.loads(soundfile.SoundFile(path).comment)``. The JSON is ASCII
    (``\\uXXXX`` escapes) and at most about 1.8 KB, so libsndfile keeps it in a WAV's INFO
    chunk: a longer ``prompt`` is shortened and ``"prompt_truncated": true`` added."""
    info = dict(info)
    text = json.dumps(info, ensure_ascii=True, separators=(",", ":"))
    prompt = info.get("prompt")
    if len(text) > _MAX_TAG_BYTES and isinstance(prompt, str):
        info["prompt_truncated"] = True
        keep = len(prompt)
        while keep > 0:
            keep = max(0, keep - max(1, (len(text) - _MAX_TAG_BYTES) // 6 + 1))
            info["prompt"] = prompt[:keep]
            text = json.dumps(info, ensure_ascii=True, separators=(",", ":"))
            if len(text) <= _MAX_TAG_BYTES:
                break
    return {"comment": text, "software": "mlx-music"}


def _set_tags(f: sf.SoundFile, tags: Mapping[str, str] | None, source: str | os.PathLike[str]) -> None:
    """Tags set before the first sample is written (OGG needs them there)."""
    for name, value in (tags or {}).items():
        if name not in _TAG_NAMES or not isinstance(value, str):
            raise AudioInputError(source, f"tag {name!r}: expected one of {', '.join(_TAG_NAMES)} with a string value")
        setattr(f, name, value)


def save_audio(path: str | os.PathLike[str], audio: Any, sr: int, subtype: str | None = None,
               tags: Mapping[str, str] | None = None) -> Path:
    """Write ``[C, S]`` or ``[S]`` audio; format from the extension (.wav/.flac/.ogg).

    Default sample format: 16-bit PCM for WAV/FLAC, Vorbis for OGG. Samples are
    clipped to [-1, 1] for integer formats because libsndfile would otherwise
    wrap loud peaks around to the opposite sign. ``tags``: soundfile string fields
    (``comment``, ``title``, ...), e.g. `generation_tags`; the samples do not depend on them.
    """
    path = Path(path)
    fmt, default_subtype = _check_output_path(path, SUPPORTED_OUTPUT_EXTENSIONS)
    subtype = subtype or default_subtype
    arr = _prepare_output(audio, str(path))
    try:
        with sf.SoundFile(str(path), "w", int(sr), arr.shape[0], subtype=subtype, format=fmt) as f:
            _set_tags(f, tags, path)
            f.write(_ready_for_subtype(arr, subtype))
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as err:
        if isinstance(err, AudioInputError):
            raise
        raise AudioInputError(path, f"cannot write audio ({err})") from None
    return path


def audio_bytes(audio: Any, sr: int, fmt: str = "wav", tags: Mapping[str, str] | None = None) -> bytes:
    """A whole ``[C, S]`` clip as the bytes of a 16-bit ``wav`` or ``flac`` file, exactly what
    `save_audio` writes to a ``.wav`` / ``.flac`` path (same libsndfile conversion, same ``tags``)."""
    ext = "." + str(fmt).lower()
    if ext not in (".wav", ".flac"):
        raise AudioInputError("<memory>", f"unsupported format {fmt!r}; use wav or flac")
    container, subtype = SUPPORTED_OUTPUT_EXTENSIONS[ext]
    arr = _prepare_output(audio, "<memory>")
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", int(sr), arr.shape[0], subtype=subtype, format=container) as f:
        _set_tags(f, tags, "<memory>")
        f.write(_ready_for_subtype(arr, subtype))
    return buf.getvalue()


def pcm_bytes(audio: Any, sr: int, subtype: str = "PCM_16") -> bytes:
    """``[C, n]`` float samples as interleaved little-endian PCM bytes (no header).

    The conversion is libsndfile's (a headerless RAW container), the same as `save_audio` and
    `ProgressiveWavWriter`, so a WAV streamed as `wav_header` + these chunks holds the samples of
    the file `save_audio` writes. Chunks convert independently: concatenated chunks equal the
    whole. Empty input gives ``b""``.
    """
    arr = _as_float32(_to_numpy(audio), "<stream>")
    arr = arr[None, :] if arr.ndim == 1 else arr
    if arr.shape[-1] == 0:
        return b""
    arr = _prepare_output(arr, "<stream>")
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", int(sr), arr.shape[0], subtype=subtype, endian="LITTLE", format="RAW") as f:
        f.write(_ready_for_subtype(arr, subtype))
    return buf.getvalue()


def wav_header(sr: int, channels: int, frames: int, subtype: str = "PCM_16") -> bytes:
    """The RIFF header of a WAV file of ``frames`` samples per channel (``PCM_16`` or ``FLOAT``).

    Written before the samples are known (streaming); pass the expected length, or the most that
    fits a WAV (``0xFFFFFFFF`` bytes) when it is unknown.
    """
    tag, width = ProgressiveWavWriter._SUBTYPES[subtype]
    block = channels * width
    data_bytes = min(frames * block, (0xFFFFFFFF - 58) // block * block)
    fmt = struct.pack("<HHIIHH", tag, channels, sr, sr * block, block, 8 * width)
    if tag == 1:
        chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt
    else:
        fmt += struct.pack("<H", 0)  # cbSize: no extension
        chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"fact" + struct.pack("<II", 4, data_bytes // block)
    chunks += b"data" + struct.pack("<I", data_bytes)
    return b"RIFF" + struct.pack("<I", 4 + len(chunks) + data_bytes) + b"WAVE" + chunks


class ProgressiveWavWriter:
    """Append chunks to a WAV file that is complete and valid after every chunk.

    A player or another process can open the file mid-generation (streaming).
    ``subtype`` is ``"PCM_16"`` (default) or ``"FLOAT"`` (32-bit IEEE float, with
    the ``fact`` chunk the WAV spec asks for). PCM_16 is written through
    libsndfile (soundfile), whose header is brought up to date by a flush after
    every chunk, so its float -> PCM conversion is exactly ``save_audio``'s. FLOAT
    needs no conversion; its RIFF header is written by hand and rewritten after
    each chunk.
    Chunks are ``[channels, n]`` (or ``[n]`` for mono).
    """

    _SUBTYPES = {"PCM_16": (1, 2), "FLOAT": (3, 4)}  # format tag, bytes per sample

    def __init__(self, path: str | os.PathLike[str], sr: int, channels: int, subtype: str = "PCM_16",
                 tags: Mapping[str, str] | None = None) -> None:
        self.path = Path(path)
        _check_output_path(self.path, {".wav": ("WAV", subtype)})
        if subtype not in self._SUBTYPES:
            raise AudioInputError(self.path, f"unsupported WAV subtype {subtype!r}; use PCM_16 or FLOAT")
        if channels < 1 or sr <= 0:
            raise AudioInputError(self.path, f"invalid stream: {channels} channels at {sr} Hz")
        self.sr = int(sr)
        self.channels = int(channels)
        self.subtype = subtype
        self._tag, self._width = self._SUBTYPES[subtype]
        self.frames = 0
        self._fh: BinaryIO | None = None
        self._sf: sf.SoundFile | None = None
        if self._tag == 1:
            try:
                self._sf = sf.SoundFile(str(self.path), "w", self.sr, self.channels, subtype=subtype, format="WAV")
            except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as err:
                raise AudioInputError(self.path, f"cannot write audio ({err})") from None
            _set_tags(self._sf, tags, self.path)  # `save_audio`'s tags, kept through every flush
            self._sf.flush()
        else:
            if tags:
                raise AudioInputError(self.path, "tags need the PCM_16 subtype")
            self._fh = open(self.path, "wb")
            self._write_header()

    def _header(self) -> bytes:
        return wav_header(self.sr, self.channels, self.frames, self.subtype)

    def _write_header(self) -> None:
        assert self._fh is not None
        self._fh.seek(0)
        self._fh.write(self._header())
        self._fh.seek(0, os.SEEK_END)
        self._fh.flush()

    def write(self, chunk: Any) -> None:
        """Append ``[channels, n]`` samples and make the file consistent again."""
        if self._fh is None and self._sf is None:
            raise AudioInputError(self.path, "writer is closed")
        arr = _as_float32(_to_numpy(chunk), str(self.path))
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[0] != self.channels:
            raise AudioInputError(
                self.path, f"chunk shape {arr.shape} does not match {self.channels} channel(s) [channels, n]"
            )
        if arr.shape[1] == 0:
            return
        if not np.all(np.isfinite(arr)):
            raise AudioInputError(self.path, "chunk contains NaN or infinite samples")
        new_bytes = (self.frames + arr.shape[1]) * self.channels * self._width
        if new_bytes + 64 > 0xFFFFFFFF:
            raise AudioInputError(self.path, "WAV files cannot exceed 4 GiB")
        if self._sf is not None:
            # libsndfile's float -> PCM_16, as save_audio; flush rewrites the header's sizes.
            self._sf.write(_ready_for_subtype(arr, self.subtype))
            self._sf.flush()
            self.frames += arr.shape[1]
            return
        assert self._fh is not None
        self._fh.write(np.ascontiguousarray(arr.T, dtype="<f4").tobytes())
        self.frames += arr.shape[1]
        self._write_header()

    @property
    def duration(self) -> float:
        """Seconds written so far."""
        return self.frames / self.sr

    def close(self) -> None:
        if self._sf is not None:
            self._sf.close()
            self._sf = None
        if self._fh is not None:
            self._write_header()
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "ProgressiveWavWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort: never leave an open handle behind
        try:
            self.close()
        except Exception:
            pass
