"""Shared fixtures: tiny transformers models and their hub folders, built once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def hf_models():
    """arch -> transformers model (built lazily, cached)."""
    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = tiny_models.build_model(arch)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory, hf_models):
    """(arch, layout, weight_norm='new', tied_copy=True) -> hub-layout folder (cached)."""
    root = tmp_path_factory.mktemp("hf")
    cache: dict = {}

    def get(arch: str, layout: str = "single", weight_norm: str = "new", tied_copy: bool = True) -> Path:
        key = (arch, layout, weight_norm, tied_copy)
        if key not in cache:
            folder = root / "-".join(map(str, key))
            tiny_models.write_hub_folder(hf_models(arch), folder, layout=layout,
                                         weight_norm=weight_norm, tied_copy=tied_copy)
            cache[key] = folder
        return cache[key]

    return get


TINY_STEREO = Path(__file__).parent / "data" / "tiny-musicgen-stereo"


@pytest.fixture(scope="session")
def model(tmp_path_factory) -> Path:
    """The shipped tiny stereo MusicGen (tests/data), converted once per session; read-only.
    A test module may define its own ``model``."""
    from mlx_music.converters.convert import convert_checkpoint

    out = tmp_path_factory.mktemp("tiny") / "tiny-stereo"
    convert_checkpoint(TINY_STEREO, out, progress=False)
    return out


@pytest.fixture(scope="module")
def pipe(model):
    """``model`` loaded, once per test module (a module may change its pipeline's settings)."""
    from mlx_music import load

    return load(model)


@pytest.fixture(scope="session")
def mlx_folder(tmp_path_factory, hf_folder):
    """(arch, layout='single', dtype='float32') -> converted MLX folder (cached)."""
    from mlx_music.converters.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("mlx")
    cache: dict = {}

    def get(arch: str, layout: str = "single", dtype: str = "float32") -> Path:
        key = (arch, layout, dtype)
        if key not in cache:
            out = root / "-".join(key)
            convert_checkpoint(hf_folder(arch, layout), out, dtype=dtype, progress=False)
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="module")
def torch_single_thread():
    """Tiny models on 2 shared cores: torch's OpenMP threads mostly spin (8x slower end to end)."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture
def browser_path() -> str:
    """The Chrome/Chromium the page test drives (scripts/browser.py finds it; scripts/setup.sh
    installs one where it can). None found: the test fails with one line saying how to get one."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mlx_music_browser", Path(__file__).parents[1] / "scripts" / "browser.py")
    finder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finder)
    path = finder.find_browser()
    if path is None:
        pytest.fail(finder.install_hint(), pytrace=False)
    return path
