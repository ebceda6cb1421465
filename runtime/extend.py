"""Generation longer than one window (the model's 30 s / position limit), audiocraft style.

The first window is generated normally. Each next window is prompted with the last
`window - stride` frames generated so far and contributes only its new frames; positions never
exceed the limit. Melody models see the slice of the melody that matches each window (the melody
wraps around when shorter than the output, as audiocraft does).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from mlx_music.runtime.sampling import SamplingConfig

ChromaFn = Callable[[int, int], np.ndarray]  # (start_frame, num_frames) -> (B, Tc, 12)


def generate_long(pipe, prompts: Sequence[str], num_frames: int, *, sampling: SamplingConfig,
                  seed: int | None, chroma: np.ndarray | ChromaFn | None, prompt_codes: np.ndarray | None,
                  extend_stride: float = 18.0, progress: bool = False) -> np.ndarray:
    """Codes (B, K, num_frames); the prompt's frames (if any) are the first ones."""
    window = pipe.max_frames
    stride = int(round(extend_stride * pipe.frame_rate))
    if num_frames > window and not 0 < stride < window:
        raise ValueError(f"--extend-stride {extend_stride}: must be between 0 and the window "
                         f"({window / pipe.frame_rate:.1f} s), exclusive")
    b = len(prompts)
    p = 0 if prompt_codes is None else prompt_codes.shape[-1]
    if p >= num_frames:
        raise ValueError(f"--duration: the audio prompt is already {p / pipe.frame_rate:.2f} s; ask for a "
                         "longer total duration (the output includes the prompt)")

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=round(num_frames / pipe.frame_rate, 2), unit="s", desc="generate",
                   bar_format="{l_bar}{bar}| {n:.2f}/{total:.2f} s of audio [{elapsed}<{remaining}]")
    done_frames = [p]

    def window_progress(new_frames_before: int, frames_in_window: int):
        """on_step callback of one window: advance the bar by frames actually produced."""
        def on_step(i: int, total: int) -> None:
            if bar is None:
                return
            made = new_frames_before + round(i * frames_in_window / max(total, 1))
            if made > done_frames[0]:
                bar.update((made - done_frames[0]) / pipe.frame_rate)
                done_frames[0] = made
        return on_step

    def chroma_at(start: int, n: int):
        if chroma is None or isinstance(chroma, np.ndarray):
            return chroma
        return chroma(start, n)

    if p >= window:
        # A prompt longer than one window is kept whole; generation continues from its last
        # `window - stride` frames like any later window.
        codes = np.repeat(prompt_codes, b, axis=0) if prompt_codes.shape[0] == 1 else prompt_codes
    else:
        first = min(num_frames, window)
        codes = pipe.generate_codes(prompts, first, sampling=sampling, seed=seed, chroma=chroma_at(0, first),
                                    prompt_codes=prompt_codes, on_step=window_progress(p, first - p))
    if codes.shape[0] != b and codes.shape[0] == 1:
        codes = np.repeat(codes, b, axis=0)
    window_index = 0
    while codes.shape[-1] < num_frames:
        window_index += 1
        keep = window - stride
        context = codes[..., -keep:]
        start = codes.shape[-1] - keep
        n = min(window, keep + (num_frames - codes.shape[-1]))
        win_seed = None if seed is None else seed + window_index
        new = pipe.generate_codes(prompts, n, sampling=sampling, seed=win_seed, chroma=chroma_at(start, n),
                                  prompt_codes=context,
                                  on_step=window_progress(codes.shape[-1], n - keep))
        codes = np.concatenate([codes, new[..., keep:]], axis=-1)
    if bar is not None:
        bar.close()
    return codes[..., :num_frames]
