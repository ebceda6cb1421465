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
        self.pad_id = self.tok.token_to_id("<pad>") or 0
        # Right padding to the longest prompt of a batch. Truncation happens before the
        # post-processor adds </s>, so a truncated prompt keeps its end-of-sequence token, as a
        # truncating T5 tokenizer does.
        self.tok.enable_padding(direction="right", pad_id=self.pad_id,
                                pad_token=self.tok.id_to_token(self.pad_id) or "<pad>")
        self.max_tokens = max_tokens

    @property
    def max_tokens(self) -> int:
        return self.tok.truncation["max_length"]

    @max_tokens.setter
    def max_tokens(self, n: int) -> None:
        """The text limit (the pipeline lowers it for melody models to fit the position table)."""
        self.tok.enable_truncation(int(n))

    def __call__(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """ids and attention mask (B, S), padded on the right to the longest prompt."""
        encs = self.tok.encode_batch(list(prompts))
        if any(e.overflowing for e in encs):
            warnings.warn(f"prompt longer than {self.max_tokens} tokens (the text limit of this model); truncated", stacklevel=3)
        ids = np.array([e.ids for e in encs], dtype=np.int32)
        mask = np.array([e.attention_mask for e in encs], dtype=np.int32)
        return ids, mask
