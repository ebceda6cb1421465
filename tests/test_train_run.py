"""The training run (mlx_music.train.run, `mlx-music train`): resume, export, bad input.

Tiny mono model, a tone dataset written by tests/make_tone_dataset.py (1 s pieces).
"""

from __future__ import annotations

import copy
import json
import shutil

import mlx_music  # noqa: F401  (before mlx.core: binds MKL)
import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from make_tone_dataset import write_dataset
from mlx_music.cli import main
from mlx_music.runtime import load
from mlx_music.train.run import TrainOptions, train

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("tones") / "data", seconds=2.0, repeats=1)


def opts(data, model, out, **kw):
    base = dict(steps=6, batch_size=2, rank=4, alpha=8.0, lr=5e-3, segment=1.0, min_seconds=0.5, val_fraction=0.2,
                val_every=3, save_every=2, lora_dropout=0.1, progress=False,
                targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "lm_heads", "enc_to_dec_proj",
                         "embed_tokens"))
    base.update(kw)
    return TrainOptions(data=str(data), model=str(model), out=str(out), **base)


def factors(folder):
    return mx.load(str(folder / "adapters.safetensors"))


def test_resume_is_bit_identical(tmp_path, tones, mlx_folder):
    base = mlx_folder("mono")
    whole = train(opts(tones, base, tmp_path / "whole"))
    cut = train(opts(tones, base, tmp_path / "cut", stop_after=4))  # what a kill after step 4's save leaves
    assert json.loads((cut / "checkpoint" / "state.json").read_text())["step"] == 4
    shutil.rmtree(cut / "cache")  # a resumed run re-encodes what it lacks (same codes)
    train(opts(tones, base, tmp_path / "cut", resume=True))
    a, b = factors(whole), factors(tmp_path / "cut")
    assert a.keys() == b.keys() and len(a) == 2 * (2 * 10 + 4 + 1 + 4)
    for k in a:
        assert np.array_equal(np.array(a[k]), np.array(b[k])), k
    assert any(float(mx.abs(a[k]).max()) > 0 for k in a if k.endswith("lora_b"))
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    whole_rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [r["loss"] for r in whole_rows]
    assert "val_loss" in rows[2] and "val_loss" in rows[5]
    assert (whole / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (whole / "README.md").read_text()
    assert f"base_model: {mlx_folder('mono')}" in card and "| steps | 6 |" in card
    assert f"| train loss (last step) | {whole_rows[-1]['loss']} |" in card and "| data | 10 training pieces" in card


def _logits_mlx(pipe, codes, ids, mask):
    states, m = pipe.model.encode_text(mx.array(ids), mx.array(mask))
    return np.array(pipe.model(mx.array(codes), states, m))  # (B, K, T, V)


def test_export_loads_in_peft_and_merges(tmp_path, tones, mlx_folder, hf_folder, hf_models):
    from peft import PeftModel

    from mlx_music.converters.convert import convert_checkpoint

    base = mlx_folder("mono")
    out = train(opts(tones, base, tmp_path / "run", steps=3, lora_dropout=0.0, sample_prompt="calm piano",
                     sample_seconds=0.5))
    first, last = (sf.read(out / "samples" / f"step-{n:06d}.wav", always_2d=True) for n in (1, 3))
    assert first[1] == 32000 and first[0].shape == (16000, 1) and not np.array_equal(first[0], last[0])
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2048, (2, 4, 10)).astype(np.int32)
    plain = load(base)
    ids, mask = plain.tokenizer(["calm piano", "80s pop with synths"])
    without = _logits_mlx(plain, codes, ids, mask)
    ours = _logits_mlx(load(base, adapter=out), codes, ids, mask)
    assert np.abs(ours - without).max() > 1e-3  # the adapter changes the model

    hf = PeftModel.from_pretrained(copy.deepcopy(hf_models("mono")), str(out / "peft")).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(),
                 decoder_input_ids=torch.tensor(codes.reshape(-1, 10)).long()).logits.numpy()
    ref = ref.reshape(2, 4, 10, -1)
    assert np.abs(ours - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max()), np.abs(ours - ref).max()

    merged = convert_checkpoint(hf_folder("mono"), tmp_path / "merged", adapter=out / "peft", progress=False).path
    m = _logits_mlx(load(merged), codes, ids, mask)
    assert np.abs(m - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def run_cli(*args):
    return CliRunner().invoke(main, ["train", *map(str, args), "--quiet"])


def one_line_error(res, *words):
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for w in words:
        assert w in lines[0], lines[0]


def test_bad_inputs_one_line_exit_2(tmp_path, tones, mlx_folder):
    base = mlx_folder("mono")
    common = ["--model", base, "--steps", "2", "--batch-size", "2", "--rank", "2", "--segment", "1",
              "--min-seconds", "0.5"]
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(run_cli(empty, *common, "--out", tmp_path / "o1"), "is empty")

    def dataset(name, meta: str | None, files=("a4_0.wav",)):
        d = tmp_path / name
        d.mkdir()
        for f in files:
            shutil.copy(tones / f, d / f)
        if meta is not None:
            (d / "metadata.jsonl").write_text(meta)
        return d

    one_line_error(run_cli(dataset("nometa", None), *common, "--out", tmp_path / "o"), "no metadata.jsonl")
    one_line_error(run_cli(dataset("corrupt", '{"file_name": "a4_0.wav", "text": \n'), *common, "--out", tmp_path / "o"),
                   "line 1", "not valid JSON")
    one_line_error(run_cli(dataset("nocap", '{"file_name": "a4_0.wav", "genre": "x"}\n'), *common, "--out", tmp_path / "o"),
                   "no caption column", "genre")
    d = dataset("silent", '{"file_name": "a4_0.wav", "text": "a4"}\n{"file_name": "s.wav", "text": "quiet"}\n')
    sf.write(d / "s.wav", np.zeros(32000, np.float32), 32000)
    one_line_error(run_cli(d, *common, "--out", tmp_path / "o"), "s.wav", "silent")
    d = dataset("garbage", '{"file_name": "g.wav", "text": "noise"}\n', files=())
    (d / "g.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunk")
    one_line_error(run_cli(d, *common, "--out", tmp_path / "o"), "g.wav", "cannot read audio")
    d = dataset("short", '{"file_name": "t.wav", "text": "blip"}\n', files=())
    sf.write(d / "t.wav", np.full(3200, 0.1, np.float32), 32000)  # 0.1 s
    one_line_error(run_cli(d, *common, "--out", tmp_path / "o"), "t.wav", "shorter than the minimum")
    d = dataset("onehz", '{"file_name": "h.wav", "text": "odd"}\n', files=())
    sf.write(d / "h.wav", np.full(64, 0.1, np.float32), 32000)
    raw = bytearray((d / "h.wav").read_bytes())
    raw[24:28] = (1).to_bytes(4, "little")  # sample rate field: 1 Hz
    (d / "h.wav").write_bytes(bytes(raw))
    one_line_error(run_cli(d, *common, "--out", tmp_path / "o"), "h.wav", "1 Hz")
    one_line_error(run_cli(tones, *common, "--out", tmp_path / "o", "--targets", "q_proj,wat_proj"), "--targets wat_proj")
    one_line_error(run_cli(tones, *common, "--out", tmp_path / "o", "--rank", "0"), "--rank 0")
    assert not (tmp_path / "o").exists()  # nothing half-written by any of the above

    out = tmp_path / "done"
    res = run_cli(tones, *common, "--out", out)
    assert res.exit_code == 0, res.output
    one_line_error(run_cli(tones, *common, "--out", out), "already exists", "--resume")
    killed = tmp_path / "killed"  # what a run killed before its first save leaves: a new run starts there
    shutil.copytree(out / "cache", killed / "cache")
    (killed / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    assert run_cli(tones, *common, "--out", killed).exit_code == 0
    assert len((killed / "metrics.jsonl").read_text().splitlines()) == 2
    one_line_error(run_cli(tones, *common, "--out", out, "--resume", "--steps", "4", "--rank", "3"),
                   "--resume", "rank")
    other = dataset("other", '{"file_name": "a4_0.wav", "text": "another caption"}\n')
    one_line_error(run_cli(other, *common, "--out", out, "--resume", "--steps", "4"), "--resume", "not the data")
    one_line_error(run_cli(tones, *common[2:], "--model", mlx_folder("stereo"), "--out", out, "--resume",
                           "--steps", "4"), "--resume", "not the base")


@pytest.mark.parametrize("bits", [8, 4])
def test_qlora_trains_on_quantized_base_and_applies_to_float(bits, tmp_path, tones, mlx_folder, hf_folder):
    from mlx_music.converters.convert import QuantizeOptions, convert_checkpoint
    from mlx_music.train.data import DataSettings, collate, prepare, read_folder
    from mlx_music.train.loss import batch_loss

    qbase = convert_checkpoint(hf_folder("mono"), tmp_path / f"q{bits}", quantize=QuantizeOptions(bits, 32),
                               progress=False).path
    assert json.loads((qbase / "config.json").read_text())["quantization"]["modules"]
    out = train(opts(tones, qbase, tmp_path / "run", steps=8, lr=1e-2, lora_dropout=0.0, text_dropout=0.0,
                     val_fraction=0.0, save_every=4))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.9 * rows[0]["loss"], [r["loss"] for r in rows]

    # the adapter applies to the float base: it lowers that base's loss on the training pieces
    fbase = mlx_folder("mono")
    plain, adapted = load(fbase), load(fbase, adapter=out)
    ds = prepare(read_folder(tones), plain, fbase, DataSettings(1.0, 0.5, 0.0), tmp_path / "cache", progress=False)
    batch = collate(ds.train, ds.text, np.zeros(len(ds.train), bool), 1, 2048)
    before = float(batch_loss(plain.model, **batch))
    after = float(batch_loss(adapted.model, **batch))
    assert after < 0.9 * before, (before, after)


def test_full_disk_while_saving_keeps_the_last_adapter(tmp_path, tones, mlx_folder, monkeypatch):
    import errno

    real, calls = mx.save_safetensors, []

    def save(path, arrays, metadata=None):
        calls.append(path)
        if len(calls) > 3:  # step 2's save wrote 3 files; step 4's first write finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, arrays, metadata=metadata) if metadata is not None else real(path, arrays)

    monkeypatch.setattr(mx, "save_safetensors", save)
    out = tmp_path / "run"
    res = run_cli(tones, "--model", mlx_folder("mono"), "--out", out, "--steps", "6", "--batch-size", "2", "--rank", "2",
                  "--segment", "1", "--min-seconds", "0.5", "--save-every", "2")
    one_line_error(res, "write failed at step 4", "No space left", "kept")
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    assert json.loads((out / "adapter_config.json").read_text())["training"]["step"] == 2
    assert load(mlx_folder("mono"), adapter=out) is not None  # a complete, loadable adapter
    assert not [p.name for p in out.rglob("*partial*")]


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_adapter(tmp_path, tones, mlx_folder, monkeypatch):
    from mlx_music.train import step as step_mod

    real, calls = step_mod.Stepper.gradients, []

    def gradients(self, micro):
        loss, grads = real(self, micro)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), grads

    monkeypatch.setattr(step_mod.Stepper, "gradients", gradients)
    out = tmp_path / "run"
    res = run_cli(tones, "--model", mlx_folder("mono"), "--out", out, "--steps", "6", "--batch-size", "2", "--rank", "2",
                  "--segment", "1", "--min-seconds", "0.5", "--save-every", "5", "--lr", "1e-2")
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: step 3: the loss is nan"), res.output
    assert json.loads((out / "adapter_config.json").read_text())["training"]["step"] == 2
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    saved = factors(out)
    assert any(float(mx.abs(v).max()) > 0 for k, v in saved.items() if k.endswith("lora_b"))  # step 2's factors
    assert all(bool(mx.isfinite(v).all()) for v in saved.values())
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_melody_export_loads_in_peft(tmp_path, tones, mlx_folder, hf_models):
    from peft import PeftModel

    base = mlx_folder("melody")
    out = train(opts(tones, base, tmp_path / "run", steps=2, lora_dropout=0.0, val_fraction=0.0,
                     targets=("q_proj", "v_proj", "fc1", "audio_enc_to_dec_proj", "lm_heads.1")))
    assert json.loads((out / "peft" / "adapter_config.json").read_text())["auto_mapping"]["base_model_class"] == \
        "MusicgenMelodyForConditionalGeneration"
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2048, (2, 4, 10)).astype(np.int32)
    chroma = rng.random((2, 7, 12)).astype(np.float32)
    pipe = load(base, adapter=out)
    ids, mask = pipe.tokenizer(["80s pop", "calm piano"])
    states, m = pipe.model.encode_text(mx.array(ids), mx.array(mask))
    ours = np.array(pipe.model(mx.array(codes), states, m, chroma=mx.array(chroma)))
    plain = load(base)
    without = np.array(plain.model(mx.array(codes), *plain.model.encode_text(mx.array(ids), mx.array(mask)),
                                   chroma=mx.array(chroma)))
    assert np.abs(ours - without).max() > 1e-3
    pm = PeftModel.from_pretrained(copy.deepcopy(hf_models("melody")), str(out / "peft")).eval()
    with torch.no_grad():
        ref = pm(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(),
                 input_features=torch.tensor(chroma),
                 decoder_input_ids=torch.tensor(codes.reshape(-1, 10)).long()).logits.numpy()
    ref = ref[:, -10:].reshape(2, 4, 10, -1)  # the logits of the prefix positions come first
    assert np.abs(ours - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_a_real_kill_then_resume_is_bit_identical(tmp_path, tones, mlx_folder):
    """SIGKILL a `mlx-music train` process once a checkpoint exists, whatever it is doing then
    (stepping or saving), and `--resume`: the adapter equals an uninterrupted run's bit for bit.
    Every run is a fresh process (MKL's results depend on the process's thread settings)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    base = mlx_folder("mono")

    def cmd(out, *extra):
        return [sys.executable, "-m", "mlx_music.cli", "train", str(tones), "--model", str(base), "--out", str(out),
                "--steps", "10", "--batch-size", "2", "--rank", "4", "--lr", "5e-3", "--segment", "1",
                "--min-seconds", "0.5", "--val-fraction", "0.2", "--val-every", "5", "--save-every", "1",
                "--seed", "3", *extra]

    env = dict(os.environ)
    subprocess.run(cmd(tmp_path / "whole"), check=True, capture_output=True, env=env, timeout=600)
    state = tmp_path / "cut" / "checkpoint" / "state.json"
    proc = subprocess.Popen(cmd(tmp_path / "cut"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline, seen = time.monotonic() + 300, 0
    while time.monotonic() < deadline and proc.poll() is None and seen < 3:
        try:  # a save swaps the checkpoint folder: between its two renames there is none
            seen = json.loads(state.read_text())["step"]
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL and seen >= 3, (proc.returncode, seen)  # killed mid-run
    done = subprocess.run(cmd(tmp_path / "cut", "--resume"), capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = factors(tmp_path / "whole"), factors(tmp_path / "cut")
    assert a.keys() == b.keys() and a
    for k in a:
        assert np.array_equal(np.array(a[k]), np.array(b[k])), k


def test_a_local_base_is_recorded_by_its_absolute_path(tmp_path, tones, mlx_folder, monkeypatch):
    """`--model out/x` typed in one folder must still name that base from anywhere else (publish
    reads it; a relative path would read as a hub repo id there)."""
    base = mlx_folder("mono")
    monkeypatch.chdir(base.parent)
    out = train(opts(tones, base.name, tmp_path / "rel", steps=1, val_every=1, save_every=1))
    monkeypatch.chdir(tmp_path)
    recorded = json.loads((out / "adapter_config.json").read_text())["base_model"]
    assert recorded == str(base.resolve())
    assert f"base_model: {base.resolve()}" in (out / "README.md").read_text()
