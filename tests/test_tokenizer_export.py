"""converters/tokenizer_export.py: tokenizer.json built from spiece.model tokenizes like SentencePiece.

A tiny unigram model (T5 id layout: pad=0, eos=1, unk=2) is trained in the test on generated text.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

spm = pytest.importorskip("sentencepiece")
from tokenizers import Tokenizer  # noqa: E402

from mlx_music.converters.tokenizer_export import load_spiece_proto, spiece_to_tokenizer_json, t5_tokenizer_config  # noqa: E402

WORDS = ("jazz piano drums bass guitar ambient lofi chill beat upbeat electronic rock metal violin "
         "orchestral cinematic epic synth pop hip hop house techno trance funky groovy mellow happy "
         "sad dark bright fast slow tempo melody harmony rhythm 80s 90s café naïve über déjà vu "
         "with and the a of in for by, . ! ? - ' 120 bpm").split()


def _corpus(n: int = 3000, seed: int = 0) -> str:
    rng = random.Random(seed)
    # Pseudo-words from syllables give the trainer enough distinct substrings for 200 pieces.
    syl = ["ka", "ro", "mi", "tel", "sun", "qua", "bri", "dho", "ex", "ion", "ing", "ly", "ze", "wo"]
    vocab = list(WORDS) + ["".join(rng.choice(syl) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    lines = [" ".join(rng.choice(vocab) for _ in range(rng.randint(3, 12))) for _ in range(n)]
    lines += ["Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３ ﬁ ligature", "① ② ③ ㎏ ㍿"] * 5  # exercise NFKC rules
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("spm")
    (d / "corpus.txt").write_text(_corpus(), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "spiece"), vocab_size=200,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=0.98,  # leaves rare chars out of the vocab -> <unk> paths get tested
        num_threads=1, minloglevel=2)
    return d / "spiece.model"


@pytest.fixture(scope="module")
def exported(spm_model, tmp_path_factory) -> Tokenizer:
    out = spiece_to_tokenizer_json(spm_model, tmp_path_factory.mktemp("tok") / "tokenizer.json")
    return Tokenizer.from_file(str(out))


def _cases() -> list[str]:
    rng = random.Random(1)
    fixed = [
        "", " ", "   ", "a", "jazz", "80s pop with a funky bass line",
        "  leading and trailing spaces  ", "multiple    inner     spaces", "tabs\tand\nnewlines\r\n",
        "Punctuation!!! ... ?? (brackets) [x] {y} \"quotes\" 'single'", "digits 0123456789 3.14 -42",
        "Café naïve über déjà-vu", "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３", "ﬁne ligatures", "① ② ③ ㎏",
        "unknown: 漢字 かな 한국어 Ω ψ ∑ 🎵🎶 ♫", "emoji🎸in the middle", "ZzZ qqq xxxx",
        "\u00a0nbsp\u00a0and\u2009thin space", "zero\u200bwidth", "UPPER lower MiXeD", "a" * 300,
        "▁already▁has▁meta", "e\u0301 combining vs é precomposed",
    ]
    alphabet = "".join(WORDS) + " 漢🎵\t!?.,'Ω  "
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(150)]
    fuzz += [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20))) for _ in range(100)]
    return fixed + fuzz


def test_matches_sentencepiece(spm_model, exported):
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2)
    exported.no_truncation()
    mismatches = []
    for text in _cases():
        want = sp.encode(text) + [sp.eos_id()]
        got = exported.encode(text).ids
        if got != want:
            mismatches.append((text, want, got))
    assert not mismatches, mismatches[:5]
    # Unknown characters really took the <unk> path in some cases (otherwise the test is weak).
    assert 2 in exported.encode("unknown: 漢字 かな 한국어 🎵").ids


def test_decode_round_trip(spm_model, exported):
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    checked = 0
    for text in ["kaka rosun with a bass", "  tel   ion ", "Café, 120 bpm!", "80s pop"]:
        ids = exported.encode(text).ids
        if 2 in ids:  # spm renders <unk> as " ⁇ ", tokenizers drops it: not comparable
            continue
        checked += 1
        assert exported.decode(ids, skip_special_tokens=True) == sp.decode(ids[:-1])
    assert checked >= 2


def test_t5_layout_and_truncation(spm_model, tmp_path):
    out = spiece_to_tokenizer_json(spm_model, tmp_path, model_max_length=16)  # folder target
    assert out == tmp_path / "tokenizer.json"
    tok = Tokenizer.from_file(str(out))
    assert [tok.id_to_token(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    # T5 sentinels: <extra_id_0> is the last id, <extra_id_99> follows the spm vocab.
    assert tok.token_to_id("<extra_id_0>") == 299 and tok.token_to_id("<extra_id_99>") == 200
    assert tok.get_vocab_size() == 300
    ids = tok.encode(" ".join(["jazz piano"] * 50)).ids
    assert len(ids) == 16 and ids[-1] == 1  # truncated, EOS kept
    assert tok.encode("drums </s> bass").ids.count(1) == 2  # literal </s> is the special token
    data = json.loads(out.read_text())
    assert data["model"]["type"] == "Unigram" and data["model"]["unk_id"] == 2
    cfg = t5_tokenizer_config(load_spiece_proto(spm_model), model_max_length=16)
    assert cfg["pad_token"] == "<pad>" and cfg["eos_token"] == "</s>" and cfg["model_max_length"] == 16


def test_matches_transformers_t5_fast(spm_model, exported, tmp_path, monkeypatch):
    """transformers' own spiece.model -> fast conversion (a local folder holding only spiece.model)."""
    import transformers  # a dev dependency: the reference must be there

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "spiece.model").write_bytes(spm_model.read_bytes())
    # v4: T5TokenizerFast converts from the slow spm tokenizer; v5: T5Tokenizer is the fast one.
    hf = getattr(transformers, "T5TokenizerFast", transformers.T5Tokenizer).from_pretrained(str(tmp_path))
    assert hf.is_fast, "transformers built a slow tokenizer: the comparison would not be with its converter"
    exported.no_truncation()
    cases = _cases() + ["sentinel <extra_id_0> and <extra_id_5>", "x</s>y"]
    diffs = [(t, hf(t).input_ids, exported.encode(t).ids) for t in cases
             if hf(t).input_ids != exported.encode(t).ids]
    assert not diffs, diffs[:5]


def test_converter_writes_tokenizer_from_spiece_only(spm_model, hf_models, tmp_path):
    """A hub folder with only spiece.model: the converted checkpoint tokenizes like SentencePiece."""
    import sys

    import sentencepiece as spm

    sys.path.insert(0, str(Path(__file__).parent))
    import tiny_models
    from mlx_music.converters.convert import convert_checkpoint
    from mlx_music.runtime.text import TextTokenizer

    src = tiny_models.write_hub_folder(hf_models("mono"), tmp_path / "src")
    (src / "tokenizer.json").unlink()
    (src / "tokenizer_config.json").unlink()
    (src / "spiece.model").write_bytes(spm_model.read_bytes())
    convert_checkpoint(src, tmp_path / "out", progress=False)
    assert (tmp_path / "out/tokenizer.json").exists() and (tmp_path / "out/tokenizer_config.json").exists()
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    tok = TextTokenizer(tmp_path / "out/tokenizer.json")
    texts = _cases()[:40]
    ids, mask = tok(texts)
    for row, m, text in zip(ids, mask, texts):
        assert row[: m.sum()].tolist() == sp.encode(text) + [1], text
