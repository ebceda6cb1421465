"""`mlx-music train`: the training run, its output folder, checkpoints and resume.

Output folder (``--out``):

    adapter_config.json, adapters.safetensors, conversion.json   the MLX adapter (generate --adapter)
    README.md      model card: base model, data size, steps, losses
    peft/adapter_config.json, peft/adapter_model.safetensors     the same adapter for transformers + peft
    checkpoint/    factors, AdamW state and step of the last save (what --resume continues from)
    metrics.jsonl  one line per step (loss, lr, audio seconds per second; val_loss at step 1, every
                   --val-every steps and at the end)
    loss.png       train and validation loss (needs matplotlib: the `train` extra)
    samples/       step-N.wav of --sample-prompt (seed --seed) at each validation, when given
    cache/         EnCodec codes and T5 states of the data (see mlx_music.train.data)

Determinism: the data order of epoch e is a permutation seeded by (seed, e), the text dropout of
the i-th sample drawn by (seed, i), LoRA dropout by (seed, step); with the checkpointed factors and
optimizer state, a resumed run computes exactly what an uninterrupted one does (bit-identical on
CPU). Data parallel under ``mlx.launch``: every rank reads the same global batch and keeps every
world-size-th row of it; gradients are averaged by `Stepper` (``nn.average_gradients``); rank 0
writes the files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_music.runtime.records import json_objects, loads_json
from mlx_music.runtime.sampling import check_seed
from mlx_music.train.data import DataError, DataSettings, collate, prepare, read_folder
from mlx_music.train.export import save_adapters
from mlx_music.train.lora import (DEFAULT_TARGETS, LoraSettings, apply_lora, grad_checkpoint, lora_factors,
                                  set_lora_factors)
from mlx_music.train.step import OptimSettings, Stepper, make_optimizer

CHECKPOINT = "checkpoint"
METRICS = "metrics.jsonl"
PLOT = "loss.png"
# audiocraft's text-to-music grids drop all conditions of 30% of the samples (0.3 in
# config/conditioner/text2music.yaml); keeping that rate trains the unconditional branch CFG needs
# as much as the base model's own training did.
TEXT_DROPOUT = 0.3


# What a run killed before its first save leaves: a new run may start there (reusing the cache).
_RESTARTABLE = {"cache", METRICS, "samples"}


class TrainingStopped(RuntimeError):
    """The loss became NaN/Inf; the adapter in --out is the last good one. One line."""


@dataclass
class TrainOptions:
    data: str
    model: str
    out: str
    steps: int = 2000
    batch_size: int = 4
    grad_accum: int = 1
    rank: int = 16
    alpha: float = 16.0
    lora_dropout: float = 0.0
    rslora: bool = False
    targets: tuple[str, ...] = DEFAULT_TARGETS
    lr: float = 1e-4
    warmup: int = 0
    weight_decay: float = 0.01
    clip: float = 1.0
    segment: float = 30.0
    min_seconds: float = 1.0
    val_fraction: float = 0.05
    val_every: int = 100
    save_every: int = 100
    text_dropout: float = TEXT_DROPOUT
    seed: int = 0
    resume: bool = False
    caption_from_filename: bool = False
    sample_prompt: str | None = None  # a WAV of this prompt at each validation (samples/step-N.wav)
    sample_seconds: float = 5.0
    grad_checkpoint: bool = False  # mx.checkpoint per decoder layer: less activation memory, more compute
    progress: bool = True
    stop_after: int | None = field(default=None, repr=False)  # tests: end abruptly after this step's save

    def check(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "val_every", "save_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"--{name.replace('_', '-')} {v!r}: expected a positive integer")
        LoraSettings(self.rank, self.alpha, self.lora_dropout, self.rslora).check()
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr {self.lr!r}: expected a positive number")
        if not (0 <= self.warmup < self.steps):
            raise ValueError(f"--warmup {self.warmup!r}: expected 0 <= warmup < --steps")
        if self.sample_prompt is not None and not (math.isfinite(self.sample_seconds) and self.sample_seconds > 0):
            raise ValueError(f"--sample-seconds {self.sample_seconds!r}: expected a positive number of seconds")
        if not (0.0 <= self.text_dropout < 1.0):
            raise ValueError(f"--text-dropout {self.text_dropout!r}: expected a number in [0, 1)")
        # the one seed range: seed * 1000003 + step (mx.random.seed) then stays inside uint64
        check_seed(self.seed, "--seed", "the seed of the run; default 0")

    def identity(self) -> dict:
        """The settings a resumed run must share with the original (all but steps/progress/resume)."""
        d = asdict(self)
        for k in ("out", "resume", "progress", "stop_after", "steps", "data", "model", "val_every", "save_every",
                  "sample_prompt", "sample_seconds", "grad_checkpoint"):
            d.pop(k)
        d["targets"] = list(self.targets)
        return d


def _out_folder(opts: TrainOptions) -> Path:
    out = Path(opts.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file; expected a folder")
    if opts.resume:
        for old in sorted(out.glob(f".{CHECKPOINT}.old-*")):  # a kill between the two renames of a save
            if not (out / CHECKPOINT).exists():
                os.replace(old, out / CHECKPOINT)
        if not (out / CHECKPOINT / "state.json").is_file():
            raise ValueError(f"--out {out}: no checkpoint to resume (expected {out / CHECKPOINT / 'state.json'})")
    elif out.exists() and {p.name for p in out.iterdir()} - _RESTARTABLE:
        raise ValueError(f"--out {out}: already exists and is not empty; pass --resume to continue that run, "
                         "or choose another folder")
    return out


class _Progress:
    def __init__(self, total: int, initial: int, on: bool):
        self.bar = None
        if on:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="training", unit="step", dynamic_ncols=True)

    def update(self, **info) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in info.items()},
                                 refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plot_metrics(out: Path) -> Path | None:
    """loss.png from metrics.jsonl (train loss per step, validation points); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = _metric_rows(out / METRICS)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train", lw=1)
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean CE over codebooks)")
    ax.legend()
    ax.grid(alpha=0.3)
    tmp = out / f".partial-{os.getpid()}-{PLOT}"
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, out / PLOT)
    return out / PLOT


class _Order:
    """Global sample stream: position p is piece perm_e[p % n] of epoch e = p // n."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perms = n, seed, {}

    def piece(self, p: int) -> int:
        e = p // self.n
        if e not in self._perms:
            self._perms = {e: np.random.default_rng([self.seed, 11, e]).permutation(self.n)}
        return int(self._perms[e][p % self.n])

    def dropped(self, p: int, rate: float) -> bool:
        return bool(rate > 0 and np.random.default_rng([self.seed, 13, p]).random() < rate)


def base_name(model: str) -> str:
    """How the adapter records its base: a hub repo id as given, a local folder as its absolute
    path (a relative path would name another folder, or read as a repo id, from elsewhere)."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def train(opts: TrainOptions) -> Path:
    """Run (or resume) a training; returns the output folder. ValueError (one line) for bad input,
    TrainingStopped when the loss diverges."""
    opts.check()
    lead = mx.distributed.init().rank() == 0
    # Other ranks trust rank 0's check: it may already have created the folder when they look.
    out = _out_folder(opts) if lead else Path(opts.out).expanduser()
    fresh = not opts.resume
    existed = out.exists()
    try:
        return _train(opts, out)
    except BaseException:
        if lead and fresh and out.exists() and not (out / CHECKPOINT).exists():
            shutil.rmtree(out, ignore_errors=True)  # a run that failed before its first save leaves nothing
            if existed:
                out.mkdir()
        raise


def _train(opts: TrainOptions, out: Path) -> Path:
    from mlx_music.runtime import load
    from mlx_music.runtime.hub import resolve_model_path
    from mlx_music.train.data import model_fingerprint

    group = mx.distributed.init()
    world, rank = group.size(), group.rank()
    if opts.batch_size % world:
        raise ValueError(f"--batch-size {opts.batch_size}: must be a multiple of the {world} ranks")
    items = read_folder(opts.data, opts.caption_from_filename)  # data errors before the model loads
    folder = Path(resolve_model_path(opts.model))
    pipe = load(folder)
    model = pipe.model
    lora = LoraSettings(opts.rank, opts.alpha, opts.lora_dropout, opts.rslora)
    wrapped = apply_lora(model, list(opts.targets), lora, seed=opts.seed)
    if opts.grad_checkpoint:
        grad_checkpoint(model)
    base_id = model_fingerprint(folder)

    state = None
    if opts.resume:
        state = loads_json((out / CHECKPOINT / "state.json").read_text())
        if state["base"] != base_id:
            raise ValueError(f"--resume: --model {opts.model} is not the base this run was trained on")
        if state["options"] != opts.identity():
            diff = sorted(k for k in opts.identity() if state["options"].get(k) != opts.identity()[k])
            raise ValueError(f"--resume: settings differ from the run in {out} ({', '.join(diff)})")
        if state["step"] >= opts.steps:
            raise ValueError(f"--steps {opts.steps}: the run in {out} already reached step {state['step']}")
    data = prepare(items, pipe, folder, DataSettings(opts.segment, opts.min_seconds, opts.val_fraction,
                                                     opts.caption_from_filename),
                   out / "cache", seed=opts.seed, progress=opts.progress and rank == 0)
    if state is not None and state["data"] != data.fingerprint:
        raise ValueError(f"--resume: DATA {opts.data} is not the data this run was trained on "
                         "(files, captions or segment settings differ)")
    if not data.train:
        raise DataError(f"DATA {opts.data}: no training pieces")

    optimizer = make_optimizer(OptimSettings(lr=opts.lr, steps=opts.steps, warmup=opts.warmup,
                                             weight_decay=opts.weight_decay, clip=opts.clip))
    optimizer.init(model.trainable_parameters())
    start = 0
    if state is not None:
        saved = mx.load(str(out / CHECKPOINT / "state.safetensors"))
        set_lora_factors(wrapped, {k[len("lora."):-len(".a")]: (saved[k], saved[k[:-2] + ".b"])
                                   for k in saved if k.startswith("lora.") and k.endswith(".a")})
        optimizer.state = tree_unflatten([(k[len("opt."):], v) for k, v in saved.items() if k.startswith("opt.")])
        start = state["step"]
    if rank == 0:  # the one writer: another rank's rewrite would orphan rank 0's open metrics file
        _truncate_metrics(out / METRICS, start)  # a fresh run in a restartable folder starts at 0
    out.mkdir(parents=True, exist_ok=True)

    stepper = Stepper(model, optimizer, clip=opts.clip, group=group)
    order = _Order(len(data.train), opts.seed)
    cfg = pipe.config
    pad = int(cfg["decoder"]["pad_token_id"])
    chroma_len = model.chroma_length if model.is_melody else None
    frame_rate = pipe.frame_rate
    identity = {"base": base_id, "data": data.fingerprint, "options": opts.identity()}
    info = {"base_model": base_name(opts.model), "train_pieces": len(data.train), "val_pieces": len(data.val),
            "train_seconds": round(data.seconds, 2), "dropped_pieces": data.dropped}

    def batch_of(positions: list[int]) -> dict:
        mine = positions[rank::world]
        pieces = [data.train[order.piece(p)] for p in mine]
        drop = np.array([order.dropped(p, opts.text_dropout) for p in mine])
        return collate(pieces, data.text, drop, pipe.audio_channels, pad, chroma_len)

    val_batches = []
    for i in range(0, len(data.val) - len(data.val) % world if world > 1 else len(data.val), opts.batch_size):
        rows = data.val[i:i + opts.batch_size][rank::world]
        if rows:
            val_batches.append(collate(rows, data.text, np.zeros(len(rows), bool), pipe.audio_channels, pad, chroma_len))

    last: dict = {}  # the latest train / validation loss, for the model card

    def save(step: int) -> None:
        if rank != 0:
            return
        try:
            _save_checkpoint(out, step, wrapped, optimizer, identity)
            save_adapters(out, lora_factors(wrapped), rank=opts.rank, alpha=opts.alpha, rslora=opts.rslora,
                          scale=lora.scale, base_model=base_name(opts.model), melody=model.is_melody,
                          info={**info, "step": step, **last})
        except OSError as e:
            raise ValueError(f"--out {out}: write failed at step {step} ({e.strerror or e}); the previous "
                             "adapter and checkpoint are kept") from None

    G = opts.batch_size * opts.grad_accum
    bar = _Progress(opts.steps, start, opts.progress and rank == 0)
    metrics = open(out / METRICS, "a", encoding="utf-8") if rank == 0 else None
    try:
        for step in range(start + 1, opts.steps + 1):
            t0 = time.perf_counter()
            base = (step - 1) * G
            micro = [batch_of(list(range(base + j * opts.batch_size, base + (j + 1) * opts.batch_size)))
                     for j in range(opts.grad_accum)]
            mx.random.seed(opts.seed * 1_000_003 + step)  # LoRA dropout masks of this step
            model.train()
            loss = stepper.step(micro)
            lr = float(optimizer.learning_rate)  # the rate this step's update used
            if not math.isfinite(loss):
                save(step - 1)
                raise TrainingStopped(f"step {step}: the loss is {loss} (diverged); stopped, {out} holds the "
                                      f"adapter of step {step - 1}; lower --lr or raise --warmup")
            secs = sum(float(p.codes.shape[1]) for p in
                       (data.train[order.piece(q)] for q in range(base, base + G))) / frame_rate
            row = {"step": step, "loss": round(loss, 6), "lr": lr,
                   "audio_s_per_s": round(secs / max(time.perf_counter() - t0, 1e-9), 3)}
            if step == 1 or step % opts.val_every == 0 or step == opts.steps:
                model.eval()
                if val_batches:
                    row["val_loss"] = round(stepper.evaluate(val_batches), 6)
                if opts.sample_prompt and rank == 0:
                    _sample(pipe, opts, out / "samples" / f"step-{step:06d}.wav")
            last.update({k: row[k] for k in ("loss", "val_loss") if k in row})
            if metrics is not None:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            bar.update(loss=loss, **({"val": row["val_loss"]} if "val_loss" in row else {}),
                       audio_s_per_s=row["audio_s_per_s"])
            if step % opts.save_every == 0 or step == opts.steps:
                save(step)
                if rank == 0 and "val_loss" in row:
                    plot_metrics(out)
                if opts.stop_after is not None and step >= opts.stop_after:
                    return out  # tests: what a kill right after this save leaves
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    if rank == 0:
        plot_metrics(out)
    return out


def _metric_rows(path: Path) -> list[dict]:
    """metrics.jsonl's rows; a line a killed run left torn (not a JSON object with a step) is
    skipped, so it never stops a resume or the plot."""
    return [row for row in json_objects(path.read_text(encoding="utf-8")) if isinstance(row.get("step"), int)]


def _sample(pipe, opts: TrainOptions, path: Path) -> None:
    """Generate `opts.sample_prompt` (seed `opts.seed`) with the model as it is now; write `path`."""
    from mlx_music.runtime.audio_io import save_audio

    pipe._loops = {}  # compiled decode steps hold the weights they were traced with
    result = pipe.generate([opts.sample_prompt], duration=opts.sample_seconds, seed=opts.seed, progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".partial-{os.getpid()}-{path.name}"
    save_audio(tmp, result.audio[0], result.sample_rate)
    os.replace(tmp, path)
    pipe._loops = {}


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics of steps <= `step` (a resumed run rewrites the later ones)."""
    if not path.is_file():
        return
    keep = [row for row in _metric_rows(path) if row["step"] <= step]
    tmp = path.parent / f".partial-{os.getpid()}-{path.name}"
    tmp.write_text("".join(json.dumps(row) + "\n" for row in keep))
    os.replace(tmp, path)


def _save_checkpoint(out: Path, step: int, wrapped, optimizer, identity: dict) -> None:
    """out/checkpoint as one atomic folder swap: factors + optimizer state + state.json."""
    arrays = {}
    for name, (a, b) in lora_factors(wrapped).items():
        arrays[f"lora.{name}.a"], arrays[f"lora.{name}.b"] = a, b
    for k, v in tree_flatten(optimizer.state):
        arrays[f"opt.{k}"] = v
    tmp = out / f".{CHECKPOINT}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        mx.save_safetensors(str(tmp / "state.safetensors"), arrays)
        (tmp / "state.json").write_text(json.dumps({"step": step, **identity}, indent=2))
        final = out / CHECKPOINT
        old = out / f".{CHECKPOINT}.old-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["TEXT_DROPOUT", "TrainOptions", "TrainingStopped", "plot_metrics", "train"]
