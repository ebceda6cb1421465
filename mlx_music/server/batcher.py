"""Dynamic batching: requests that arrive together for one model are decoded as one batch.

One worker thread owns every model (MLX work never runs on the event loop, and never on two
threads at once). It takes the oldest waiting job, waits up to ``batch_wait`` seconds after that
job arrived for more jobs of the same model (up to ``max_batch``), and runs them as the rows of
one `stream_batch` call. Each row keeps its own prompt, seed and settings, and its samples are
bit-identical to the same request run alone: codes never depend on the batch, rows are decoded
one by one (EnCodec on several rows rounds differently), and rows with an audio
prompt only share a batch with rows whose prompt has the same length (`Job.key`).

This is dynamic batching, not continuous batching: a job that arrives while a batch runs waits
for the next batch. A cancelled job (client gone, or Cancel) stops receiving audio at once; when
every row of a running batch is cancelled or finished, the batch stops at the next chunk.

Audio reaches the event loop as float32 chunks appended to `Job.chunks`; the worker wakes the
job's listeners with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlx_music.runtime.generation import Request

log = logging.getLogger("mlx_music.server")


class QueueFull(Exception):
    """The waiting queue holds ``max_queue`` jobs; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"server busy: the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass(eq=False)
class Job:
    """One request's life: queued → running → done | cancelled | error."""

    model: str
    request: Request
    total_samples: int
    channels: int
    sample_rate: int
    settings: dict[str, Any]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    chunks: list[np.ndarray] = field(default_factory=list)
    samples: int = 0
    state: str = "queued"
    error: str | None = None
    error_is_input: bool = False  # the request was at fault (4xx), not the server (5xx)
    arrived: float = field(default_factory=time.monotonic)
    listeners: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _changed: asyncio.Event | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> "Job":
        self._loop, self._changed = loop, asyncio.Event()
        return self

    @property
    def key(self) -> tuple:
        """Jobs batch together only when their key matches: the same model and the same audio
        prompt length (a row's prompt is prefilled or stepped through depending on the batch's
        shortest prompt, which rounds differently; equal lengths keep every row bit-identical)."""
        ap = self.request.audio_prompt
        return (self.model, None if ap is None else (int(np.shape(ap[0])[-1]), int(ap[1])))

    @property
    def finished(self) -> bool:
        return self.state in ("done", "cancelled", "error")

    @property
    def cancelled(self) -> bool:
        return self.state == "cancelled"

    @property
    def seconds(self) -> float:
        return self.samples / self.sample_rate

    def audio(self) -> np.ndarray:
        """Everything received so far as float32 [channels, samples]."""
        if not self.chunks:
            return np.zeros((self.channels, 0), np.float32)
        return np.concatenate(self.chunks, axis=-1)

    # ------------------------------------------------------------ event loop side
    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    async def changed(self, timeout: float | None = None) -> None:
        """Return once the job has news (audio or a state change), or after ``timeout``."""
        assert self._changed is not None, "bind() the job to the event loop first"
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def cancel(self) -> None:
        """Drop this job's output; the batch it is in stops once no row is left (any thread)."""
        if not self.finished:
            self.state = "cancelled"
            self._notify()

    # -------------------------------------------------------------- worker side
    def _notify(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the loop closed meanwhile
                pass

    def _push(self, audio: np.ndarray) -> None:
        if self.finished or audio.shape[-1] == 0:
            return
        audio = audio[:, : self.total_samples - self.samples]
        self.chunks.append(np.ascontiguousarray(audio, dtype=np.float32))
        self.samples += audio.shape[-1]
        if self.samples >= self.total_samples:
            self.state = "done"
        self._notify()

    def _fail(self, message: str, input_error: bool) -> None:
        if not self.finished:
            self.state, self.error, self.error_is_input = "error", message, input_error
            self._notify()


class Batcher:
    """The waiting queue and the one worker thread that runs batches."""

    def __init__(self, pipes: dict[str, Any], *, max_batch: int = 8, batch_wait: float = 0.05,
                 max_queue: int = 64, chunk_seconds: float = 0.5):
        self.pipes = pipes
        self.max_batch = max(1, int(max_batch))
        self.batch_wait = max(0.0, float(batch_wait))
        self.max_queue = max(1, int(max_queue))
        self.chunk_seconds = float(chunk_seconds)
        self._pending: deque[Job] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.history: list[dict[str, Any]] = []  # every batch run: rows, complete, seconds (tests, benchmarks)
        self._recent: deque[float] = deque(maxlen=16)  # seconds per batch, for Retry-After
        self.running: list[Job] = []  # the batch being decoded

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="mlx-music-batcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            for job in self._pending:
                job.cancel()
            self._pending.clear()
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until nothing waits or runs (tests, benchmarks); False on timeout."""
        end = time.monotonic() + timeout
        while self._pending or self.running:
            if time.monotonic() > end:
                return False
            time.sleep(0.01)
        return True

    def submit(self, job: Job) -> None:
        """Queue a job, or raise `QueueFull`."""
        with self._cv:
            if len(self._pending) >= self.max_queue:
                per_batch = sum(self._recent) / len(self._recent) if self._recent else 1.0
                batches_ahead = -(-len(self._pending) // self.max_batch)
                raise QueueFull(max(1, round(per_batch * batches_ahead)))
            job.arrived = time.monotonic()
            self._pending.append(job)
            self._cv.notify_all()

    # ------------------------------------------------------------------- worker
    def _take_batch(self) -> list[Job]:
        with self._cv:
            while True:
                while self._pending and self._pending[0].finished:  # cancelled while waiting
                    self._pending.popleft()
                if self._stop:
                    return []
                if not self._pending:
                    self._cv.wait()
                    continue
                first = self._pending[0]
                same = [j for j in self._pending if j.key == first.key and not j.finished][: self.max_batch]
                left = first.arrived + self.batch_wait - time.monotonic()
                if len(same) >= self.max_batch or left <= 0:
                    self.running = same  # before leaving the queue: wait_idle never sees a gap
                    for j in same:
                        self._pending.remove(j)
                    return same
                self._cv.wait(left)

    def _run(self) -> None:
        while True:
            jobs = self._take_batch()
            if not jobs:
                return
            t0 = time.monotonic()
            try:
                self._run_batch(jobs)
            except Exception as err:  # never let the worker die; the rows report the failure
                log.exception("batch failed")
                for j in jobs:
                    j._fail(f"generation failed: {type(err).__name__}: {err}", input_error=False)
            self._recent.append(time.monotonic() - t0)
            self.history.append({"rows": len(jobs), "seconds": time.monotonic() - t0,
                                 "complete": all(j.state == "done" for j in jobs),
                                 "states": [j.state for j in jobs], "samples": [j.samples for j in jobs],
                                 "total_samples": [j.total_samples for j in jobs]})
            self.running = []

    def _run_batch(self, jobs: list[Job]) -> None:
        pipe = self.pipes[jobs[0].model]
        for j in jobs:
            if not j.finished:
                j.state = "running"
                j._notify()
        try:
            chunks = pipe.stream_batch([j.request for j in jobs], chunk_seconds=self.chunk_seconds)
        except ValueError as err:  # a row the runtime refused: run the others without it
            if len(jobs) > 1:
                for j in jobs:
                    self._run_batch([j])
            else:
                jobs[0]._fail(" ".join(str(err).split()), input_error=True)
            return
        try:
            for chunk in chunks:
                for j, a in zip(jobs, chunk.audio):
                    j._push(a)
                if all(j.finished for j in jobs):
                    break
        finally:
            chunks.close()  # frees the token loop when the batch stops early
        for j in jobs:
            if not j.finished:  # the runtime ended a row short: never hand out a clipped file
                j._fail(f"generation ended after {j.samples} of {j.total_samples} samples", input_error=False)
