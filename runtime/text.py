"""T5 tokenization with the `tokenizers` library, from the checkpoint's tokenizer.json."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np


class TextTokenizer:
    def __init__(self, path: Path, max_tokens: int = 512):
        from tokenizers import Tokenizer

        if not path.exists():
            raise ValueError(f"{path}: tokenizer.json missing from the checkpoint")
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise ValueError(f"{path}: not a valid tokenizer.json ({first})") from None
        self.max_tokens = max_tokens
        self.pad_id = self.tok.token_to_id("<pad>") or 0

    def __call__(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """ids and attention mask (B, S), padded on the right to the longest prompt."""
        encs = self.tok.encode_batch(list(prompts))
        ids = [e.ids for e in encs]
        if any(len(x) > self.max_tokens for x in ids):
            warnings.warn(f"prompt longer than {self.max_tokens} tokens (the text limit of this model); truncated", stacklevel=3)
            # keep the end-of-sequence token, as a truncating T5 tokenizer does
            ids = [x[: self.max_tokens - 1] + x[-1:] if len(x) > self.max_tokens else x for x in ids]
        n = max(len(x) for x in ids)
        out = np.full((len(ids), n), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(ids), n), dtype=np.int32)
        for i, x in enumerate(ids):
            out[i, : len(x)] = x
            mask[i, : len(x)] = 1
        return out, mask
