"""Seeded, bounded fuzzing of converters.shard_reader.CheckpointReader.

Hundreds of mutated safetensors files, index JSONs and PyTorch `.bin` zips are opened and every
tensor is read. Whatever the bytes, the only exception allowed out is our own (SourceError, a
ConvertError): anything else would reach users of `mlx-music convert` as a traceback. Each run
uses fixed seeds, so a failure names a reproducible (seed, mutation).
"""

from __future__ import annotations

import io
import json
import random
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mlx_music.converters.errors import ConvertError
from mlx_music.converters.shard_reader import CheckpointReader

N_SAFETENSORS = 300
N_INDEX = 60
N_BIN = 160


def _base_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(4, 3, generator=g),
            "b.bias": torch.randn(5, generator=g).to(torch.float16),
            "c.embed": torch.randn(2, 2, 2, generator=g).to(torch.bfloat16),
            "d.scalar": torch.tensor(1.5, dtype=torch.float64)}


def _base_safetensors() -> bytes:
    from safetensors.torch import save

    return save(_base_tensors(), metadata={"format": "pt"})


def _split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header_text: bytes, data: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header_text) if length is None else length) + header_text + data


WEIRD_VALUES = [None, True, -1, 0, 1, 2**31, 2**63 - 1, 2**64, -(2**63), 1.5, float("nan"), "3", "F32", [], [1],
                [[1]], {}, {"x": 1}, "x" * 300]
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "F4", "F6_E2M3",
          "C64", "U64", "Q4", "", "f32", None]


def _mutate_header(rng: random.Random, header: dict, data: bytes) -> bytes:
    """JSON-level mutations: plausible-looking headers that lie about dtype, shape or offsets."""
    keys = [k for k in header if k != "__metadata__"]
    key = rng.choice(keys)
    entry = header[key]
    kind = rng.randrange(12)
    if kind == 0:
        entry["dtype"] = rng.choice(DTYPES)
    elif kind == 1:
        entry["shape"] = rng.choice([[rng.randint(-3, 10) for _ in range(rng.randint(0, 4))], [2**40, 2**40],
                                     rng.choice(WEIRD_VALUES)])
    elif kind == 2:
        s, e = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[e, s], [s, e + rng.randint(1, 64)], [s - 1, e - 1], [0, len(data) + 8],
                                            [s, 2**64], [-4, e], [s], [s, e, e], rng.choice(WEIRD_VALUES)])
    elif kind == 3:
        entry.pop(rng.choice(["dtype", "shape", "data_offsets"]))
    elif kind == 4:
        header[key] = rng.choice(WEIRD_VALUES)
    elif kind == 5:
        header["__metadata__"] = rng.choice([{"format": 5}, [], "pt", None, {"x": {"nested": 1}}])
    elif kind == 6:  # overlap two tensors
        other = header[rng.choice(keys)]
        entry["data_offsets"] = list(other["data_offsets"])
    elif kind == 7:
        header[rng.choice(["", "\u0000", "é" * 3, "a.weight ", "x" * 5000])] = dict(entry)
    elif kind == 8:
        entry["extra"] = rng.choice(WEIRD_VALUES)
    elif kind == 9:  # the same key twice in the JSON text (json.dumps cannot write that)
        text = json.dumps(header)
        dup = json.dumps({key: entry})[1:-1]
        return _join(text[:-1].encode() + b", " + dup.encode() + b"}", data)
    elif kind == 10:
        text = rng.choice([b"[]", b"null", b"1", b'"str"', b"{}", b"{\xff\xfe}", b"", b"{" * 200])
        return _join(text, data)
    else:  # shapes and offsets swapped between tensors
        other = header[rng.choice(keys)]
        entry["shape"], other["shape"] = other["shape"], entry["shape"]
    return _join(json.dumps(header).encode(), data)


def _mutate_bytes(rng: random.Random, raw: bytes, header_len: int) -> bytes:
    """Byte-level mutations: flips in the header, truncation, a lying header length."""
    buf = bytearray(raw)
    kind = rng.randrange(5)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(8, 8 + header_len)
            buf[i] = rng.randrange(256)
    elif kind == 1:
        return bytes(buf[: rng.randrange(len(buf))])
    elif kind == 2:
        n = rng.choice([0, 1, 7, header_len - 1, header_len + 1, len(buf) - 8, len(buf), 2**32, 2**63, 2**64 - 1])
        buf[:8] = struct.pack("<Q", n)
    elif kind == 3:
        for _ in range(rng.randint(1, 32)):
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
    else:
        buf += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))  # trailing junk
    return bytes(buf)


def _read_everything(folder: Path) -> None:
    reader = CheckpointReader(folder, workers=2)
    try:
        for key in reader.tensors:
            arr = reader.read(key)
            assert isinstance(arr, np.ndarray)
    finally:
        reader.close()


def _fuzz(tmp_path: Path, n: int, make: Callable[[random.Random, Path], str]) -> None:
    """Run n seeded cases; collect every non-ConvertError escape and report them together."""
    escapes: list[str] = []
    for seed in range(n):
        rng = random.Random(seed)
        folder = tmp_path / f"case-{seed}"
        folder.mkdir()
        what = make(rng, folder)
        try:
            _read_everything(folder)
        except ConvertError as e:
            assert "\n" not in str(e), f"seed {seed} ({what}): multi-line message {e!s:.300}"
        except Exception as e:  # noqa: BLE001 - this is exactly what we hunt for
            escapes.append(f"seed {seed} ({what}): {type(e).__module__}.{type(e).__name__}: {str(e)[:200]!r}")
    assert not escapes, f"{len(escapes)}/{n} inputs escaped with a foreign exception type:\n" + "\n".join(escapes[:15])


def test_fuzz_safetensors_headers(tmp_path):
    base = _base_safetensors()
    header, data = _split(base)
    header_len = struct.unpack("<Q", base[:8])[0]

    def make(rng: random.Random, folder: Path) -> str:
        if rng.random() < 0.6:
            raw, what = _mutate_header(rng, json.loads(json.dumps(header)), data), "header"
        else:
            raw, what = _mutate_bytes(rng, base, header_len), "bytes"
        if rng.random() < 0.2:  # stack a second mutation
            raw = _mutate_bytes(rng, raw, min(header_len, max(1, len(raw) - 8)))
            what += "+bytes"
        (folder / "model.safetensors").write_bytes(raw)
        return what

    _fuzz(tmp_path, N_SAFETENSORS, make)


def test_fuzz_safetensors_index(tmp_path):
    from safetensors.torch import save

    tensors = _base_tensors()
    shards = {"model-00001-of-00002.safetensors": {k: tensors[k] for k in ("a.weight", "b.bias")},
              "model-00002-of-00002.safetensors": {k: tensors[k] for k in ("c.embed", "d.scalar")}}
    blobs = {name: save(sd) for name, sd in shards.items()}
    weight_map = {k: name for name, sd in shards.items() for k in sd}

    def make(rng: random.Random, folder: Path) -> str:
        for name, blob in blobs.items():
            (folder / name).write_bytes(blob)
        wm: object = dict(weight_map)
        kind = rng.randrange(9)
        if kind == 0:
            wm[rng.choice(list(weight_map))] = rng.choice(["model-00002-of-00002.safetensors", "nope.safetensors",
                                                           "", ".", "..", "/etc/passwd", "a/../b", "x\u0000y",
                                                           "model.safetensors.index.json"])
        elif kind == 1:
            wm[rng.choice(list(weight_map))] = rng.choice(WEIRD_VALUES)
        elif kind == 2:
            wm.pop(rng.choice(list(weight_map)))
        elif kind == 3:
            wm["ghost.weight"] = rng.choice(list(blobs))
        elif kind == 4:
            wm = rng.choice(WEIRD_VALUES)
        elif kind == 5:
            (folder / rng.choice(list(blobs))).unlink()
        elif kind == 6:
            (folder / "model-00003-of-00003.safetensors").write_bytes(blobs["model-00001-of-00002.safetensors"])
        elif kind == 7:
            text = rng.choice(["", "{", "[]", "null", '{"weight_map": ', '{"metadata": {}}', "\xff"])
            (folder / "model.safetensors.index.json").write_text(text, errors="surrogateescape")
            return f"index text {text!r}"
        else:
            name = rng.choice(list(blobs))
            raw = bytearray(blobs[name])
            raw[rng.randrange(8, 40)] ^= 0xFF
            (folder / name).write_bytes(bytes(raw))
        doc = rng.choice([{"metadata": {"total_size": 1}, "weight_map": wm}, {"weight_map": wm}])
        (folder / "model.safetensors.index.json").write_text(json.dumps(doc))
        return f"index kind {kind}"

    _fuzz(tmp_path, N_INDEX, make)


def _zip_entries(raw: bytes) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        return [(info, z.read(info)) for info in z.infolist()]


def _rezip(entries: list[tuple[zipfile.ZipInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info, data in entries:
            z.writestr(info.filename, data)
    return out.getvalue()


def test_fuzz_pytorch_bin(tmp_path):
    buf = io.BytesIO()
    torch.save(_base_tensors(), buf)
    base = buf.getvalue()
    entries = _zip_entries(base)
    pkl_index = next(i for i, (info, _) in enumerate(entries) if info.filename.endswith("data.pkl"))
    others = [object(), 1, "s", [torch.zeros(2)], {"k": 1}, torch.zeros(2, dtype=torch.int64),
              torch.zeros(2, dtype=torch.complex64), {"nested": {"a": torch.zeros(1)}}, (torch.zeros(1),)]

    def make(rng: random.Random, folder: Path) -> str:
        kind = rng.randrange(6)
        if kind == 0:  # flips anywhere in the zip (headers, pickle, tensor bytes, central directory)
            raw = bytearray(base)
            for _ in range(rng.randint(1, 16)):
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
            raw = bytes(raw)
        elif kind == 1:
            raw = base[: rng.randrange(len(base))]
        elif kind == 2:  # a valid zip whose pickle bytes are mutated
            pkl = bytearray(entries[pkl_index][1])
            for _ in range(rng.randint(1, 6)):
                i = rng.randrange(len(pkl))
                pkl[i] = rng.randrange(256) if rng.random() < 0.5 else pkl[rng.randrange(len(pkl))]
            mutated = list(entries)
            mutated[pkl_index] = (entries[pkl_index][0], bytes(pkl))
            raw = _rezip(mutated)
        elif kind == 3:  # a tensor record cut short / dropped from the archive
            mutated = [(info, data[: len(data) // 2]) if "/data/" in info.filename and rng.random() < 0.5
                       else (info, data) for info, data in entries]
            if rng.random() < 0.3:
                mutated = [e for e in mutated if not e[0].filename.endswith("/data/0")]
            raw = _rezip(mutated)
        elif kind == 4:  # legal pickles of things that are not a dict of float tensors
            value = rng.choice(others)
            sd = {"a.weight": torch.zeros(2), "x": value} if rng.random() < 0.5 else value
            b = io.BytesIO()
            try:
                torch.save(sd, b)
            except Exception:  # noqa: BLE001 - e.g. object() is not picklable by torch.save
                b = io.BytesIO(base)
            raw = b.getvalue()
        else:
            raw = rng.choice([b"", b"PK\x03\x04", b"PK\x05\x06" + bytes(18), b"\x80\x02}q\x00.",
                              base + bytes(rng.randrange(256) for _ in range(32))])
        (folder / "pytorch_model.bin").write_bytes(raw)
        return f"bin kind {kind}"

    _fuzz(tmp_path, N_BIN, make)


def test_fuzz_base_files_are_valid(tmp_path):
    # The mutations start from files the reader accepts; otherwise the fuzzing proves nothing.
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "model.safetensors").write_bytes(_base_safetensors())
    _read_everything(tmp_path / "st")
    (tmp_path / "bin").mkdir()
    torch.save(_base_tensors(), tmp_path / "bin" / "pytorch_model.bin")
    _read_everything(tmp_path / "bin")
