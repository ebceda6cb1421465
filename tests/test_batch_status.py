"""Batch job status (issue 22 item 4): results.jsonl is never empty or partial, also after a
crash, and `mlx-music batch --status DIR` says done / failed / missing rows with an exit code a
script can trust (mlx.launch does not forward the ranks' exit codes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_music.runtime import batch_job
from mlx_music.runtime.batch_job import MANIFEST, batch_status, run_batch
from generation_helpers import write_jsonl

ROWS = [{"id": f"r{i}", "prompt": f"prompt {i}", "duration": 0.04, "seed": i} for i in range(5)]


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / MANIFEST).read_text(encoding="ascii").splitlines()]


def status_cli(out: Path):
    from mlx_music.cli import main

    return CliRunner().invoke(main, ["batch", "--status", str(out)], catch_exceptions=False)


def test_a_crash_leaves_every_row_listed_and_status_says_what_is_missing(tmp_path, pipe, model, monkeypatch):
    prompts = write_jsonl(tmp_path / "p.jsonl", ROWS)
    out = tmp_path / "out"
    real, calls = batch_job._write_audio, []

    def dies_on_the_third_file(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process is killed while writing row 3
        return real(*args, **kwargs)

    monkeypatch.setattr(batch_job, "_write_audio", dies_on_the_third_file)
    with pytest.raises(KeyboardInterrupt):
        run_batch(prompts, pipe, out, batch_size=1, progress=False, model_name=str(model))
    entries = manifest(out)  # merged after every batch: never empty, never a torn line
    assert [e["id"] for e in entries] == [r["id"] for r in ROWS]
    assert [e["status"] for e in entries].count("ok") == 2
    assert [e["status"] for e in entries].count("missing") == 3
    missing = next(e for e in entries if e["status"] == "missing")
    assert missing["row"] >= 1 and "rerun" in missing["reason"]
    st = batch_status(out)
    assert (st.rows, len(st.ok), len(st.failed), len(st.missing), st.exit_code) == (5, 2, 0, 3, 3)
    r = status_cli(out)
    assert r.exit_code == 3, r.output + r.stderr
    assert "5 rows: 2 ok, 0 failed, 3 missing" in r.output
    assert all(f"missing: {i}" in r.output for i in st.missing)

    monkeypatch.setattr(batch_job, "_write_audio", real)
    again = run_batch(prompts, pipe, out, batch_size=2, progress=False, model_name=str(model))
    assert (again.skipped, again.generated, again.ok, again.failed, again.missing) == (2, 3, 5, 0, 0)
    assert [e["status"] for e in manifest(out)] == ["ok"] * 5
    r = status_cli(out)
    assert (r.exit_code, r.output.splitlines()[0]) == (0, "5 rows: 5 ok, 0 failed, 0 missing")
    (out / "r4.wav").unlink()  # an ok row whose file is gone is not done
    assert batch_status(out).missing == ["r4"] and status_cli(out).exit_code == 3


def test_parts_newer_than_the_manifest_count(tmp_path, pipe, model):
    """A rank killed between its part line and the next merge: status reads the parts too."""
    prompts = write_jsonl(tmp_path / "p.jsonl", ROWS[:2])
    out = tmp_path / "out"
    run_batch(prompts, pipe, out, progress=False, model_name=str(model))
    entries = manifest(out)
    stale = [dict(entries[0]), {**{k: entries[1][k] for k in ("id", "prompt", "duration", "seed")},
                                "row": 2, "status": "missing", "reason": "not generated yet"}]
    (out / MANIFEST).write_text("".join(json.dumps(e) + "\n" for e in stale), encoding="ascii")
    assert batch_status(out).missing == ["r1"]
    (out / "results.part-1.jsonl").write_text(json.dumps(entries[1]) + "\n" + '{"id": "r1", "sta', encoding="ascii")
    st = batch_status(out)
    assert (st.ok, st.missing, st.exit_code) == (["r0", "r1"], [], 0)


def test_failed_rows_exit_1_and_a_folder_without_a_job_exits_2(tmp_path, pipe, model):
    prompts = write_jsonl(tmp_path / "p.jsonl", [ROWS[0], {"id": "bad", "prompt": "x", "duration": -1}])
    out = tmp_path / "out"
    run_batch(prompts, pipe, out, progress=False, model_name=str(model))
    r = status_cli(out)
    assert r.exit_code == 1
    assert "2 rows: 1 ok, 1 failed, 0 missing" in r.output
    assert "failed: bad: duration -1: must be a positive number of seconds" in r.output
    r = status_cli(tmp_path)
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [f"error: --status {tmp_path}: no {MANIFEST} (not a batch output folder)"]
