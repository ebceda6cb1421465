"""Packaging and import layering: one import package, imports pointing down, no torch below eval."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path | str = "/") -> str:
    """Run `code` in a fresh interpreter outside the repository (the installed package is used)."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def _loaded_after_importing(packages: tuple[str, ...], blocked: tuple[str, ...] = ()) -> list[str]:
    """sys.modules of a fresh interpreter after importing every module of ``packages``, with
    imports of the top-level names ``blocked`` refused."""
    out = _python(
        "import sys, json, pkgutil, importlib\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {blocked!r}:\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for name in {packages!r}:\n"
        "    pkg = importlib.import_module(name)\n"
        "    for info in pkgutil.iter_modules(pkg.__path__):\n"
        "        importlib.import_module(name + '.' + info.name)\n"
        "print(json.dumps(sorted(sys.modules)))\n")
    return json.loads(out.splitlines()[-1])


def test_models_import_nothing_of_the_runtime_cli_torch_or_soundfile():
    loaded = _loaded_after_importing(("mlx_music.models",))
    assert "mlx_music.models.musicgen" in loaded and "mlx_music.models.encodec" in loaded
    bad = [name for name in loaded if name.split(".")[0] in ("torch", "transformers", "soundfile", "tokenizers")
           or name.startswith(("mlx_music.runtime", "mlx_music.cli", "mlx_music.converters", "mlx_music.eval"))]
    assert bad == []


def test_runtime_and_models_never_import_torch():
    """Every module of the runtime and the models, imported with torch and transformers blocked."""
    loaded = _loaded_after_importing(("mlx_music.runtime", "mlx_music.models"),
                                     blocked=("torch", "transformers", "torchaudio"))
    assert "mlx_music.runtime.pipeline" in loaded and "mlx_music.runtime.generation" in loaded
    assert "mlx_music.blas" in loaded
    assert not [n for n in loaded if n.split(".")[0] in ("torch", "transformers", "torchaudio")]


def test_public_api_is_short():
    out = _python("import mlx_music, sys; from mlx_music import load, convert; "
                  "print(load.__module__, convert.__module__, 'mlx_music.runtime' in sys.modules)")
    assert out.split() == ["mlx_music.runtime.loader", "mlx_music.converters.convert", "True"]


def test_install_puts_one_top_level_package(tmp_path):
    """`pip install .` (no deps, into a folder): only `mlx_music`, its metadata and the script."""
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    top = sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin")
    assert top == ["mlx_music"]
    assert (target / "bin" / "mlx-music").exists()
    for sub in ("converters", "runtime", "models", "manifests", "eval"):
        assert (target / "mlx_music" / sub / "__init__.py").is_file(), sub
    shipped = sorted(p.name for p in (target / "mlx_music" / "manifests").glob("*.toml"))
    assert shipped == sorted(p.name for p in (ROOT / "manifests").glob("*.toml")) and len(shipped) >= 11
    assert not (target / "mlx_music" / "runtime").is_symlink()  # real files, not links into the clone


def test_import_contracts_hold():
    """import-linter: layers cli -> eval -> converters -> runtime -> models, independent networks."""
    r = subprocess.run([str(Path(sys.executable).with_name("lint-imports"))], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout
