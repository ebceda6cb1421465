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
    # load goes through the conversion cache (an unconverted source is converted once); importing
    # it loads the runtime, not torch.
    assert out.split() == ["mlx_music.converters.autoconvert", "mlx_music.converters.convert", "True"]


def test_install_puts_one_top_level_package(tmp_path):
    """`pip install .` (no deps, into a folder): only `mlx_music`, its metadata and the script."""
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    top = sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin")
    assert top == ["mlx_music"]
    assert (target / "bin" / "mlx-music").exists()
    from mlx_music import __version__
    assert sorted(p.name for p in target.glob("*.dist-info")) == [f"mlx_music_toolkit-{__version__}.dist-info"]
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


def _cli_without(blocked: tuple[str, ...], *args: str) -> subprocess.CompletedProcess:
    """`mlx-music ARGS` in a fresh interpreter where the top-level modules `blocked` are absent
    (their imports fail as an uninstalled package's would)."""
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            f"        if name.split('.')[0] in {blocked!r}:\n"
            "            raise ModuleNotFoundError('No module named ' + repr(name), name=name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from mlx_music.cli import main\n"
            f"sys.argv = ['mlx-music', *{list(args)!r}]\n"
            "main()\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=300)


def test_parity_without_torch_names_the_extra_in_one_line(tmp_path):
    """A plain install (no torch / transformers): one line naming the extra, exit 2 (1 means
    "parity failed")."""
    tiny = ROOT / "tests" / "data" / "tiny-musicgen-stereo"
    for blocked, missing in ((("torch", "transformers"), "torch"), (("transformers",), "transformers")):
        r = _cli_without(blocked, "parity", "--hf-path", str(tiny), "--mlx-path", str(tmp_path / "m"))
        assert r.returncode == 2, r.stderr[-2000:]
        assert r.stderr == (f"error: parity needs {missing}, which is not installed: "
                            "pip install 'mlx-music-toolkit[parity]'\n")
    # Any command whose optional import fails says which extra brings it (here: serve's fastapi).
    r = _cli_without(("fastapi",), "serve", "--model", str(tmp_path / "m"))
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr == "error: serve needs fastapi, which is not installed: pip install 'mlx-music-toolkit[serve]'\n"


def test_one_version_and_distribution_name():
    """`mlx-music --version`, the installed metadata and the package all say the same version, and
    the distribution is the one named in every install hint."""
    import importlib.metadata
    import re

    from mlx_music import __version__
    from mlx_music._meta import DISTRIBUTION

    r = subprocess.run([str(Path(sys.executable).with_name("mlx-music")), "--version"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"mlx-music, version {__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)
    assert importlib.metadata.version(DISTRIBUTION) == __version__
    # The other "mlx-music" on the package index is someone else's project: no hint may name it.
    stale = []
    for path in [ROOT / "README.md", ROOT / "pyproject.toml", *ROOT.glob("notes/*.md"), *ROOT.glob("scripts/*"),
                 *ROOT.glob("benchmarks/*"), *ROOT.glob("docs/*.md"), *ROOT.glob("mlx_music/server/static/*"),
                 *[p for d in ("mlx_music", "converters", "runtime", "mlx_models") for p in (ROOT / d).rglob("*.py")]]:
        if path.is_file():
            text = path.read_text(errors="replace")
            stale += [f"{path.name}: {m.group(0)}" for m in re.finditer(r"install[^\n]{0,40}\bmlx-music\b(?!-toolkit)[^\n]{0,30}|\bmlx-music\[", text)]
    assert stale == []


def test_api_errors_name_parameters_and_the_cli_names_flags(tmp_path):
    """The Python API's errors name its parameters ("pass force=True"), the CLI's the flags
    ("pass --force"): one fault, both ways; and no raise site below the CLI names a flag."""
    import re

    from click.testing import CliRunner

    from mlx_music import convert
    from mlx_music.cli import main
    from mlx_music.converters.errors import OutputError

    tiny = ROOT / "tests" / "data" / "tiny-musicgen-stereo"
    (tmp_path / "out").mkdir()
    try:
        convert(tiny, tmp_path / "out", progress=False)
        raise AssertionError("converted into an existing folder")
    except OutputError as e:
        assert str(e) == f"mlx_path {tmp_path / 'out'}: already exists; pass force=True to replace it"
    r = CliRunner().invoke(main, ["convert", "--hf-path", str(tiny), "--mlx-path", str(tmp_path / "out"), "--quiet"])
    assert r.exit_code == 2
    assert r.stderr == f"error: --mlx-path {tmp_path / 'out'}: already exists; pass --force to replace it\n"
    r = CliRunner().invoke(main, ["convert", "--hf-path", str(tiny), "--mlx-path", str(tmp_path / "x"), "--quiet",
                                  "--codec", "facebook/encodec_32khz"])
    assert r.exit_code == 2 and r.stderr.startswith("error: --codec: only for audiocraft-format checkpoints") \
        and r.stderr.endswith("(use --format audiocraft if it holds both)\n")

    # The whole kind: a message that starts with a flag, or a hint that says "pass --flag".
    flag_in_message = re.compile(r"""(Error|Exception)\(\s*f?["'](--[a-z])|["'][^"'\n]*\bpass --[a-z]""")
    found = []
    for folder in ("converters", "runtime", "mlx_models", "mlx_music/eval"):
        for path in sorted((ROOT / folder).glob("*.py")):
            for m in flag_in_message.finditer(path.read_text()):
                line = path.read_text()[m.start():].splitlines()[0]
                found.append(f"{path.relative_to(ROOT)}: {line.strip()[:100]}")
    assert found == []


def test_cli_use_hint_names_a_flag_for_every_parameter():
    """An API hint "(use a and b instead)" becomes "(use --a and --b instead)" on the command line,
    every parameter of it, not only the first; plain words in a hint stay words."""
    from mlx_music.cli import _as_flags
    from mlx_music.runtime.magnet_generation import MagnetSampling

    try:
        MagnetSampling.from_defaults({}, 4, guidance_scale=3.0)
        raise AssertionError("MAGNeT took guidance_scale")
    except ValueError as e:
        api = str(e)
    assert api.startswith("guidance_scale: ") and api.endswith("(use max_cfg_coef and min_cfg_coef instead)")
    cli = str(_as_flags(ValueError(api)))
    assert cli.startswith("--guidance: ") and cli.endswith("(use --max-cfg-coef and --min-cfg-coef instead)")
    assert str(_as_flags(ValueError("variant x: no chroma (use a musicgen-melody variant)"))) == \
        "--variant x: no chroma (use a musicgen-melody variant)"
    assert str(_as_flags(ValueError("top_k 5: off (use top_p 0 with it)"))) == "--top-k 5: off (use --top-p 0 with it)"
