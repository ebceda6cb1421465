"""The one progress bar of generation (`generate`, `stream`, batch jobs): seconds of audio.

It counts integer frames and only shows them as seconds (tqdm's ``unit_scale``), so the count
never passes the total. Summing float seconds did: 0.02 s steps add up past 2.0 s, and tqdm then
warned ``clamping frac to range [0, 1]`` and showed a negative time left.
"""

from __future__ import annotations

from typing import Any


def audio_bar(total_frames: int, frame_rate: int, desc: str, **kwargs: Any):
    """A tqdm bar over ``total_frames`` frames shown as seconds of audio (``frame_rate`` frames
    per second); advance it with ``update(frames)`` (ints). Extra ``kwargs`` go to tqdm."""
    from tqdm import tqdm

    return tqdm(total=int(total_frames), unit="s", unit_scale=1.0 / frame_rate, desc=desc,
                bar_format="{l_bar}{bar}| {n:.2f}/{total:.2f} s of audio [{elapsed}<{remaining}]", **kwargs)
