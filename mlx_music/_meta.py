"""The package's version and distribution name: the one source for both.

pyproject.toml reads ``__version__`` from here (setuptools ``dynamic``), ``mlx-music --version``
prints it, and every install hint is built by :func:`pip_hint`. This module imports nothing, so
any layer may use it.
"""

from __future__ import annotations

__version__ = "0.2.0"

# The name on the package index. `mlx-music` there is an unrelated project; the import package
# (`mlx_music`) and the command (`mlx-music`) keep their names.
DISTRIBUTION = "mlx-music-toolkit"


def pip_hint(extra: str | None = None) -> str:
    """The command that installs this package (with ``extra``), e.g.
    ``pip install 'mlx-music-toolkit[convert]'``."""
    return f"pip install '{DISTRIBUTION}[{extra}]'" if extra else f"pip install {DISTRIBUTION}"


# Optional imports -> the extra that installs them (pyproject.toml [project.optional-dependencies]).
EXTRA_OF = {"torch": "convert", "sentencepiece": "convert", "google": "convert", "yaml": "convert",
            "transformers": "parity", "peft": "parity",
            "fastapi": "serve", "uvicorn": "serve", "multipart": "serve", "python_multipart": "serve"}


def missing_extra(module: str | None, extra: str | None = None) -> str | None:
    """One line for an optional dependency that is not installed ("needs torch, which is not
    installed: pip install '...[convert]'"), naming `extra` or else the extra that brings `module`;
    None when `module` is not one of our optional dependencies."""
    top = (module or "").split(".")[0]
    if top not in EXTRA_OF:
        return None
    return f"needs {top}, which is not installed: {pip_hint(extra or EXTRA_OF[top])}"
