"""Fast CPU BLAS for MLX on Linux.

The Linux `mlx[cpu]` wheel bundles the netlib *reference* BLAS (`mlx_cpu.libs/libblas-*.so`),
which is unoptimised: a 512x1024 @ 1024x4096 fp32 matmul takes ~1 s on a 2-core x86 box. libmlx
leaves `cblas_sgemm` (and the LAPACK `*_` routines) as undefined dynamic symbols, and the dynamic
linker resolves those through the process' *global* scope before a library's own dependencies. So
loading Intel MKL's single dynamic library (`libmkl_rt.so`, shipped by the `mkl` wheel) with
RTLD_GLOBAL *before* `mlx.core` is imported makes MLX call MKL instead (~20-40x faster GEMM) with no
rebuild and no LD_PRELOAD.

Findings that shaped this module (mkl 2026.2 wheel, mlx 0.32):
* No environment variable is needed: libmkl_rt finds its computational/threading libraries in its
  own directory (the wheel puts them all in <prefix>/lib, next to intel-openmp's libiomp5.so).
* The interface layer MUST be LP64: MLX passes 32-bit ints. A user-level
  `MKL_INTERFACE_LAYER=ILP64` makes MKL run in ilp64 mode and the process segfaults, so we force
  LP64 with `MKL_Set_Interface_Layer(0)` (the function overrides the env var). Note the lower-case
  `mkl_set_interface_layer` symbol is the Fortran binding (takes a pointer) and crashes via ctypes.
* Threading: MKL's default (Intel OpenMP) works; when libgomp is already loaded (e.g. torch was
  imported first) MKL switches to its GNU threading layer by itself. If libiomp5 is missing we pick
  the sequential layer, because MKL otherwise aborts the whole process at the first GEMM.
* macOS: MLX uses Accelerate already, nothing to do.

Opt-out: `MLX_MUSIC_BLAS=reference` skips the preload.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.metadata
import os
import re
import site
import sys
from pathlib import Path
from typing import Any

from mlx_music._meta import pip_hint

# MKL service-function constants (mkl_service.h); we only need a few.
_MKL_INTERFACE_LP64 = 0
_MKL_THREADING_INTEL = 0
_MKL_THREADING_SEQUENTIAL = 1

# Module state: what preload_fast_blas did and why (blas_info reports it).
_state: dict[str, Any] = {"path": None, "reason": "preload_fast_blas() not called", "threading": None,
                          "attempted": False}
_INSTALL_HINT = pip_hint("fast-cpu")
_mkl_handle: ctypes.CDLL | None = None


def _candidate_dirs() -> list[Path]:
    """Directories where a pip/conda `mkl` install may have put libmkl_rt (most specific first)."""
    dirs: list[Path] = []
    # 1. The files recorded by the installed `mkl` distribution: exact, works for venvs and --user.
    try:
        dist = importlib.metadata.distribution("mkl")
        for f in dist.files or ():
            if f.name.startswith("libmkl_rt.so"):
                dirs.append(Path(dist.locate_file(f)).resolve().parent)
    except importlib.metadata.PackageNotFoundError:
        pass
    # 2. Prefix lib dirs (wheel data files land in <prefix>/lib) and site-packages trees.
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, os.environ.get("CONDA_PREFIX", "")}:
        if prefix:
            dirs.append(Path(prefix) / "lib")
    sp = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    if site.ENABLE_USER_SITE and site.getusersitepackages():
        sp.append(site.getusersitepackages())
    for p in sp:
        # <x>/lib/pythonX.Y/site-packages -> <x>/lib (where --user / venv data files go)
        dirs.append(Path(p).parents[1])
        dirs.append(Path(p))
    # 3. The dynamic linker's search path from the environment.
    for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep):
        if p:
            dirs.append(Path(p))
    seen: set[Path] = set()
    out = []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def _soversion(path: str) -> tuple[int, ...]:
    m = re.search(r"\.so((?:\.\d+)*)$", path)
    return tuple(int(x) for x in m.group(1).split(".")[1:]) if m else ()


def find_mkl_rt() -> Path | None:
    """Return the path of `libmkl_rt.so*` (highest soversion in the first dir that has one), or None."""
    for d in _candidate_dirs():
        hits = glob.glob(str(d / "libmkl_rt.so*"))
        if hits:
            return Path(max(hits, key=_soversion))
    return None


def _lib_present(d: Path, stem: str) -> bool:
    return bool(glob.glob(str(d / f"{stem}.so*")))


def _gomp_loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return "libgomp" in f.read()
    except OSError:
        return False


def _preload_torch_gomp() -> None:
    """If torch is installed, load its OpenMP runtime (libgomp) now, without importing torch.

    MKL then picks its GNU threading layer, and torch, once imported, reuses the same libgomp.
    Otherwise MKL would start Intel's OpenMP and torch a second runtime beside it, which gives
    wrong matmul results in both libraries.
    """
    import importlib.util

    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return
    if spec is None or not spec.submodule_search_locations:
        return
    for loc in spec.submodule_search_locations:
        for lib in sorted(Path(loc, "lib").glob("libgomp*.so*")):
            try:
                ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
                return
            except OSError:
                continue


def preload_fast_blas() -> str | None:
    """Load MKL globally so MLX's CPU GEMM uses it. Call before `import mlx.core`.

    Returns the loaded library path, or None when skipped (reason in `blas_info()["reason"]`).
    Idempotent: the first call decides (a later call cannot undo an early `import mlx.core`, and
    must not replace the first call's true reason with "imported before"). Never raises.
    """
    if _state["attempted"]:
        return _state["path"]
    _state["attempted"] = True
    return _preload()


def _preload() -> str | None:
    global _mkl_handle
    if not sys.platform.startswith("linux"):
        _state["reason"] = "not Linux (MLX uses Accelerate on macOS)" if sys.platform == "darwin" \
            else f"unsupported platform {sys.platform}"
        return None
    if os.environ.get("MLX_MUSIC_BLAS", "").lower() in ("reference", "none", "off", "0"):
        _state["reason"] = "disabled by MLX_MUSIC_BLAS"
        return None
    # Reasons are checked in the order that makes each one true on its own: MKL missing is the
    # reason whatever the import order, and "imported before" only when MKL is there to load.
    path = find_mkl_rt()
    if path is None:
        import platform

        machine = platform.machine().lower()
        if machine not in ("x86_64", "amd64"):
            _state["reason"] = (f"MKL is not installed (Intel MKL has no {machine} build; MLX uses its "
                                "bundled reference BLAS)")
        else:
            _state["reason"] = f"MKL is not installed; install it with: {_INSTALL_HINT}"
        return None
    if "mlx.core" in sys.modules:
        # libmlx's symbols may already be bound to the bundled BLAS; a late load would be a lie.
        _state["reason"] = ("mlx.core was imported before preload_fast_blas() (import mlx_music "
                            "before mlx.core)")
        if sys.modules["mlx.core"].default_device() == sys.modules["mlx.core"].cpu:
            # Silent, this costs 3-5x on every CPU matmul (measured on musicgen-small): say so once.
            import warnings

            warnings.warn("mlx.core was imported before mlx_music, so MLX's CPU matrix products use its "
                          "slow bundled BLAS instead of MKL: import mlx_music first", RuntimeWarning, stacklevel=3)
        return None
    d = path.parent
    # libmkl_rt dlopens these lazily at the first BLAS call and calls exit() if they are missing,
    # so check now while we can still fall back to the reference BLAS.
    if not (_lib_present(d, "libmkl_core") and _lib_present(d, "libmkl_intel_lp64")):
        _state["reason"] = (f"incomplete MKL install in {d} (libmkl_core/libmkl_intel_lp64 missing); "
                            f"reinstall it with: pip install --force-reinstall mkl")
        return None
    threading = os.environ.get("MKL_THREADING_LAYER")
    if threading is None and _lib_present(d, "libmkl_gnu_thread"):
        _preload_torch_gomp()
    if threading is None:
        if _gomp_loaded() and _lib_present(d, "libmkl_gnu_thread"):
            threading = "gnu (auto)"  # MKL picks this itself when libgomp is in the process
        elif _lib_present(d, "libiomp5") and _lib_present(d, "libmkl_intel_thread"):
            threading = "intel"
        elif _lib_present(d, "libmkl_sequential"):
            threading = "sequential"
        else:
            _state["reason"] = (f"no usable MKL threading library in {d}; reinstall it with: "
                                "pip install --force-reinstall mkl intel-openmp")
            return None
    try:
        lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        lib.MKL_Set_Interface_Layer.argtypes = [ctypes.c_int]
        lib.MKL_Set_Interface_Layer.restype = ctypes.c_int
        # Must precede any other MKL call; overrides a user MKL_INTERFACE_LAYER=ILP64.
        if lib.MKL_Set_Interface_Layer(_MKL_INTERFACE_LP64) != _MKL_INTERFACE_LP64:
            _state["reason"] = "MKL refused the LP64 interface layer"
            return None
        if threading in ("intel", "sequential"):
            lib.MKL_Set_Threading_Layer.argtypes = [ctypes.c_int]
            lib.MKL_Set_Threading_Layer(
                _MKL_THREADING_INTEL if threading == "intel" else _MKL_THREADING_SEQUENTIAL)
    except (OSError, AttributeError) as e:
        _state["reason"] = f"loading {path} failed: {e}"
        return None
    _mkl_handle = lib
    _state.update(path=str(path), reason=None, threading=threading)
    return str(path)


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def _global_symbol_library(name: str) -> str | None:
    """Which library a global-scope lookup of `name` hits (what libmlx's undefined symbol binds to
    first), or None if no globally visible library defines it."""
    try:
        proc = ctypes.CDLL(None)
        addr = ctypes.cast(getattr(proc, name), ctypes.c_void_p).value
    except (AttributeError, OSError):
        return None
    try:
        dladdr = proc.dladdr
    except AttributeError:  # glibc < 2.34 keeps dladdr in libdl
        dladdr = ctypes.CDLL("libdl.so.2").dladdr
    info = _DlInfo()
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    if dladdr(addr, ctypes.byref(info)) and info.dli_fname:
        return info.dli_fname.decode()
    return None


def _mkl_version() -> str | None:
    if _mkl_handle is None:
        return None
    buf = ctypes.create_string_buffer(256)
    _mkl_handle.MKL_Get_Version_String(buf, len(buf))
    return buf.value.decode(errors="replace").strip()


def blas_info() -> dict[str, Any]:
    """Which BLAS MLX's CPU kernels use in this process.

    Keys: "blas" ("mkl (<path>)", "reference (bundled)", "accelerate"), "backend"
    ("mkl"|"reference"|"accelerate"|"other"), "path", "preloaded" (by preload_fast_blas),
    "reason" (why the preload was skipped), "threading" (MKL threading layer we chose),
    "mkl_version".
    """
    info: dict[str, Any] = {"preloaded": bool(_state["path"]), "reason": _state["reason"],
                            "threading": _state["threading"], "mkl_version": _mkl_version(),
                            "path": None}
    if sys.platform == "darwin":
        info.update(blas="accelerate", backend="accelerate")
        return info
    lib = _global_symbol_library("cblas_sgemm")
    if lib and "libmkl" in os.path.basename(lib):
        info.update(blas=f"mkl ({lib})", backend="mkl", path=lib)
        if "mlx.core" in sys.modules and not _state["path"]:
            # Loaded globally by someone else; it only takes effect if it preceded mlx.core.
            info["note"] = "MKL is globally loaded but not by preload_fast_blas(); effective only " \
                           "if it was loaded before mlx.core"
    elif lib:
        info.update(blas=f"other ({lib})", backend="other", path=lib)
    else:
        # Nothing global defines cblas_sgemm: libmlx binds to the reference BLAS it bundles.
        info.update(blas="reference (bundled)", backend="reference")
    return info
