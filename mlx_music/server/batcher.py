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

A row's failure is its own: each row's inputs are resolved alone (`MusicGenPipeline.resolve`)
before it joins a batch, and a batch that still fails before its first audio is run again row by
row, so only the row at fault fails (400/422 for its input, 500 naming its own error otherwise).

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

from mlx_music.runtime.audio_io import AudioInputError
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
    error_status: int = 500  # HTTP status of ``error``: 400/422 when the request was at fault
    arrived: float = field(default_factory=time.monotonic)
    listeners: int = 0  # open streams and downloads of this job
    format: str = "wav"  # the file format asked for (POST /v1/generate)
    row: Any = None  # the request as `MusicGenPipeline.resolve` prepared it, once checked alone
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
    def error_is_input(self) -> bool:
        """The request was at fault (4xx), not the server (5xx)."""
        return self.error_status < 500

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

    def _fail(self, message: str, status: int) -> None:
        if not self.finished:
            self.state, self.error, self.error_status = "error", " ".join(str(message).split()), status
            self._notify()


def _row_error(err: Exception) -> tuple[str, int]:
    """A row's exception → (one-line message, HTTP status): its input's fault or its own 500."""
    if isinstance(err, AudioInputError):
        return str(err), 400
    if isinstance(err, ValueError):
        return str(err), 422
    return f"generation failed: {type(err).__name__}: {err}", 500


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
        self._reserved = 0  # places held by requests still decoding their uploads
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()  # set once the worker has left its loop (no more MLX work)
        # The last batches run: rows, complete, seconds (tests, benchmarks); bounded, as a server runs for long.
        self.history: deque[dict[str, Any]] = deque(maxlen=1024)
        self._recent: deque[float] = deque(maxlen=16)  # seconds per batch, for Retry-After
        self.running: list[Job] = []  # the batch being decoded

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._idle.clear()
            self._thread = threading.Thread(target=self._run, name="mlx-music-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 300.0) -> bool:
        """Cancel every waiting and running job and wait until the worker has left its loop.

        The worker thread itself is parked, not ended: a thread that ran MLX work runs MLX's
        thread-local clean-up when it exits, and if that races the interpreter's finalization the
        process aborts (``terminate called without an active exception``, exit 134). Parked on an
        event it holds no work and ends with the process. False if the worker did not stop in
        ``timeout`` seconds (a batch stops at its next chunk)."""
        self.cancel_all()
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is None:
            return True
        stopped = self._idle.wait(timeout)
        if stopped:
            self._thread = None
        else:
            log.error("the batch worker did not stop within %.0f s", timeout)
        return stopped

    def cancel_all(self) -> None:
        """Cancel every waiting and running job (any thread; shutdown)."""
        with self._cv:
            jobs = list(self._pending) + list(self.running)
            self._pending.clear()
        for job in jobs:
            job.cancel()

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

    def retry_after(self, ahead: int | None = None) -> int:
        """Seconds until about ``ahead`` waiting jobs (default: the queue) have run, at least 1."""
        per_batch = sum(self._recent) / len(self._recent) if self._recent else 1.0
        batches = -(-(len(self._pending) if ahead is None else ahead) // self.max_batch)
        return max(1, round(per_batch * max(1, batches)))

    def reserve(self) -> None:
        """Hold a place in the queue before a request decodes its uploads, or raise `QueueFull`.
        Give it back with `submit(job, reserved=True)` or `release`."""
        with self._cv:
            if len(self._pending) + self._reserved >= self.max_queue:
                raise QueueFull(self.retry_after())
            self._reserved += 1

    def release(self) -> None:
        with self._cv:
            self._reserved = max(0, self._reserved - 1)

    def submit(self, job: Job, reserved: bool = False) -> None:
        """Queue a job (in the place `reserve` held when ``reserved``), or raise `QueueFull`."""
        with self._cv:
            if reserved:
                self._reserved = max(0, self._reserved - 1)
            elif len(self._pending) + self._reserved >= self.max_queue:
                raise QueueFull(self.retry_after())
            if self._stop:
                raise QueueFull(self.retry_after())
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
        try:
            self._loop()
        finally:
            self.running = []
            self._idle.set()
        threading.Event().wait()  # parked for good: see `stop`

    def _loop(self) -> None:
        while True:
            jobs = self._take_batch()
            if not jobs:
                return
            t0 = time.monotonic()
            try:
                self._run_batch(self._checked(jobs))
            except Exception as err:  # never let the worker die; the rows report the failure
                log.error("batch failed: %s: %s", type(err).__name__, " ".join(str(err).split()))
                for j in jobs:
                    j._fail(f"generation failed: {type(err).__name__}: {err}", 500)
            self._recent.append(time.monotonic() - t0)
            self.history.append({"rows": len(jobs), "seconds": time.monotonic() - t0,
                                 "complete": all(j.state == "done" for j in jobs),
                                 "states": [j.state for j in jobs], "samples": [j.samples for j in jobs],
                                 "total_samples": [j.total_samples for j in jobs],
                                 "errors": [j.error for j in jobs]})
            with self._cv:
                self.running = []

    def _checked(self, jobs: list[Job]) -> list[Job]:
        """The jobs whose inputs resolve alone; the others fail here, each with its own error
        (a melody or audio prompt the runtime cannot take never reaches the batch)."""
        ok = []
        for j in jobs:
            if j.finished:
                continue
            try:
                j.row = self.pipes[j.model].resolve(j.request)
            except Exception as err:
                message, status = _row_error(err)
                log.warning("row %s refused: %s", j.id[:8], " ".join(message.split()))
                j._fail(message, status)
                continue
            ok.append(j)
        return ok

    def _run_batch(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        pipe = self.pipes[jobs[0].model]
        for j in jobs:
            if not j.finished:
                j.state = "running"
                j._notify()
        chunks = None
        started = False
        try:
            chunks = pipe.stream_batch([j.request if j.row is None else j.row for j in jobs],
                                      chunk_seconds=self.chunk_seconds)
            for chunk in chunks:
                started = True
                for j, a in zip(jobs, chunk.audio):
                    j._push(a)
                if all(j.finished for j in jobs):
                    break
        except Exception as err:
            if not started and len(jobs) > 1:  # find the row at fault: each runs alone
                log.warning("batch of %d failed before its first audio (%s); running its rows alone",
                            len(jobs), type(err).__name__)
                for j in jobs:
                    if not j.finished:
                        j.state = "queued"
                        self._run_batch([j])
                return
            message, status = _row_error(err)
            log.error("batch of %d failed: %s", len(jobs), " ".join(message.split()))
            for j in jobs:
                if len(jobs) == 1:
                    j._fail(message, status)
                else:  # after audio was sent no row can be singled out
                    j._fail(f"generation failed: {type(err).__name__}", 500)
            return
        finally:
            if chunks is not None:
                chunks.close()  # frees the token loop when the batch stops early
        for j in jobs:
            if not j.finished:  # the runtime ended a row short: never hand out a clipped file
                j._fail(f"generation ended after {j.samples} of {j.total_samples} samples", 500)
