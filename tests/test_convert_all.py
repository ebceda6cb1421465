"""convert_all: every variant in one run, skip verified outputs, redo corrupt ones, survive failures.

The real variants are gigabytes, so `hf_root` holds tiny fixtures under variant names. They are not
the real checkpoints and must not pass as such: with check_variant=True the variant's manifest
rejects them (tested below); the other tests use check_variant=False, which auto-detects like
`mlx-music convert` without --variant and converts them as "custom" (recorded variant null).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mlx_music.converters import convert_all as ca
from mlx_music.converters.convert import QuantizeOptions
from mlx_music.converters.errors import ManifestError

MONO, STEREO, BROKEN = "musicgen-small", "musicgen-stereo-small", "musicgen-medium"


@pytest.fixture()
def hf_root(tmp_path: Path, hf_folder) -> Path:
    """Tiny mono/stereo checkpoints named like variants, plus one whose weights file is garbage."""
    root = tmp_path / "hf"
    root.mkdir()
    shutil.copytree(hf_folder("mono"), root / MONO)
    shutil.copytree(hf_folder("stereo"), root / STEREO)
    shutil.copytree(hf_folder("mono"), root / BROKEN)
    (root / BROKEN / "model.safetensors").write_bytes(b"not a safetensors file")
    return root


def _status(rows: list[ca.Row]) -> dict[str, str]:
    return {r.variant: r.status for r in rows}


def test_output_names() -> None:
    assert ca.output_name("musicgen-small") == "musicgen-small"
    assert ca.output_name("musicgen-small", "float16") == "musicgen-small-fp16"
    assert ca.output_name("musicgen-small", quantize=QuantizeOptions(4, 64)) == "musicgen-small-4bit"
    assert ca.output_name("musicgen-small", "bfloat16", QuantizeOptions(8, 32)) == "musicgen-small-bf16-8bit-g32"
    assert ca.output_name("musicgen-small", quantize=QuantizeOptions(4, 64, "mixed-4-8")) == "musicgen-small-mixed-4-8"


def test_unknown_variant_fails_up_front(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="musicgen-tiny"):
        ca.convert_all(tmp_path / "out", ["musicgen-small", "musicgen-tiny"], hf_root=tmp_path)
    assert not (tmp_path / "out").exists()


def test_run_skip_corrupt_and_failures(tmp_path: Path, hf_root: Path) -> None:
    out = tmp_path / "out"
    seen: list[str] = []
    rows = ca.convert_all(out, [MONO, BROKEN, STEREO, "musicgen-large"], hf_root=hf_root,
                          check_variant=False, on_row=lambda r: seen.append(r.variant))
    assert _status(rows) == {MONO: "converted", BROKEN: "failed", STEREO: "converted", "musicgen-large": "failed"}
    assert seen == [MONO, BROKEN, STEREO, "musicgen-large"]  # reported as they finish
    by = {r.variant: r for r in rows}
    assert "model.safetensors" in by[BROKEN].message and by[BROKEN].size == 0
    assert "does not exist" in by["musicgen-large"].message
    assert "custom" in by[MONO].message
    assert not (out / BROKEN).exists() and not list(out.glob(".*partial*"))
    for v in (MONO, STEREO):
        assert by[v].size > 0 and (out / v / "conversion.json").is_file()
        assert json.loads((out / v / "config.json").read_text())["audio_channels"] == (1 if v == MONO else 2)

    # Second run: verified outputs are skipped, the broken source fails again.
    rows = ca.convert_all(out, [MONO, BROKEN, STEREO], hf_root=hf_root, check_variant=False)
    assert _status(rows) == {MONO: "skipped", BROKEN: "failed", STEREO: "skipped"}

    # Same-size corruption of a weight shard: only the sha256 check can see it.
    shard = out / MONO / "model-00001-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    rows = ca.convert_all(out, [MONO, STEREO], hf_root=hf_root, check_variant=False)
    assert _status(rows) == {MONO: "converted", STEREO: "skipped"}
    assert "sha256" in rows[0].message and shard.name in rows[0].message
    assert ca.verify_output(out / MONO, dtype="float32", quantize=None, variant=None,
                            source=str((hf_root / MONO).resolve())) is None

    # A record whose options differ from the request is not trusted either.
    rec_path = out / STEREO / "conversion.json"
    rec = json.loads(rec_path.read_text())
    rec["dtype"] = "float16"
    rec_path.write_text(json.dumps(rec))
    rows = ca.convert_all(out, [STEREO], hf_root=hf_root, check_variant=False)
    assert rows[0].status == "converted" and "dtype" in rows[0].message

    # force re-converts even verified outputs.
    rows = ca.convert_all(out, [MONO], hf_root=hf_root, check_variant=False, force=True)
    assert rows[0].status == "converted" and "forced" in rows[0].message

    table = ca.format_summary(rows + [ca.Row(BROKEN, "failed", 0.1, 0, "SourceError: boom")])
    assert MONO in table and "SourceError: boom" in table and "1 converted, 0 skipped, 1 failed" in table


def test_manifest_checked_by_default(tmp_path: Path, hf_root: Path) -> None:
    # The tiny fixture is not musicgen-small: with the manifest's expectations it must fail, by name,
    # and the run goes on to the next variant.
    rows = ca.convert_all(tmp_path / "out", [MONO, STEREO], hf_root=hf_root)
    assert [r.status for r in rows] == ["failed", "failed"]
    assert "ManifestError" in rows[0].message and "musicgen-small expects" in rows[0].message


def test_mislabeled_source_fails(tmp_path: Path, hf_root: Path, monkeypatch) -> None:
    # Auto-detection must not accept a *different* known variant under this name. A real variant
    # is too big for a test, so the conversion result is made to report one.
    real = ca.convert_checkpoint

    def detected_medium(*args, **kwargs):
        res = real(*args, **kwargs)
        res.variant = "musicgen-medium"
        return res

    monkeypatch.setattr(ca, "convert_checkpoint", detected_medium)
    rows = ca.convert_all(tmp_path / "out", [MONO], hf_root=hf_root, check_variant=False)
    assert rows[0].status == "failed" and "is musicgen-medium, not musicgen-small" in rows[0].message
    assert not (tmp_path / "out" / MONO).exists()


def test_resume_after_interrupt(tmp_path: Path, hf_root: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    real = ca.convert_checkpoint
    calls: list[str] = []

    def interrupted(source, dest, **kwargs):
        calls.append(Path(dest).name)
        if Path(dest).name.startswith(STEREO):  # Ctrl-C in the middle of the second variant

            def stop(done: int) -> None:
                if done == 5:
                    raise KeyboardInterrupt

            kwargs["_after_tensor"] = stop
        return real(source, dest, **kwargs)

    monkeypatch.setattr(ca, "convert_checkpoint", interrupted)
    q = QuantizeOptions(8, 32)
    with pytest.raises(KeyboardInterrupt):
        ca.convert_all(out, [MONO, STEREO], hf_root=hf_root, quantize=q, check_variant=False)
    assert (out / "musicgen-small-8bit-g32" / "conversion.json").is_file()
    assert not (out / "musicgen-stereo-small-8bit-g32").exists()
    assert not list(out.glob(".*partial*"))  # the interrupted temp folder was cleaned up

    monkeypatch.setattr(ca, "convert_checkpoint", real)
    rows = ca.convert_all(out, [MONO, STEREO], hf_root=hf_root, quantize=q, check_variant=False)
    assert _status(rows) == {MONO: "skipped", STEREO: "converted"}
    cfg = json.loads((out / "musicgen-stereo-small-8bit-g32" / "config.json").read_text())
    assert (cfg["quantization"]["bits"], cfg["quantization"]["group_size"]) == (8, 32)
    assert "modules quantized" in rows[1].message
    # The fp32 output is a different folder: asking for it does not reuse the 8-bit one.
    rows = ca.convert_all(out, [MONO], hf_root=hf_root, check_variant=False)
    assert rows[0].status == "converted" and rows[0].path.name == MONO
