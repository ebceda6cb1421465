"""Data-parallel training: 2 ring ranks under `mlx.launch` equal 1 process with the same global batch.

Each rank keeps every second row of each global batch of 4 and the gradients are averaged
(``nn.average_gradients``); the pieces all have 50 frames, so the mean of the two ranks' losses is
the 4-row loss, and the adapters agree to float rounding. LoRA dropout is off (its masks are drawn
per rank, so they cannot match one process's).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlx_music  # noqa: F401  (before mlx.core: binds MKL)
import mlx.core as mx
import numpy as np

from make_tone_dataset import write_dataset
from test_batch import _free_port

BIN = Path(sys.executable).parent


def _train_args(data: Path, model: Path, out: Path) -> list[str]:
    return [str(BIN / "mlx-music"), "train", str(data), "--model", str(model), "--out", str(out), "--steps", "3",
            "--batch-size", "4", "--rank", "4", "--alpha", "8", "--lr", "5e-3", "--segment", "1",
            "--min-seconds", "0.5", "--val-fraction", "0.2", "--val-every", "3", "--save-every", "3", "--quiet"]


def test_two_ranks_equal_one_process(tmp_path, mlx_folder):
    data = write_dataset(tmp_path / "data", seconds=2.0, repeats=1)
    model = mlx_folder("mono")
    one = subprocess.run(_train_args(data, model, tmp_path / "one"), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    cmd = [str(BIN / "mlx.launch"), "-n", "2", "--backend", "ring", "-p", str(_free_port()),
           "--python", sys.executable, *_train_args(data, model, tmp_path / "two")]
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    assert out.count("wrote ") == 2, out + err  # both ranks finished
    a = mx.load(str(tmp_path / "one" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "two" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    moved = max(float(mx.abs(a[k]).max()) for k in a if k.endswith("lora_b"))
    assert moved > 1e-3  # 3 steps at lr 5e-3 moved the zero-initialised B factors
    worst = max(float(mx.abs(a[k] - b[k]).max()) for k in a)
    assert worst <= 1e-5, worst
    rows = [[json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("one", "two")]
    assert np.allclose([r["loss"] for r in rows[0]], [r["loss"] for r in rows[1]], rtol=1e-5, atol=0)
    assert abs(rows[0][-1]["val_loss"] - rows[1][-1]["val_loss"]) <= 1e-5 * rows[0][-1]["val_loss"]
