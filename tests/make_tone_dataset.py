"""Write a tiny training set in the audiofolder layout: pure tones with captions naming them.

    python tests/make_tone_dataset.py tones            # tones/*.wav + tones/metadata.jsonl

Each file is a sine at one of a few pitches (with a soft attack and a little vibrato, so EnCodec
codes vary over time), 32 kHz mono, `--seconds` long; the caption names the note ("a pure tone at
440 Hz, note A4"). Deterministic: the same files every run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import soundfile as sf

NOTES = {"A3": 220.0, "C4": 261.63, "E4": 329.63, "A4": 440.0, "C5": 523.25, "E5": 659.26}


def tone(freq: float, seconds: float, sr: int = 32000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    vibrato = 1.0 + 0.003 * np.sin(2 * np.pi * 5.0 * t)
    env = np.minimum(1.0, t / 0.05) * 0.5
    return (env * np.sin(2 * np.pi * freq * np.cumsum(vibrato) / sr)).astype(np.float32)


def write_dataset(folder: str | Path, seconds: float = 4.0, repeats: int = 2, sr: int = 32000) -> Path:
    """Write len(NOTES) * repeats tone files and metadata.jsonl into `folder`; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in range(repeats):
        for note, freq in NOTES.items():
            name = f"{note.lower()}_{r}.wav"
            sf.write(folder / name, tone(freq * (1 + 0.001 * r), seconds, sr), sr, subtype="PCM_16")
            rows.append({"file_name": name, "text": f"a pure tone at {freq:g} Hz, note {note}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    print(write_dataset(a.folder, a.seconds, a.repeats))


if __name__ == "__main__":
    main()
