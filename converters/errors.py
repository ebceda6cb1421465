"""Errors the converter raises for bad input. The CLI prints them as one line and exits 2."""


class ConvertError(ValueError):
    """Base class: a user-facing problem with the inputs, options or output folder."""


class SourceError(ConvertError):
    """A source checkpoint file is missing, malformed, inconsistent or unsafe."""


class ManifestError(ConvertError):
    """A manifest is malformed, or the checkpoint's config contradicts it."""


class CompletenessError(ConvertError):
    """Source tensors not covered by a rule, or expected output tensors missing / mis-shaped."""


class OutputError(ConvertError):
    """The output folder cannot be written (exists without --force, disk full, ...)."""


def name_some(keys, limit: int = 8) -> str:
    """'a, b, c (+12 more)' — error messages stay one line even for long key lists."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")
