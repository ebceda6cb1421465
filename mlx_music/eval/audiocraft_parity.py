"""Parity of an audiocraft-format conversion against audiocraft itself (issue 14).

Kept apart from eval/parity.py (the transformers reference): here the reference is audiocraft's
own `LMModel` and compression model, loaded from the same `state_dict.bin` /
`compression_state_dict.bin` with audiocraft's loaders, and the T5 and codec they resolve by name.
Rows: greedy tokens of `MusicGen.generate` / `AudioGen.generate` with CFG 3 (every step identical),
`lm.compute_predictions` logits, and the audio audiocraft's codec makes of the same tokens.

audiocraft is not a dependency (1.3.0 pins torch 2.1). It is used when importable; on a CPU-only
machine without xformers/torchaudio, the repository's tests/audiocraft_shims.py stands in for
those imports (the row names then say so).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from mlx_music.eval.parity import ParityError, ParityReport, ParityRow

TOLERANCE = 1e-4
DEFAULT_PROMPT = "80s pop with synths and drums"


def is_audiocraft_source(path: str | os.PathLike) -> bool:
    """A local folder in audiocraft's export layout only (no transformers files)."""
    from mlx_music.converters.audiocraft import detect_format

    folder = Path(os.path.expanduser(str(path)))
    return folder.is_dir() and detect_format(folder, None) == "audiocraft"


def _import_audiocraft() -> bool:
    """Import audiocraft.models; True when the repo's shims were needed."""
    try:
        import audiocraft.models  # noqa: F401

        return False
    except ModuleNotFoundError as e:
        if e.name == "audiocraft":
            raise ParityError("audiocraft parity needs audiocraft: pip install --no-deps audiocraft==1.3.0 "
                              "(plus omegaconf einops julius flashy num2words av librosa torchmetrics)") from None
        shims = Path(__file__).resolve().parents[2] / "tests" / "audiocraft_shims.py"
        if not shims.exists():
            raise ParityError(f"audiocraft cannot be imported ({e}); install it with its dependencies") from None
    spec = importlib.util.spec_from_file_location("mlx_music_audiocraft_shims", shims)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.install_shims()
    try:
        import audiocraft.models  # noqa: F401,F811
    except ImportError as e:
        raise ParityError(f"audiocraft cannot be imported even with tests/audiocraft_shims.py ({e})") from None
    return True


def run_audiocraft_parity(ac_path: str | os.PathLike, mlx_path: str | os.PathLike, *, steps: int = 50,
                          prompt: str = DEFAULT_PROMPT, melody: Any = None, seed: int = 0) -> ParityReport:
    """Compare the MLX conversion at `mlx_path` with audiocraft running `ac_path` (local folder)."""
    import torch

    import mlx.core as mx

    import mlx_music
    from mlx_music.runtime.delay_pattern import apply_pattern

    folder = Path(os.path.expanduser(str(ac_path)))
    if not is_audiocraft_source(folder):
        raise ParityError(f"ac_path {ac_path}: not an audiocraft-format folder (state_dict.bin)")
    shimmed = _import_audiocraft()
    from audiocraft.models import AudioGen, MusicGen
    from audiocraft.models.loaders import load_compression_model, load_lm_model
    from audiocraft.modules.conditioners import ConditioningAttributes

    pipe = mlx_music.load(mlx_path)
    tag = " [audiocraft" + (", import shims]" if shimmed else "]")
    try:
        lm = load_lm_model(folder, device="cpu")
        codec = load_compression_model(folder, device="cpu")
    except Exception as e:  # audiocraft's own failure (missing T5 / codec in the cache, ...)
        raise ParityError(f"audiocraft cannot load {folder}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    cls = AudioGen if str(lm.cfg.get("solver", "")) == "audiogen" else MusicGen
    model = cls(folder.name, codec, lm)
    if "self_wav" in lm.condition_provider.conditioners:  # as MusicGen.get_pretrained does
        lm.condition_provider.conditioners["self_wav"].match_len_on_eval = True
        lm.condition_provider.conditioners["self_wav"]._use_masking = False
    duration = steps / pipe.frame_rate
    model.set_generation_params(use_sampling=False, duration=duration, cfg_coef=3.0)
    rep = ParityReport(str(folder), str(mlx_path), pipe.config["model_type"])
    rep.notes.append(f"reference: audiocraft {getattr(__import__('audiocraft'), '__version__', '?')} "
                     f"{cls.__name__} on {folder}; prompt {prompt!r}, {steps} greedy steps, CFG 3")

    kw: dict = {}
    torch.manual_seed(seed)
    with torch.no_grad():
        if pipe.is_melody:
            from mlx_music.runtime.audio_io import load_audio_input

            sr = int(pipe.config["melody"]["sampling_rate"])
            if melody is None:  # a test signal: two notes with a harmonic
                t = np.arange(int(pipe.window_seconds * sr)) / sr
                f = np.where(t < t[-1] / 2, 440.0, 523.25)
                wav = (0.5 * np.sin(2 * np.pi * f * t) + 0.2 * np.sin(6 * np.pi * f * t)).astype(np.float32)[None]
            else:
                wav = load_audio_input(melody, sr, channels=1)
            kw["melody"] = (wav, sr)
            audio, tokens = model.generate_with_chroma([prompt], torch.from_numpy(wav)[None], sr, return_tokens=True)
            attrs, _ = model._prepare_tokens_and_attributes([prompt], None, melody_wavs=[torch.from_numpy(wav)])
        else:
            audio, tokens = model.generate([prompt], return_tokens=True)
            attrs = [ConditioningAttributes(text={"description": prompt})]
        codes = torch.randint(0, lm.card, (1, lm.num_codebooks, 24), generator=torch.Generator().manual_seed(seed))
        pred = lm.compute_predictions(codes, attrs)
    ref_tokens = tokens.numpy()[0]
    res = pipe.generate([prompt], duration, greedy=True, guidance_scale=3.0, seed=seed, **kw)
    ours = res.codes[0]
    same = ours.shape == ref_tokens.shape
    agree = int(np.argmin(np.append((ours == ref_tokens).all(0), False))) if same else 0
    rep.rows.append(ParityRow(f"greedy tokens, CFG 3{tag}", f"identical steps of {ref_tokens.shape[-1]}",
                              agree, ref_tokens.shape[-1], same and agree == ref_tokens.shape[-1]))
    ref_audio = audio.numpy()[0]
    dec = pipe.codec.decode(ref_tokens[None])[0]
    diff = float(np.abs(dec - ref_audio).max()) if dec.shape == ref_audio.shape else float("inf")
    rep.rows.append(ParityRow(f"audio of the same tokens{tag}", "max abs", diff, TOLERANCE, diff <= TOLERANCE))
    rep.rows.append(ParityRow(f"sample rate{tag}", "Hz", res.sample_rate, int(model.sample_rate),
                              res.sample_rate == int(model.sample_rate)))

    ids, mask = pipe.tokenizer([prompt])
    states, m = pipe.model.encode_text(mx.array(ids), mx.array(mask))
    chroma = mx.array(pipe.conditioner.extractor([kw["melody"][0][0]], kw["melody"][1])) if pipe.is_melody else None
    np_codes = codes.numpy().astype(np.int32)
    seq = apply_pattern(np_codes, pipe.audio_channels, pipe.pad_id)
    logits = np.array(pipe.model(mx.array(seq), states, m, chroma))
    delays = np.arange(np_codes.shape[1]) // pipe.audio_channels
    aligned = np.stack([logits[:, k, d:d + np_codes.shape[-1]] for k, d in enumerate(delays)], axis=1)
    valid = pred.mask.numpy()
    ldiff = float(np.abs(aligned - pred.logits.numpy())[valid].max())
    rep.rows.append(ParityRow(f"logits vs lm.compute_predictions{tag}", "max abs", ldiff, TOLERANCE,
                              ldiff <= TOLERANCE))
    return rep
