"""`mlx-music serve`: a local web page and HTTP API over the runtime, with dynamic batching.

    from mlx_music.server import create_app, serve
    serve({"small": "out/musicgen-small"}, port=8000)        # what `mlx-music serve` runs

Needs the ``serve`` extra (FastAPI, uvicorn, python-multipart). Imports the runtime only.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServerConfig", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from mlx_music.server import app

        return getattr(app, name)
    raise AttributeError(f"module 'mlx_music.server' has no attribute {name!r}")
