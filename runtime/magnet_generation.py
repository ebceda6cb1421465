"""MAGNeT's frame generator: masked, non-autoregressive decoding of one clip, codebook by codebook.

The second frame generator beside `runtime.generation.FrameGenerator` (MusicGen's token loop),
with the same interface (iterate: yields the number of final frames; `codes(upto)`; `rows`,
`num_frames`, `steps`), so `MusicGenPipeline.generate` / `stream` / the batch forms, the server and
batch jobs drive either. It shares the conditioning (`Conditioner`: text and its CFG null rows),
the sampling utilities (`sampling.select_tokens`, per-row keys) and the codec.

The algorithm is audiocraft 1.3.0's ``MagnetLMModel._generate_magnet`` / ``_generate_stage``
(``models/lm_magnet.py``). Codebook ``stage`` = 0..K-1 is decoded in ``decoding_steps[stage]``
passes; codebooks below it hold their final tokens, those above it are all mask tokens:

* pass i of n: ``mask_p = cos(pi/2 * linspace(0, 1, n)[i])`` (float32); the ``max(1, int(mask_p *
  n_gen))`` least confident spans of ``span_len`` frames are masked again (pass 0: all of them;
  only spans masked in the previous pass are candidates, so decided spans stay decided);
* one forward of the 2B rows (conditional, null) with the stage's attention mask; CFG
  ``uncond + (cond - uncond) * s`` with ``s`` annealed from ``max_cfg_coef`` to ``min_cfg_coef``
  by mask_p; temperature ``temperature * (n - 1 - i) / n`` (at least 0.01);
* masked positions take the sampled (top-p, else top-k, else full) or argmax token; a span's
  confidence is the largest probability of its tokens (``span_scoring='max'``).

``span_arrangement='nonoverlap'`` (audiocraft's API default) masks the fixed spans [0, L), [L, 2L),
... and trims the clip to a multiple of L (10 s = 500 frames gives 498); ``'stride1'`` (the demo
notebook's choice) masks overlapping spans by least probability, found by audiocraft's binary
search, and keeps every frame. No frame is final before the last pass: MAGNeT's audio exists only
at the end, so `stream` yields its chunks then.

Each row has its own key (``seed``), settings and prompt; rows that share a length, prompt length,
decoding steps and arrangement run as one batch, and every row gives what it gives alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Iterator, Mapping, Sequence

import mlx.core as mx
import numpy as np

from mlx_music.runtime.sampling import RowSampling, SamplingConfig, check_number, filtered_logits, row_keys, select_tokens

# audiocraft's MAGNeT.set_generation_params defaults (the same for all six released models).
# config.json "generation" of a MAGNeT checkpoint holds these plus decoding_steps and max_duration.
MAGNET_DEFAULTS: Mapping[str, Any] = {"temperature": 3.0, "top_k": 0, "top_p": 0.9, "greedy": False,
                                      "max_cfg_coef": 10.0, "min_cfg_coef": 1.0, "span_arrangement": "nonoverlap"}
SPAN_ARRANGEMENTS = ("nonoverlap", "stride1")
DONT_REMASK = np.float32(-1e4)  # audiocraft's DONT_REMASK_ME_SCORE: never chosen again
MIN_TEMPERATURE = 1e-2  # audiocraft clamps the annealed temperature here


def default_decoding_steps(num_codebooks: int) -> list[int]:
    """[20, 10, 10, 10] for 4 codebooks (audiocraft's default): 20 for the first, 10 for the rest."""
    return [20] + [10] * (num_codebooks - 1)


def generation_config(num_codebooks: int, max_duration: float) -> dict[str, Any]:
    """config.json["generation"] of a MAGNeT checkpoint (what the converter writes)."""
    return {**MAGNET_DEFAULTS, "decoding_steps": default_decoding_steps(num_codebooks), "max_duration": max_duration}


@dataclass(frozen=True)
class MagnetSampling:
    """One row's MAGNeT settings (audiocraft's names: ``temperature`` is the initial temperature)."""

    temperature: float = MAGNET_DEFAULTS["temperature"]
    top_k: int = MAGNET_DEFAULTS["top_k"]
    top_p: float = MAGNET_DEFAULTS["top_p"]
    greedy: bool = MAGNET_DEFAULTS["greedy"]
    max_cfg_coef: float = MAGNET_DEFAULTS["max_cfg_coef"]
    min_cfg_coef: float = MAGNET_DEFAULTS["min_cfg_coef"]
    decoding_steps: tuple[int, ...] = (20, 10, 10, 10)
    span_arrangement: str = MAGNET_DEFAULTS["span_arrangement"]

    @classmethod
    def from_defaults(cls, defaults: Mapping[str, Any], num_codebooks: int, **overrides: Any) -> "MagnetSampling":
        """Checkpoint defaults, then non-None ``overrides``; ValueError names the parameter.

        ``guidance_scale`` is refused (MAGNeT anneals its guidance: ``max_cfg_coef`` →
        ``min_cfg_coef``), and so is ``top_k`` while ``top_p`` is on (audiocraft then ignores it).
        """
        if overrides.pop("guidance_scale", None) is not None:
            raise ValueError("guidance_scale: MAGNeT anneals its guidance from max_cfg_coef to min_cfg_coef "
                             f"({defaults.get('max_cfg_coef', 10.0)} -> {defaults.get('min_cfg_coef', 1.0)}) "
                             "(use max_cfg_coef and min_cfg_coef instead)")
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in {**MAGNET_DEFAULTS, "decoding_steps": default_decoding_steps(num_codebooks),
                                    **defaults}.items() if k in names}
        given = {k: v for k, v in overrides.items() if v is not None}
        values.update(given)
        if given.get("top_k") and values.get("top_p") and "top_p" not in given:
            raise ValueError(f"top_k {given['top_k']}: this MAGNeT checkpoint samples with top_p {values['top_p']}; "
                             "top-k applies only when top_p is 0 (use top_p 0 with it)")
        steps = values["decoding_steps"]
        if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence) or len(steps) != num_codebooks or \
                not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1 for s in steps):
            raise ValueError(f"decoding_steps {steps!r}: must be {num_codebooks} integers >= 1 (passes per codebook)")
        values["decoding_steps"] = tuple(int(s) for s in steps)
        return cls(**values).validate()

    def validate(self) -> "MagnetSampling":
        # the temperature also shapes the confidences greedy decoding re-masks by, so it stays >= 0
        check_number("temperature", self.temperature, lambda v: v >= 0, ">= 0 (the initial temperature, annealed to 0)")
        check_number("top_k", self.top_k, lambda v: v >= 0 and v == int(v), "an integer >= 0 (0 turns top-k off)")
        check_number("top_p", self.top_p, lambda v: 0 <= v <= 1, "in (0, 1], or 0 to turn it off")
        check_number("max_cfg_coef", self.max_cfg_coef, lambda v: v >= 0, ">= 0")
        check_number("min_cfg_coef", self.min_cfg_coef, lambda v: v >= 0, ">= 0")
        if self.span_arrangement not in SPAN_ARRANGEMENTS:
            raise ValueError(f"span_arrangement {self.span_arrangement!r}: must be one of {', '.join(SPAN_ARRANGEMENTS)}")
        return replace(self, top_k=int(self.top_k), greedy=bool(self.greedy), temperature=float(self.temperature))

    @property
    def group(self) -> tuple:
        """What rows of one batch must share (the number of passes and the masking scheme)."""
        return (self.decoding_steps, self.span_arrangement)


def clip_frames(frames: int, span_len: int, span_arrangement: str) -> int:
    """Frames of the clip: ``nonoverlap`` spans trim it to a multiple of ``span_len`` (audiocraft's
    ``_generate_stage``: 500 → 498), ``stride1`` keeps it."""
    return frames - frames % span_len if span_len > 1 and span_arrangement == "nonoverlap" else frames


def _linspace01(n: int) -> np.ndarray:
    """torch.linspace(0, 1, n) in float32, bit for bit (float32 step, each value rounded once from
    the start for the first half and from the end for the second)."""
    if n == 1:
        return np.zeros(1, np.float32)
    i = np.arange(n)
    step = np.float64(np.float32(1.0) / np.float32(n - 1))
    return np.where(i < n // 2, step * i, 1.0 - step * (n - 1 - i)).astype(np.float32)


def mask_schedule(n: int) -> np.ndarray:
    """mask_p of each of n passes: cos(linspace(0, 1, n) * pi/2) in float32 (the last is -4.37e-8,
    not 0). The angle is float32 arithmetic, as audiocraft's; the cosine is correctly rounded
    (torch's own float32 cosine can differ from it by one ulp)."""
    ang = _linspace01(n) * np.float32(math.pi) * np.float32(0.5)
    return np.array([np.float32(math.cos(float(a))) for a in ang], np.float32)


@dataclass
class _Group:
    """Rows decoded together: one length, prompt length, decoding steps and arrangement."""

    index: list[int]  # rows of the batch
    frames: int
    prompt_frames: int
    sampling: list[MagnetSampling]


class MagnetFrameGenerator:
    """Iterate to run MAGNeT's passes; read final codes with `codes`. Yields the number of leading
    frames final for every row after each pass (0 until the batch's last pass)."""

    def __init__(self, pipe: Any, rows: Sequence[Any]):
        self.pipe = pipe
        self.model = pipe.model
        self.rows = list(rows)
        self.num_codebooks = pipe.num_codebooks
        self.mask_id = pipe.pad_id  # audiocraft's special_token_id = card: the mask token
        self.span_len = self.model.magnet.span_len
        self.num_frames = max(r.frames for r in self.rows)
        for r in self.rows:
            p = 0 if r.prompt_codes is None else r.prompt_codes.shape[-1]
            if p >= r.frames:
                raise ValueError(f"duration: the audio prompt is already {p / pipe.frame_rate:.2f} s; ask for a "
                                 "longer total duration (the output includes the prompt)")
        groups: dict[tuple, _Group] = {}
        for i, r in enumerate(self.rows):
            p = 0 if r.prompt_codes is None else r.prompt_codes.shape[-1]
            g = groups.setdefault((r.frames, p, r.sampling.group), _Group([], r.frames, p, []))
            g.index.append(i)
            g.sampling.append(r.sampling)
        self.groups = list(groups.values())
        self.total_steps = sum(sum(g.sampling[0].decoding_steps) for g in self.groups)
        self.steps = 0
        self.final = 0
        self._codes = np.zeros((len(self.rows), self.num_codebooks, self.num_frames), np.int32)

    def codes(self, upto: int | None = None) -> np.ndarray:
        """Final codes of frames [0, upto) as (B, K, upto) int32; frames past a row's end hold 0."""
        upto = self.final if upto is None else upto
        if upto > self.final:
            raise ValueError(f"frames up to {upto} requested, only {self.final} are final")
        return self._codes[..., :upto]

    def __iter__(self) -> Iterator[int]:
        for g in self.groups:
            for _ in self._run_group(g):
                yield self.final
        self.final = self.num_frames
        yield self.final

    # ------------------------------------------------------------------ one batch
    def _run_group(self, g: _Group) -> Iterator[None]:
        pipe = self.pipe
        rows = [self.rows[i] for i in g.index]
        b, k, t = len(rows), self.num_codebooks, g.frames
        states, text_mask = pipe.conditioner.text([r.prompt for r in rows], cfg=True)  # B conditional, B null
        seq = np.full((b, k, t), self.mask_id, np.int32)
        prompt = None
        if g.prompt_frames:
            prompt = np.stack([r.prompt_codes for r in rows]).astype(np.int32)  # (B, K, P)
            seq[..., :g.prompt_frames] = prompt
        s = g.sampling
        keys = row_keys([r.seed for r in rows])
        temp0 = np.array([x.temperature for x in s], np.float64)
        cfg_max = np.array([x.max_cfg_coef for x in s], np.float64)
        cfg_min = np.array([x.min_cfg_coef for x in s], np.float64)
        # top-p when > 0, else top-k when > 0, else the full distribution (audiocraft's order)
        filters = [SamplingConfig(1.0, 1.0, 0 if x.top_p > 0 else x.top_k, x.top_p, x.greedy) for x in s]
        rs = RowSampling.stack(filters, pipe.vocab_size)
        topk_rows = np.array([not x.greedy and x.top_p == 0 and 0 < x.top_k < pipe.vocab_size for x in s])
        steps, arrangement = s[0].decoding_steps, s[0].span_arrangement
        for stage, n in enumerate(steps):
            keys = yield from self._stage(seq, stage, n, arrangement, states, text_mask, prompt, g.prompt_frames,
                                          temp0, cfg_max, cfg_min, rs, topk_rows, keys)
        self._codes[g.index, :, :t] = seq

    def _stage(self, seq, stage, n, arrangement, states, text_mask, prompt, plen, temp0, cfg_max, cfg_min,
               rs, topk_rows, keys):
        """Decode codebook ``stage`` of ``seq`` (B, K, T) in place in ``n`` passes; returns the keys."""
        b, _, t = seq.shape
        span = self.span_len
        chunked = span > 1 and arrangement == "nonoverlap"
        stage_seq = np.full((b, t), self.mask_id, np.int32)
        if chunked:
            n_chunks = t // span
            scores = np.zeros((b, n_chunks), np.float32)
            scores[:, :plen // span] = DONT_REMASK
            n_gen = n_chunks - plen // span
        else:
            scores = np.zeros((b, t), np.float32)
            scores[:, :plen] = DONT_REMASK
            n_gen = t - plen
        schedule = mask_schedule(n)
        for i in range(n):
            mask_p = schedule[i]
            num_masked = max(int(np.float32(mask_p * np.float32(n_gen))), 1)
            if chunked:
                chosen = _top_indices(scores, num_masked)  # (B, num_masked)
                chunks_mask = np.zeros((b, n_chunks), bool)
                np.put_along_axis(chunks_mask, chosen, True, axis=1)
                stage_seq[np.repeat(chunks_mask, span, axis=1)] = self.mask_id
            elif span > 1:  # stride1: least probable overlapping spans
                for r in range(b):
                    stage_seq[r, _least_probable_spans(scores[r], num_masked, span)] = self.mask_id
            else:
                np.put_along_axis(stage_seq, _top_indices(scores, num_masked), self.mask_id, axis=1)
            if plen:
                stage_seq[:, :plen] = prompt[:, stage]
            seq[:, stage] = stage_seq
            coef = (float(mask_p) * cfg_max + (1 - float(mask_p)) * cfg_min).astype(np.float32)
            temp = np.maximum(temp0 * ((n - 1 - i) / n), MIN_TEMPERATURE).astype(np.float32)
            was_masked = stage_seq == self.mask_id
            # Only the positions whose token or confidence is used get logits and sampling: the
            # masked spans (with nonoverlap, every position of the re-masked chunks, a prompt
            # frame sharing one included; their count is the same for every row of the batch).
            needed = np.repeat(chunks_mask, span, axis=1) if chunked else was_masked
            counts = needed.sum(axis=1)
            positions = np.nonzero(needed)[1].reshape(b, -1) if arrangement == "nonoverlap" and \
                (counts == counts[0]).all() else None
            tok, prob, keys = self._pass(seq, stage, states, text_mask, coef, temp, rs, topk_rows, keys, positions)
            stage_seq = np.where(was_masked, tok, stage_seq).astype(np.int32)
            seq[:, stage] = stage_seq
            if chunked:
                scores = (np.float32(1) - prob.reshape(b, n_chunks, span).max(axis=-1)).astype(np.float32)
                scores[~chunks_mask] = DONT_REMASK
            else:
                scores = (-np.log(prob)).astype(np.float32)
                scores[~was_masked] = DONT_REMASK
            self.steps += 1
            yield None
        return keys

    def _pass(self, seq: np.ndarray, stage: int, states: mx.array, text_mask: mx.array, coef: np.ndarray,
              temp: np.ndarray, rs: RowSampling, topk_rows: np.ndarray, keys: mx.array,
              positions: np.ndarray | None = None):
        """One forward with CFG → (tokens (B, T), their probabilities (B, T), next keys).

        ``positions`` (B, M): compute logits, tokens and probabilities there only (the others are
        returned as the mask id and probability 1, and must not be used)."""
        codes = mx.array(seq)
        pos = None if positions is None else mx.array(np.concatenate([positions, positions]).astype(np.int32))
        logits = self.model.stage_logits(mx.concatenate([codes, codes], axis=0), stage, states, text_mask,
                                         positions=pos)[:, 0]
        cond, uncond = mx.split(logits.astype(mx.float32), 2, axis=0)
        guided = uncond + (cond - uncond) * mx.array(coef)[:, None, None]  # (B, T, V)
        probs = mx.softmax(guided / mx.array(temp)[:, None, None], axis=-1)
        if rs.sample:
            # select_tokens applies top-k / top-p to log-probabilities at temperature 1: the same
            # distribution as audiocraft's sample_top_p / sample_top_k of `probs`
            tok, keys = select_tokens(mx.log(probs), rs, keys)
            tok = mx.where(rs.greedy[:, None], mx.argmax(guided, axis=-1).astype(mx.int32), tok)
        else:
            tok = mx.argmax(guided, axis=-1).astype(mx.int32)
        p = mx.take_along_axis(probs, tok[..., None], axis=-1)[..., 0]
        if topk_rows.any():  # audiocraft's sample_top_k renormalises `probs` in place: p is read from that
            kept = mx.where(mx.isinf(filtered_logits(mx.log(probs), replace(rs, top_p_on=False))), 0.0, probs)
            p = mx.where(mx.array(topk_rows)[:, None], p / kept.sum(axis=-1), p)
        mx.eval(tok, p, keys)
        if positions is None:
            return np.array(tok), np.array(p), keys
        full_tok = np.full(seq[:, stage].shape, self.mask_id, np.int32)
        full_p = np.ones(seq[:, stage].shape, np.float32)
        np.put_along_axis(full_tok, positions, np.array(tok), axis=1)
        np.put_along_axis(full_p, positions, np.array(p), axis=1)
        return full_tok, full_p, keys


def _top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores per row, (B, k) (torch.topk's set; ties by lower index)."""
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


def _spans_mask(starts: np.ndarray, t: int, span: int) -> np.ndarray:
    """(T,) bool: True on [s, s + span) for each start s (``_construct_spans_mask``)."""
    mask = np.zeros(t, bool)
    for d in range(span):
        idx = starts + d
        mask[idx[idx < t]] = True
    return mask


def _least_probable_spans(scores: np.ndarray, num_masked: int, span: int) -> np.ndarray:
    """audiocraft's ``_least_probable_span_masking`` for one row: (T,) bool mask made of the u
    overlapping spans with the largest summed scores, u found by its binary search so that the
    masked count is close to ``num_masked`` (Python rounding, last mask built is returned)."""
    t = scores.shape[-1]
    windows = np.lib.stride_tricks.sliding_window_view(scores, span)
    span_scores = windows[:, 0].astype(np.float32)
    for d in range(1, span):
        span_scores = (span_scores + windows[:, d]).astype(np.float32)
    order = np.argsort(-span_scores, kind="stable")
    target = max(num_masked, span)
    lo, hi = target // span, target - span + 1
    mid = round(0.5 * (lo + hi))
    if mid in (lo, hi):
        return _spans_mask(order[:mid], t, span)
    mask = None
    while lo < mid < hi:
        mask = _spans_mask(order[:mid], t, span)
        if mask.sum() > target:
            hi = mid
        else:
            lo = mid
        mid = round(0.5 * (lo + hi))
    return mask
