"""Reading line-based records (JSON Lines, CSV) exactly as their formats define lines.

`str.splitlines()` also breaks at U+2028, U+2029, U+0085, \\x0b, \\x0c and \\x1c-\\x1e, which may sit
inside a prompt or a caption: a row would be split in two (or lost, or a bogus row invented).
JSON Lines end at ``\\n`` only (a ``\\r`` before it is JSON whitespace); CSV records end at an
unquoted line end, which only the `csv` module reading the whole text knows. Used by batch jobs
(prompts files) and training data (audiofolder metadata).
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any, Iterator

_JSON_WHITESPACE = " \t\r"


def jsonl_lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of each non-blank line of JSON Lines text, split at ``\\n``
    only. Blank means JSON whitespace only: a line holding just U+2028 is a (bad) record."""
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip(_JSON_WHITESPACE):
            yield number, line


def csv_records(text: str, **kwargs) -> csv.DictReader:
    """A `csv.DictReader` over the whole text (no newline translation: quoted fields keep their
    line breaks, and only unquoted line ends end a record); ``kwargs`` go to DictReader."""
    return csv.DictReader(io.StringIO(text, newline=""), **kwargs)


def loads_json(text: str | bytes) -> Any:
    """``json.loads`` for text from a file or a user: every malformed input is a
    `json.JSONDecodeError` (a ValueError), including nesting deeper than the parser's stack
    (``"[" * 30000``), which `json` reports as a RecursionError that would escape the callers'
    ``except ValueError`` as a traceback."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", "", 0) from None


def json_objects(text: str) -> Iterator[dict]:
    """The JSON objects of a JSON Lines file we append to (a manifest, metrics), one per ``\n``;
    a line that is not a whole JSON object (the torn last line of a killed writer) is skipped."""
    for line in text.split("\n"):
        try:
            value = loads_json(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            yield value
