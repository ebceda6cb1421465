"""Build a `tokenizer.json` (Hugging Face `tokenizers` format) from a T5 `spiece.model`.

Some T5-based repos ship only the SentencePiece model. The MLX runtime only depends on the
`tokenizers` library (no sentencepiece/protobuf at run time), so the converter turns the
SentencePiece ModelProto into an equivalent `tokenizers` pipeline:

  normalizer    : the proto's precompiled charsmap (NFKC-style rules compiled by spm_train), then
                  SentencePiece's `remove_extra_whitespaces` (strip spaces at both ends, collapse runs)
  pre-tokenizer : Metaspace("▁", prepend if add_dummy_prefix, split on ▁ if split_by_whitespace)
  model         : Unigram over the proto's pieces/scores, unk id from the trainer spec (fuses runs
                  of unknown characters into one <unk>, as SentencePiece does)
  post-processor: `$A </s>` / `$A </s> $B </s>` (T5 appends EOS; no BOS)
  decoder       : Metaspace (+ ByteFallback when the model uses byte fallback)

Control/unknown pieces (<pad>, </s>, <unk>) become special added tokens, and T5's `<extra_id_N>`
sentinels are appended (ids vocab+extra_ids-1-N, like transformers' T5Tokenizer), so the result
also matches transformers' T5TokenizerFast on text containing those literals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

SPIECE_UNDERLINE = "\u2581"

# sentencepiece_model.proto enums (stable since 2018).
_UNIGRAM = 1
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def load_spiece_proto(spiece_path: str | Path) -> Any:
    """Parse a SentencePiece model file into its ModelProto (needs sentencepiece + protobuf)."""
    from sentencepiece import sentencepiece_model_pb2  # converter-only dependency

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(spiece_path).read_bytes())
    return proto


def build_tokenizer(proto: Any, *, extra_ids: int = 100, model_max_length: int | None = 512) -> Tokenizer:
    """Return a `tokenizers.Tokenizer` equivalent to the SentencePiece unigram model `proto`."""
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    if ts.model_type != _UNIGRAM:
        # T5 models are all unigram; BPE spm models would need a different (merges-based) model.
        raise ValueError(f"only SentencePiece unigram models are supported (model_type={ts.model_type})")
    pieces = list(proto.pieces)
    if not pieces:
        raise ValueError("SentencePiece model has no pieces")
    n = len(pieces)
    unk_id = ts.unk_id
    eos_id = ts.eos_id
    if not (0 <= unk_id < n) or pieces[unk_id].type != _UNKNOWN:
        raise ValueError(f"unk_id {unk_id} is not an UNKNOWN piece")
    if not (0 <= eos_id < n):
        raise ValueError("T5 tokenizers need an EOS piece (eos_id < 0 in the SentencePiece model)")

    vocab = [(p.piece, float(p.score)) for p in pieces]
    byte_fallback = bool(ts.byte_fallback)
    tok = Tokenizer(models.Unigram(vocab, unk_id=unk_id, byte_fallback=byte_fallback))

    norm: list[normalizers.Normalizer] = []
    if ns.precompiled_charsmap:
        norm.append(normalizers.Precompiled(ns.precompiled_charsmap))
    if ns.remove_extra_whitespaces:
        # SentencePiece only treats ' ' as whitespace here (after the charsmap mapped tabs etc.),
        # so use explicit regexes instead of Strip (which would also eat e.g. U+2028).
        norm += [normalizers.Replace(Regex("^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm:
        tok.normalizer = normalizers.Sequence(norm)

    prepend = "always" if ns.add_dummy_prefix else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE_UNDERLINE, prepend_scheme=prepend,
                                                 split=bool(ts.split_by_whitespace))
    dec: list[decoders.Decoder] = []
    if byte_fallback:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Metaspace(replacement=SPIECE_UNDERLINE, prepend_scheme=prepend,
                                  split=bool(ts.split_by_whitespace)))
    tok.decoder = decoders.Sequence(dec) if len(dec) > 1 else dec[0]

    # SentencePiece never produces control pieces from text; as special added tokens they are
    # matched only as exact literals (what T5TokenizerFast does), never inside the Unigram lattice.
    special = [AddedToken(p.piece, special=True, normalized=False)
               for p in pieces if p.type in (_CONTROL, _UNKNOWN)]
    user = [AddedToken(p.piece, special=False, normalized=False)
            for p in pieces if p.type == _USER_DEFINED]
    tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    if extra_ids:
        # transformers' T5Tokenizer: <extra_id_0> is the LAST id, so add them in reverse order.
        sentinels = [AddedToken(f"<extra_id_{i}>", special=True, normalized=False)
                     for i in reversed(range(extra_ids))]
        tok.add_special_tokens(sentinels)
        assert tok.token_to_id("<extra_id_0>") == n + extra_ids - 1

    eos = pieces[eos_id].piece
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, eos_id)])
    if model_max_length:
        # The text encoder was trained on <= 512 tokens; truncation keeps the trailing EOS.
        tok.enable_truncation(max_length=model_max_length)
    return tok


def t5_tokenizer_config(proto: Any, *, model_max_length: int = 512, extra_ids: int = 100) -> dict[str, Any]:
    """A tokenizer_config.json for the exported tokenizer (for transformers interop)."""
    pieces, ts = proto.pieces, proto.trainer_spec
    cfg: dict[str, Any] = {
        "tokenizer_class": "T5Tokenizer",
        "model_max_length": model_max_length,
        "eos_token": pieces[ts.eos_id].piece,
        "unk_token": pieces[ts.unk_id].piece,
        "extra_ids": extra_ids,
        "additional_special_tokens": [f"<extra_id_{i}>" for i in range(extra_ids)],
    }
    if 0 <= ts.pad_id < len(pieces):
        cfg["pad_token"] = pieces[ts.pad_id].piece
    return cfg


def spiece_to_tokenizer_json(spiece_path: str | Path, out_path: str | Path, model_max_length: int = 512,
                             *, extra_ids: int = 100) -> Path:
    """Convert `spiece.model` into a `tokenizer.json` at `out_path` (a file path, or a folder).

    `model_max_length` becomes the tokenizer's truncation length (0/None disables truncation);
    `extra_ids` T5 sentinel tokens are appended after the SentencePiece vocabulary.
    Returns the written path.
    """
    proto = load_spiece_proto(spiece_path)
    tok = build_tokenizer(proto, extra_ids=extra_ids, model_max_length=model_max_length)
    out = Path(out_path)
    if out.is_dir():
        out = out / "tokenizer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out), pretty=True)
    return out
