"""Batch jobs (`mlx-music batch`, runtime/batch_job.py): prompts files, the manifest, resuming,
bad rows, and 2 ranks through `mlx.launch --backend ring` on the loopback."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mlx_music.runtime.batch_job import MANIFEST, model_checksum, read_prompts, run_batch
from mlx_music.runtime.checksums import sha256_file
from generation_helpers import write_jsonl

BIN = Path(sys.executable).parent
# Unicode prompts and ids; short, equal durations keep the compiled step shapes few and the tests fast.
ROWS = [
    {"id": "café-01", "prompt": "80s pop with synths 🎹", "duration": 0.1, "seed": 11},
    {"id": "b", "prompt": "música tranquila, piano", "duration": 0.1, "seed": 12, "temperature": 0.7},
    {"id": "c", "prompt": "ドラムとベース", "duration": 0.1, "seed": 13, "top_k": 50},
    {"prompt": "ambient pads", "duration": 0.1, "seed": 14, "guidance_scale": 1.0},
    {"id": "e", "prompt": "jazz trio", "duration": 0.1, "seed": 15, "greedy": True},
    {"id": "f", "prompt": "Ελληνική λύρα", "duration": 0.1, "seed": 16, "top_p": 0.9},
    {"id": "g", "prompt": "lofi beat", "duration": 0.1, "seed": 17},
    {"id": "h", "prompt": "techno", "duration": 0.1, "seed": 18},
]
IDS = ["café-01", "b", "c", "00004", "e", "f", "g", "h"]  # row 4 has no id: its row number


def write_csv(path: Path, rows: list[dict]) -> Path:
    cols = ["id", "prompt", "duration", "seed", "guidance_scale", "temperature", "top_k", "top_p", "greedy"]
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: str(v).lower() if isinstance(v, bool) else v for k, v in r.items()})
    return path


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / MANIFEST).read_text(encoding="utf-8").splitlines()]


def check_complete(out: Path, ids: list[str], model: Path, reference: dict[str, str] | None = None) -> None:
    """Every row ok exactly once, each file complete with its recorded sha256, nothing else left."""
    entries = manifest(out)
    assert [e["id"] for e in entries] == ids
    assert all(e["status"] == "ok" for e in entries), entries
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{i}.wav" for i in ids] + [MANIFEST])
    sha = model_checksum(model)
    for e in entries:
        f = out / e["file"]
        assert e["sha256"] == sha256_file(f) and e["model_sha256"] == sha
        info = sf.info(str(f))
        assert (info.frames, info.channels, info.samplerate) == (e["samples"], e["channels"], e["sample_rate"])
        assert e["samples"] == round(e["duration"] * 50) * 640  # frames x the codec hop
        if reference is not None:
            assert e["sha256"] == reference[e["id"]], e["id"]


def cli_batch(prompts: Path, model: Path, out: Path, batch_size: int) -> str:
    """`mlx-music batch` as its own process. Runs compared bit for bit are all fresh processes:
    MKL's results depend on its thread settings, which tests in this process change (parity runs
    single-threaded), so an in-process run is not a fair reference for a subprocess."""
    r = subprocess.run([sys.executable, "-m", "mlx_music.cli", "batch", str(prompts), "--model", str(model),
                        "--out-dir", str(out), "--batch-size", str(batch_size), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pipe, model) -> tuple[Path, dict[str, str]]:
    """This process, batches of 4: the outputs every other in-process run must reproduce."""
    root = tmp_path_factory.mktemp("ref")
    prompts = write_jsonl(root / "prompts.jsonl", ROWS)
    s = run_batch(prompts, pipe, root / "out", batch_size=4, progress=False, model_name=str(model))
    assert (s.ok, s.failed, s.generated, s.skipped) == (8, 0, 8, 0)
    check_complete(root / "out", IDS, model)
    return root / "out", {e["id"]: e["sha256"] for e in manifest(root / "out")}


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory, model) -> tuple[Path, dict[str, str]]:
    """One fresh process, batches of 4: what runs under mlx.launch must reproduce."""
    root = tmp_path_factory.mktemp("cli-ref")
    prompts = write_jsonl(root / "prompts.jsonl", ROWS)
    assert "8 rows: 8 ok (0 done earlier), 0 failed" in cli_batch(prompts, model, root / "out", 4)
    check_complete(root / "out", IDS, model)
    return root / "out", {e["id"]: e["sha256"] for e in manifest(root / "out")}


# ------------------------------------------------------------------------------- reading
def test_jsonl_and_csv_read_the_same_rows(tmp_path):
    a = read_prompts(write_jsonl(tmp_path / "p.jsonl", ROWS))
    b = read_prompts(write_csv(tmp_path / "p.csv", ROWS))
    assert [r.id for r in a] == [r.id for r in b] == IDS
    for x, y in zip(a, b):
        assert (x.prompt, x.duration, x.seed, x.settings, x.error) == (y.prompt, y.duration, y.seed, y.settings, None)
    assert a[1].settings == {"temperature": 0.7} and a[4].settings == {"greedy": True}
    assert a[2].settings == {"top_k": 50} and isinstance(b[2].settings["top_k"], int)
    assert a[2].prompt == "ドラムとベース" and a[3].seed == 14


def test_csv_rows_give_the_same_files(tmp_path, pipe, model, reference):
    prompts = write_csv(tmp_path / "prompts.csv", ROWS)
    s = run_batch(prompts, pipe, tmp_path / "out", batch_size=8, progress=False, model_name=str(model))
    assert (s.ok, s.generated) == (8, 8)
    check_complete(tmp_path / "out", IDS, model, reference[1])  # batch of 8 = batches of 4, bit for bit


# ------------------------------------------------------------------------------ bad rows
def test_bad_rows_fail_alone_and_the_job_goes_on(tmp_path, pipe, model):
    (tmp_path / "hum.wav").write_bytes(b"")  # exists: the model check comes after the file check
    (tmp_path / "broken.wav").write_bytes(b"not audio")
    rows = [
        '{"id": "ok", "prompt": "fine", "duration": 0.2, "seed": 1}',
        '{"id": "k", "prompt": "x", "duration": 0.2, "colour": "red"}',
        '{"id": "neg", "prompt": "x", "duration": -1}',
        '{"id": "nomel", "prompt": "x", "duration": 0.2, "melody": "missing.wav"}',
        '{"id": "mel", "prompt": "x", "duration": 0.2, "melody": "hum.wav"}',
        '{"id": "t0", "prompt": "x", "duration": 0.2, "temperature": 0}',
        '{"id": "tk", "prompt": "x", "duration": 0.2, "top_k": 2.5}',
        '{"id": "OK", "prompt": "again", "duration": 0.2}',
        '{"id": "a/b", "prompt": "x", "duration": 0.2}',
        '{"prompt": "x", "duration": 0.2',
        '{"id": "nop", "duration": 0.2}',
        '{"id": "cont", "prompt": "x", "duration": 0.2, "audio_prompt": "broken.wav"}',
        '{"id": "ok2", "prompt": "also fine", "duration": 0.2, "seed": 2}',
    ]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(rows) + "\n", encoding="utf-8")
    s = run_batch(prompts, pipe, tmp_path / "out", batch_size=4, progress=False)
    got = [(e["id"], e.get("row"), e["status"], e.get("reason")) for e in manifest(tmp_path / "out")]
    broken = tmp_path / "broken.wav"
    assert got == [
        ("ok", None, "ok", None),
        ("k", 2, "failed", "unknown key 'colour' (expected: id, prompt, duration, seed, melody, audio_prompt, "
                           "guidance_scale, temperature, top_k, top_p, greedy)"),
        ("neg", 3, "failed", "duration -1: must be a positive number of seconds"),
        ("nomel", 4, "failed", "melody missing.wav: file not found"),
        ("mel", 5, "failed", "melody: this checkpoint is not a melody model (use a musicgen-melody variant)"),
        ("t0", 6, "failed", "temperature 0: must be > 0 (use greedy for argmax decoding)"),
        ("tk", 7, "failed", "top_k 2.5: must be an integer"),
        ("OK", 8, "failed", "id 'OK': already used by row 1"),  # file systems that ignore case
        ("00009", 9, "failed", "id 'a/b': must be a plain file name (no slashes, no leading dot or space)"),
        ("00010", 10, "failed", "not valid JSON (Expecting ',' delimiter: line 1 column 32 (char 31))"),
        ("nop", 11, "failed", "prompt: missing"),
        # found only when generating: its batch is redone row by row, the others still succeed
        ("cont", 12, "failed", f"audio_prompt {broken}: cannot read audio (unsupported or corrupt file: Error opening "
                               f"'{broken}': Format not recognised.)"),
        ("ok2", None, "ok", None),
    ]
    assert (s.ok, s.failed, s.generated) == (2, 11, 2)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ok.wav", "ok2.wav", MANIFEST]
    # the good rows are what they are alone
    alone = pipe.generate("fine", 0.2, seed=1).audio[0]
    assert np.array_equal(sf.read(str(tmp_path / "out" / "ok.wav"), dtype="int16")[0].T,
                          sf.read(_wav(tmp_path / "alone.wav", alone), dtype="int16")[0].T)


def _wav(path: Path, audio) -> str:
    from mlx_music.runtime import save_audio

    save_audio(path, audio, 32000)
    return str(path)


def test_strict_stops_before_anything_is_written(tmp_path, model):
    prompts = write_jsonl(tmp_path / "p.jsonl", ROWS[:2] + [{"id": "x", "prompt": "y", "duration": -2}, {"z": 1}])
    out = tmp_path / "out"
    r = subprocess.run([str(BIN / "mlx-music"), "batch", str(prompts), "--model", str(model), "--out-dir", str(out),
                        "--strict"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [f"error: {prompts} row 3 (line 3, id 'x'): duration -2: must be a positive "
                                     "number of seconds (and 1 more bad rows)"]
    assert not out.exists()
    r = subprocess.run([str(BIN / "mlx-music"), "batch", str(tmp_path / "nope.csv"), "--model", str(model),
                        "--out-dir", str(out)], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stderr) == (2, f"error: {tmp_path / 'nope.csv'}: file not found\n")
    assert not out.exists()


# -------------------------------------------------------------------------------- resume
def test_resume_redoes_only_what_is_missing_or_changed(tmp_path, pipe, model, reference):
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    rows = [dict(r) for r in ROWS]
    rows[6]["seed"] = 99  # "g" changed: redone
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    (out / "b.wav").unlink()  # deleted: redone
    data = (out / "c.wav").read_bytes()
    (out / "c.wav").write_bytes(data[: len(data) // 2])  # truncated (the manifest says ok): redone
    (out / ".partial-1-4242-h.wav").write_bytes(data[:100])  # a dead run's temporary file
    (out / "results.part-3.jsonl").write_text('{"id": "h", "status": "ok", "sha256": "0"}\n{"id": "e", "sta')
    s = run_batch(prompts, pipe, out, batch_size=4, progress=False, model_name=str(model))
    assert (s.ok, s.failed, s.skipped, s.generated) == (8, 0, 4, 4)  # b, c, g, and h (its part line lied)
    ref = dict(reference[1])
    ref["g"] = run_batch(write_jsonl(tmp_path / "g.jsonl", [rows[6]]), pipe, tmp_path / "g", progress=False,
                         model_name=str(model)) and manifest(tmp_path / "g")[0]["sha256"]
    assert ref["g"] != reference[1]["g"]
    check_complete(out, IDS, model, ref)
    again = run_batch(prompts, pipe, out, batch_size=4, progress=False, model_name=str(model))
    assert (again.skipped, again.generated) == (8, 0)


# ---------------------------------------------------------------------- 2 ranks, mlx.launch
def _free_port() -> int:
    """A port p with p and p + 1 free (the ring backend listens on one port per rank)."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                with socket.socket() as b:
                    b.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair")


def _launch(prompts: Path, model: Path, out: Path, batch_size: int) -> subprocess.Popen:
    cmd = [str(BIN / "mlx.launch"), "-n", "2", "--backend", "ring", "-p", str(_free_port()),
           "--python", sys.executable, str(BIN / "mlx-music"), "batch", str(prompts), "--model", str(model),
           "--out-dir", str(out), "--batch-size", str(batch_size), "--quiet"]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The process mlx.launch started for ``rank`` (its child with MLX_RANK=rank)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (d / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and f"MLX_RANK={rank}".encode() in env:
            return int(d.name)
    return None


def _finish(p: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    try:
        return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise


def test_two_ranks_share_the_rows_and_match_one_process(tmp_path, model, cli_reference):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    p = _launch(prompts, model, tmp_path / "out", batch_size=3)
    stdout, stderr = _finish(p)
    assert "8 rows: 8 ok (0 done earlier), 0 failed" in stdout, stdout + stderr
    done = [line for line in (stdout + stderr).splitlines() if "generated" in line]
    assert sorted(line.split(" s of audio")[0] for line in done) == [
        "rank 0/2: generated 4 rows, 0.4", "rank 1/2: generated 4 rows, 0.4"]  # each row exactly once
    check_complete(tmp_path / "out", IDS, model, cli_reference[1])  # bit for bit what one process wrote
    st = subprocess.run([str(BIN / "mlx-music"), "batch", "--status", str(tmp_path / "out")], capture_output=True,
                        text=True, timeout=120)
    assert (st.returncode, st.stdout) == (0, "8 rows: 8 ok, 0 failed, 0 missing\n")


def test_a_killed_rank_leaves_its_rows_to_the_resume(tmp_path, model, cli_reference):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    out = tmp_path / "out"
    p = _launch(prompts, model, out, batch_size=1)
    part = out / "results.part-1.jsonl"
    deadline = time.monotonic() + 90
    while not (part.is_file() and part.read_text(encoding="utf-8").count("\n") >= 1):
        assert p.poll() is None and time.monotonic() < deadline, _finish(p)
        time.sleep(0.02)
    pid = _rank_pid(p.pid, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # mid-run: rank 1 has finished 1 of its 4 rows
    _finish(p)  # mlx.launch stops rank 0 too
    finished = {e["id"] for part in out.glob("results.part-*.jsonl") for e in map(json.loads, part.open())}
    assert 1 <= len(finished) < 8
    # mlx.launch's exit code says nothing (issue 22): results.jsonl lists every row, never empty,
    # and `batch --status` (manifest + parts) says which rows are missing, exit 3
    assert [e["id"] for e in manifest(out)] == IDS
    assert {e["id"] for e in manifest(out) if e["status"] == "ok"} <= finished
    st = subprocess.run([str(BIN / "mlx-music"), "batch", "--status", str(out)], capture_output=True, text=True,
                        timeout=120)
    assert st.returncode == 3, st.stdout + st.stderr
    assert st.stdout.splitlines()[0] == f"8 rows: {len(finished)} ok, 0 failed, {8 - len(finished)} missing"
    log = cli_batch(prompts, model, out, 4)  # resumed by one process
    assert f"8 rows: 8 ok ({len(finished)} done earlier), 0 failed" in log, log
    check_complete(out, IDS, model, cli_reference[1])  # no truncated, duplicated or temporary file left


# ------------------------------------------------------------------------- issue 22: seeds
def test_row_seeds_use_the_one_range_and_files_record_them(tmp_path, pipe, model):
    """Row seeds are checked like every seed ([0, 2**32 - 1], `sampling.check_seed`); each file
    records its seed and settings in its metadata (a comment tag), as the manifest does."""
    rows = [{"id": "top", "prompt": "x", "duration": 0.1, "seed": 2**32 - 1},
            {"id": "neg", "prompt": "x", "duration": 0.1, "seed": -1},
            {"id": "big", "prompt": "x", "duration": 0.1, "seed": 2**32},
            {"id": "huge", "prompt": "x", "duration": 0.1, "seed": 18446744073709551615},
            {"id": "def", "prompt": "y", "duration": 0.1, "top_k": 7}]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    s = run_batch(prompts, pipe, tmp_path / "out", batch_size=4, progress=False, model_name=str(model))
    got = {e["id"]: (e["status"], e.get("reason")) for e in manifest(tmp_path / "out")}
    why = "must be an integer in [0, 4294967295] (leave it out for a random seed)"
    assert got == {"top": ("ok", None), "neg": ("failed", f"seed -1: {why}"), "big": ("failed", f"seed 4294967296: {why}"),
                   "huge": ("failed", f"seed 18446744073709551615: {why}"), "def": ("ok", None)}
    assert (s.ok, s.failed) == (2, 3)
    for e in manifest(tmp_path / "out"):
        if e["status"] == "ok":
            tags = json.loads(sf.SoundFile(str(tmp_path / "out" / e["file"])).comment)
            assert tags == {"seed": e["seed"], "prompt": e["prompt"], "duration": e["duration"],
                            "settings": e["settings"], "model": str(model), "id": e["id"]}
    assert manifest(tmp_path / "out")[-1]["seed"] == 5 and manifest(tmp_path / "out")[-1]["settings"]["top_k"] == 7


# ---------------------------------------------------------- issue 22: rows, inputs, manifest
# U+0085 (NEL), U+2028/U+2029 and \x1c-\x1e are line breaks to str.splitlines(), not to JSONL
# (lines end at \n) or CSV (records end at an unquoted \n or \r\n).
SEPARATORS = "a\u0085b\u2028c\u2029d\x1ce\x1df\x1eg\x0bh\x0ci"


def test_line_separators_never_lose_or_invent_rows(tmp_path, pipe, model):
    rows = [{"id": "esc", "prompt": f"esc {SEPARATORS}", "duration": 0.04, "seed": 1},
            {"id": "raw", "prompt": f"raw {SEPARATORS}", "duration": 0.04, "seed": 2},
            {"id": "plain", "prompt": "plain", "duration": 0.04, "seed": 3}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps(rows[0], ensure_ascii=True) + "\r\n" + json.dumps(rows[1], ensure_ascii=False)
                     + "\n\n" + json.dumps(rows[2]) + "\n", encoding="utf-8")
    assert "\u2028" in jsonl.read_text(encoding="utf-8")  # the raw row holds the characters unescaped
    csv_rows = [dict(r) for r in rows]
    csv_rows[2]["prompt"] = "two\nlines, \"quoted\"\r\nand a CR\r"  # a quoted multi-line field
    csvf = write_csv(tmp_path / "p.csv", csv_rows)
    for path, want in ((jsonl, rows), (csvf, csv_rows)):
        got = read_prompts(path)
        assert [(r.id, r.prompt, r.error) for r in got] == [(r["id"], r["prompt"], None) for r in want], path
        out = tmp_path / f"out-{path.suffix[1:]}"
        s = run_batch(path, pipe, out, batch_size=4, progress=False, model_name=str(model))
        assert (s.ok, s.failed, s.generated) == (3, 0, 3)
        lines = (out / MANIFEST).read_bytes().split(b"\n")
        assert lines[-1] == b"" and len(lines) == 4 and all(line.isascii() for line in lines)  # escaped
        assert [(e["id"], e["prompt"]) for e in manifest(out)] == [(r["id"], r["prompt"]) for r in want]
        assert sorted(p.name for p in out.iterdir()) == sorted(["esc.wav", "raw.wav", "plain.wav", MANIFEST])
        again = run_batch(path, pipe, out, batch_size=4, progress=False, model_name=str(model))
        assert (again.skipped, again.generated) == (3, 0)  # every row found done


def test_resume_compares_input_contents_not_paths(tmp_path, pipe, model):
    """Replacing a row's audio_prompt (or melody) file by another at the same path redoes the row."""
    from mlx_music.runtime import save_audio

    t = np.arange(16000) / 32000
    save_audio(tmp_path / "in.wav", 0.3 * np.sin(2 * np.pi * 220 * t), 32000)
    prompts = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "cont", "prompt": "x", "duration": 0.8, "seed": 1, "audio_prompt": "in.wav"},
        {"id": "plain", "prompt": "x", "duration": 0.1, "seed": 1}])
    out = tmp_path / "out"
    first = run_batch(prompts, pipe, out, progress=False, model_name=str(model))
    assert (first.ok, first.generated) == (2, 2)
    entry = manifest(out)[0]
    assert entry["audio_prompt_sha256"] == sha256_file(tmp_path / "in.wav")
    save_audio(tmp_path / "in.wav", 0.3 * np.sin(2 * np.pi * 330 * t), 32000)  # same path, new melody
    second = run_batch(prompts, pipe, out, progress=False, model_name=str(model))
    assert (second.skipped, second.generated) == (1, 1)
    assert manifest(out)[0]["audio_prompt_sha256"] == sha256_file(tmp_path / "in.wav") != entry["audio_prompt_sha256"]
    assert manifest(out)[0]["sha256"] != entry["sha256"]


def test_melody_identity_is_its_sha256(tmp_path):
    """The melody path of a row: its request (what resume compares) holds the file's sha256."""
    from mlx_music.runtime.batch_job import _request, check_rows

    class MelodyModel:
        defaults: dict = {}
        is_melody = True

    (tmp_path / "hum.wav").write_bytes(b"one")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "duration": 1, "melody": "hum.wav"}])
    rows = read_prompts(prompts)
    check_rows(rows, MelodyModel(), tmp_path)
    a = _request(rows[0], "m", "sha", "wav")
    (tmp_path / "hum.wav").write_bytes(b"two")
    rows = read_prompts(prompts)
    check_rows(rows, MelodyModel(), tmp_path)
    b = _request(rows[0], "m", "sha", "wav")
    assert a["melody"] == b["melody"] == "hum.wav" and a["melody_sha256"] != b["melody_sha256"]
    assert b["melody_sha256"] == sha256_file(tmp_path / "hum.wav") and a["audio_prompt_sha256"] is None
