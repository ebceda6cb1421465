"""Bad-input matrix for `mlx-music convert` / converters.convert_checkpoint.

Every case feeds one broken input and asserts the contract users rely on: the converter refuses
with our own exception type (API) or exit code 2 (CLI, a real subprocess so stderr is what a user
sees), the message is one line naming the file/key/option and what was expected, nothing looks
like a traceback, and no partial output exists: the output folder is absent, or the previous good
folder is untouched byte for byte, and no temporary/backup folder is left next to it.

The helpers at the top are shared by the other test_reliability_*.py modules.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from mlx_music.converters.convert import convert_checkpoint
from test_convert import load_mlx_weights
from mlx_music.converters.errors import CompletenessError, ConvertError, ManifestError, OutputError, SourceError

ROOT = Path(__file__).resolve().parent.parent
MONO_TENSORS = 135  # output tensors of the tiny mono checkpoint (tests/tiny_models.py)

# ----------------------------------------------------------------------------------------------
# Shared helpers (imported by the other reliability modules)


@dataclass(frozen=True)
class CliRun:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return f"argv={list(self.argv)}\nrc={self.returncode}\nstdout={self.stdout!r}\nstderr={self.stderr!r}"


# Taken once, in the main thread: background jobs build their environments while pytest sets and
# deletes PYTEST_CURRENT_TEST, and iterating os.environ during that raises KeyError.
_BASE_ENV = dict(os.environ)


def cli_env(**overrides: str | None) -> dict[str, str]:
    """The user's environment minus switches that would change what the CLI prints."""
    env = dict(_BASE_ENV)
    env.pop("MLX_MUSIC_DEBUG", None)  # debug mode re-raises with a traceback on purpose
    env["PYTHONWARNINGS"] = "default"
    for k, v in overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def run_cli(args: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 180,
            prefix: Sequence[str] = ("-m", "mlx_music.cli")) -> CliRun:
    """`python -m runtime.cli ARGS` as a real process (the entry point `mlx-music` runs the same main)."""
    argv = (sys.executable, *prefix, *map(str, args))
    r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=dict(env or cli_env()),
                       timeout=timeout)
    return CliRun(argv, r.returncode, r.stdout, r.stderr)


def command_options(command: str) -> set[str]:
    """Every --long option the click command accepts (to catch messages naming options that don't exist)."""
    from mlx_music.cli import main

    cmd = main.commands[command]
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")} | {"--help"}


_OPTION = re.compile(r"(?<![\w/-])--[a-z][a-z0-9-]*")


def assert_cli_error(run: CliRun, command: str, needles: Sequence[str], stdout_ok: bool = False) -> str:
    """Exit 2, one error line holding every needle, no traceback, nothing on stdout (unless the
    command legitimately logged progress before failing: stdout_ok); returns the error line."""
    assert "Traceback" not in run.stderr, f"traceback on stderr:\n{run.describe()}"
    assert run.returncode == 2, f"expected exit 2:\n{run.describe()}"
    assert stdout_ok or run.stdout == "", f"a refused command must not report output:\n{run.describe()}"
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    # click prints its usage context ("Usage: ...", "Try '... --help'") above a usage error's
    # one-line "Error: ..."; that context is not part of the message.
    body = [ln for ln in lines if not ln.startswith(("Usage: ", "Try '"))]
    assert len(body) == 1, f"expected exactly one error line:\n{run.describe()}"
    line = body[0]
    assert line.startswith(("error: ", "Error: ")), f"not an error line: {line!r}"
    for needle in needles:
        assert needle in line, f"{needle!r} missing from the error line {line!r}"
    named = set(_OPTION.findall(line))
    unknown = named - command_options(command)
    assert not unknown, f"message names options `{command}` does not have: {sorted(unknown)}: {line!r}"
    return line


def assert_api_error(exc: BaseException, expected: type[BaseException] | tuple[type[BaseException], ...],
                     needles: Sequence[str]) -> None:
    assert isinstance(exc, expected), f"expected {expected}, got {type(exc).__name__}: {exc}"
    msg = str(exc)
    assert msg and "\n" not in msg, f"message must be one non-empty line: {msg!r}"
    for needle in needles:
        assert needle in msg, f"{needle!r} missing from {msg!r}"


def tree_digest(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under folder (byte-for-byte comparisons)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def free_port() -> int:
    """A local TCP port nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_safetensors(path: Path, header: dict, data: bytes, header_len: int | None = None) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)


def prefetch(jobs: Mapping[str, Callable[[], object]], workers: int = 3) -> dict[str, Future]:
    """Start independent subprocess-heavy jobs now (a few at a time) so process start-up overlaps;
    each test then waits for its own job only. Threads only wait on children, so the GIL is idle."""
    pool = ThreadPoolExecutor(max_workers=workers)
    futures = {name: pool.submit(job) for name, job in jobs.items()}
    pool.shutdown(wait=False)
    return futures


def selected_params(request: pytest.FixtureRequest, argname: str = "case") -> list:
    """The parametrize values of this module's tests that pytest will run (honours -k)."""
    out = []
    for item in request.session.items:
        spec = getattr(item, "callspec", None)
        if item.module is request.module and spec is not None and argname in spec.params:
            out.append(spec.params[argname])
    return out


# ----------------------------------------------------------------------------------------------
# Source mutations (each takes the copied hub folder and breaks one thing)

ST = "model.safetensors"
SHARD = "model-{:05d}-of-00003.safetensors"
BIN = "pytorch_model.bin"
FC2 = "decoder.model.decoder.layers.1.fc2.weight"
EMB = "text_encoder.shared.weight"


def _truncate(name: str, keep: float) -> Callable[[Path], None]:
    def mutate(src: Path) -> None:
        raw = (src / name).read_bytes()
        (src / name).write_bytes(raw[: int(len(raw) * keep)])
    return mutate


def _st_corrupt_header_json(src: Path) -> None:
    raw = bytearray((src / ST).read_bytes())
    raw[8:22] = b"{not: 'json'!}"  # same length, so only the JSON is wrong
    (src / ST).write_bytes(bytes(raw))


def _st_header_len_too_big(src: Path) -> None:
    raw = (src / ST).read_bytes()
    (src / ST).write_bytes(struct.pack("<Q", 4 * len(raw)) + raw[8:])


def _st_offsets_out_of_range(src: Path) -> None:
    header, data = read_safetensors(src / ST)
    start, end = header[FC2]["data_offsets"]
    header[FC2]["data_offsets"] = [start + len(data), end + len(data)]
    write_safetensors(src / ST, header, data)


def _st_dtype(dtype: str) -> Callable[[Path], None]:
    def mutate(src: Path) -> None:
        header, data = read_safetensors(src / ST)
        header[FC2]["dtype"] = dtype
        write_safetensors(src / ST, header, data)
    return mutate


def _bin_random_bytes(src: Path) -> None:
    (src / BIN).write_bytes(b"\x80\x02}q\x00." + os.urandom(4096))  # a bare (legacy-looking) pickle


def _bin_with(extra: Mapping[str, object] | None = None, as_list: bool = False) -> Callable[[Path], None]:
    def mutate(src: Path) -> None:
        sd = torch.load(src / BIN, weights_only=True)
        sd.update(extra or {})
        torch.save(list(sd.values()) if as_list else sd, src / BIN)
    return mutate


class ShellPayload:
    """A pickle that, if ever unpickled without weights_only, starts a process creating `marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.Popen, (["touch", self.marker],))


class ExecPayload:
    """A pickle that, if ever unpickled without weights_only, writes `marker` from Python."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _bin_malicious(payload_cls: type, key: str = "decoder.model.decoder.layers.0.fc1.weight",
                   name: str = BIN) -> Callable[[Path], None]:
    def mutate(src: Path) -> None:
        sd = torch.load(src / name, weights_only=True)
        sd[key] = payload_cls(str(src.parent / "PWNED"))
        torch.save(sd, src / name)
    return mutate


def _index_edit(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(src: Path) -> None:
        p = src / "model.safetensors.index.json"
        index = json.loads(p.read_text())
        edit(index["weight_map"])
        p.write_text(json.dumps(index))
    return mutate


def _first_key_of(wm: dict, shard: str) -> str:
    return sorted(k for k, v in wm.items() if v == shard)[0]


def _duplicate_across_shards(src: Path) -> None:
    from safetensors.torch import load_file, save_file

    a = load_file(src / SHARD.format(1))
    b = load_file(src / SHARD.format(2))
    key = sorted(a)[0]
    b[key] = a[key]
    save_file(b, src / SHARD.format(2), metadata={"format": "pt"})


def _config_edit(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(src: Path) -> None:
        cfg = json.loads((src / "config.json").read_text())
        edit(cfg)
        (src / "config.json").write_text(json.dumps(cfg))
    return mutate


def _set_tensor(key: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    def mutate(src: Path) -> None:
        from safetensors.torch import load_file, save_file

        sd = load_file(src / ST)
        sd[key] = fn(sd[key].clone())
        save_file(sd, src / ST, metadata={"format": "pt"})
    return mutate


def _poke(value: float, where: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(t: torch.Tensor) -> torch.Tensor:
        t[where] = value
        return t
    return fn


# ----------------------------------------------------------------------------------------------
# API table


@dataclass(frozen=True)
class SourceCase:
    name: str
    layout: str  # tiny_models layout of the (mono) source
    mutate: Callable[[Path], None]
    exc: type[ConvertError]
    needles: tuple[str, ...]  # "{src}" expands to the source folder
    kwargs: Mapping[str, object] = field(default_factory=dict)
    previous: bool = False  # a good output exists and force=True: it must survive untouched
    marker: bool = False  # the case plants a payload; PWNED must never appear

    def __str__(self) -> str:
        return self.name


SOURCE_CASES = [
    # safetensors
    SourceCase("st-truncated", "single", _truncate(ST, 0.5), SourceError, ("{src}/model.safetensors", "not a valid safetensors")),
    SourceCase("st-truncated-force", "single", _truncate(ST, 0.9), SourceError, ("{src}/model.safetensors",), previous=True),
    SourceCase("st-header-not-json", "single", _st_corrupt_header_json, SourceError, ("{src}/model.safetensors", "JSON")),
    SourceCase("st-header-len-beyond-file", "single", _st_header_len_too_big, SourceError, ("{src}/model.safetensors", "header")),
    SourceCase("st-offsets-out-of-range", "single", _st_offsets_out_of_range, SourceError, ("{src}/model.safetensors", "offset")),
    SourceCase("st-unknown-dtype", "single", _st_dtype("Q4"), SourceError, ("{src}/model.safetensors", "Q4")),
    SourceCase("st-integer-dtype", "single", _st_dtype("I32"), SourceError, ("non-float", FC2[len("decoder.model."):])),
    # .bin
    SourceCase("bin-not-zip", "bin", _bin_random_bytes, SourceError, ("{src}/pytorch_model.bin", "zip")),
    SourceCase("bin-truncated-zip", "bin", _truncate(BIN, 0.6), SourceError, ("{src}/pytorch_model.bin",)),
    SourceCase("bin-malicious-popen", "bin", _bin_malicious(ShellPayload), SourceError,
               ("{src}/pytorch_model.bin", "refused"), marker=True, previous=True),
    SourceCase("bin-sharded-malicious-exec", "bin-sharded",
               _bin_malicious(ExecPayload, key="evil", name="pytorch_model-00002-of-00003.bin"),
               SourceError, ("pytorch_model-00002-of-00003.bin", "refused"), marker=True),
    SourceCase("bin-non-tensor-values", "bin", _bin_with({"extra.step": 12, "extra.names": ["a", "b"]}),
               SourceError, ("{src}/pytorch_model.bin", "non-tensor", "extra.step")),
    SourceCase("bin-list-not-dict", "bin", _bin_with(as_list=True), SourceError, ("{src}/pytorch_model.bin", "dict")),
    # index JSON
    SourceCase("index-missing-shard", "sharded", lambda s: (s / SHARD.format(2)).unlink(), SourceError,
               ("model.safetensors.index.json", SHARD.format(2), "missing")),
    SourceCase("index-key-in-wrong-shard", "sharded",
               _index_edit(lambda wm: wm.__setitem__(_first_key_of(wm, SHARD.format(1)), SHARD.format(2))),
               SourceError, ("model.safetensors.index.json", "mapped to " + SHARD.format(2))),
    SourceCase("index-stray-shard", "sharded",
               lambda s: shutil.copy(s / SHARD.format(1), s / "model-00004-of-00004.safetensors"),
               SourceError, ("model-00004-of-00004.safetensors", "not in the index")),
    SourceCase("index-duplicate-key", "sharded", _duplicate_across_shards, SourceError,
               ("several shards", SHARD.format(1), SHARD.format(2))),
    SourceCase("index-not-json", "sharded", lambda s: (s / "model.safetensors.index.json").write_text("{ nope"),
               SourceError, ("{src}/model.safetensors.index.json", "JSON")),
    SourceCase("index-path-traversal", "sharded",
               _index_edit(lambda wm: wm.__setitem__(sorted(wm)[0], "../elsewhere/model.safetensors")),
               SourceError, ("../elsewhere/model.safetensors", "plain file name")),
    # config
    SourceCase("config-missing", "single", lambda s: (s / "config.json").unlink(), ManifestError, ("{src}/config.json", "not found")),
    SourceCase("config-not-json", "single", lambda s: (s / "config.json").write_text('{"model_type": '),
               ManifestError, ("{src}/config.json", "not valid JSON")),
    SourceCase("config-missing-field", "single", _config_edit(lambda c: c["decoder"].pop("hidden_size")),
               ManifestError, ("config.json", "decoder.hidden_size")),
    SourceCase("config-unknown-model-type", "single", _config_edit(lambda c: c.__setitem__("model_type", "musicgen_xl")),
               ManifestError, ("config.json", "musicgen_xl", "musicgen_melody")),
    SourceCase("config-codebooks-contradict-channels", "single",
               _config_edit(lambda c: c["decoder"].__setitem__("num_codebooks", 8)),
               ManifestError, ("config.json", "num_codebooks = 8", "needs 4")),
    SourceCase("variant-hidden-size", "single", lambda s: None, ManifestError,
               ("hidden_size = 32", "musicgen-small expects 1024"), kwargs={"variant": "musicgen-small"}),
    SourceCase("variant-codebooks", "single", lambda s: None, ManifestError,
               ("musicgen-stereo-medium expects 2",), kwargs={"variant": "musicgen-stereo-medium"}, previous=True),
    SourceCase("variant-unknown", "single", lambda s: None, ManifestError,
               ("variant 'musicgen-tiny'", "musicgen-small"), kwargs={"variant": "musicgen-tiny"}),
    # tensors
    SourceCase("tensor-wrong-shape", "single", _set_tensor(EMB, lambda t: t[:-1]), CompletenessError,
               ("text_encoder.embed_tokens.weight", "(98, 16) != (99, 16)")),
    SourceCase("tensor-nan", "single", _set_tensor(FC2, _poke(float("nan"), (0, 3))), SourceError,
               (FC2, "NaN/Inf", "allow_nonfinite=True")),  # the API names its parameter
    SourceCase("tensor-inf-force", "single", _set_tensor(EMB, _poke(float("-inf"), (5, 1))), SourceError,
               (EMB, "NaN/Inf", "allow_nonfinite=True"), previous=True),
    SourceCase("tokenizer-missing", "single", lambda s: (s / "tokenizer.json").unlink(), SourceError,
               ("{src}", "tokenizer.json")),
    SourceCase("no-weights", "single", lambda s: (s / ST).unlink(), SourceError, ("{src}", "no weights found")),
]


@pytest.fixture(scope="module")
def good_mono(mlx_folder) -> Path:
    return mlx_folder("mono")


@pytest.mark.parametrize("case", SOURCE_CASES, ids=str)
def test_bad_source_is_refused(case: SourceCase, hf_folder, good_mono, tmp_path):
    src = copy_tree(hf_folder("mono", case.layout), tmp_path / "src")
    case.mutate(src)
    dst = tmp_path / "dst"
    dst.mkdir()
    out = dst / "out"
    before = None
    if case.previous:
        copy_tree(good_mono, out)
        before = tree_digest(out)
    with pytest.raises(BaseException) as info:
        convert_checkpoint(src, out, progress=False, workers=2, force=case.previous, **case.kwargs)
    assert_api_error(info.value, case.exc, [n.format(src=src) for n in case.needles])
    if case.previous:
        assert tree_digest(out) == before, "the previous good output was modified"
        assert os.listdir(dst) == ["out"], f"leftovers next to the output: {os.listdir(dst)}"
    else:
        assert os.listdir(dst) == [], f"partial output left behind: {os.listdir(dst)}"
    if case.marker:
        assert not (tmp_path / "PWNED").exists(), "the pickle payload ran"


def test_nonfinite_weights_convert_with_allow_nonfinite(hf_folder, tmp_path):
    # The refusal above is a default, not a dead end: the documented switch converts them.
    src = copy_tree(hf_folder("mono"), tmp_path / "src")
    _set_tensor(FC2, _poke(float("nan"), (0, 3)))(src)
    res = convert_checkpoint(src, tmp_path / "out", progress=False, allow_nonfinite=True)
    assert res.num_tensors == MONO_TENSORS and (tmp_path / "out" / "conversion.json").is_file()


# ----------------------------------------------------------------------------------------------
# CLI table: real `python -m runtime.cli convert` processes

# Runs the real CLI, but stops itself (SIGSTOP) at a chosen point so the test can SIGKILL it
# exactly there; the only change is a wrapper around functions the converter already exposes.
_STOPPER = r"""
import os, signal, sys
import mlx_music.converters.convert as cc

point = os.environ["RELIABILITY_STOP_AT"]

def stop():
    os.kill(os.getpid(), signal.SIGSTOP)

if point.startswith("tensor:"):
    stop_at = int(point.split(":")[1])
    real_convert = cc.convert_checkpoint
    def convert_checkpoint(*a, **k):
        k["_after_tensor"] = lambda n: stop() if n == stop_at else None
        return real_convert(*a, **k)
    cc.convert_checkpoint = convert_checkpoint
elif point == "before-install":
    real_install = cc._install
    def _install(*a, **k):
        stop()
        return real_install(*a, **k)
    cc._install = _install
elif point == "after-exchange":
    real_exchange = cc._exchange
    def _exchange(a, b):
        ok = real_exchange(a, b)
        stop()
        return ok
    cc._exchange = _exchange
elif point == "between-renames":
    # The two-rename fallback (platforms without an atomic exchange) has a window between them.
    cc._exchange = lambda a, b: False
    import os as real_os
    class OsView:
        def __getattr__(self, name):
            return getattr(real_os, name)
        def replace(self, a, b):
            real_os.replace(a, b)
            if ".old-" in str(b):
                stop()
    cc.os = OsView()
else:
    raise SystemExit("unknown stop point " + point)

from mlx_music.cli import main
main()
"""

# Caps file size inside the child (RLIMIT_FSIZE, like a full disk for big files); Python ignores
# SIGXFSZ, so writes fail with EFBIG instead of killing the process.
_FSIZE = r"""
import os, resource, sys
limit = int(os.environ["RELIABILITY_FSIZE"])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
os.execv(sys.executable, [sys.executable, "-m", "mlx_music.cli", *sys.argv[1:]])
"""


def _proc_state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "gone"
    return stat.rsplit(")", 1)[1].split()[0]


def run_stopped_then_killed(args: Sequence[str], point: str, timeout: float = 180) -> CliRun:
    argv = (sys.executable, "-c", _STOPPER, *map(str, args))
    p = subprocess.Popen(argv, cwd=ROOT, env=cli_env(RELIABILITY_STOP_AT=point), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while p.poll() is None and _proc_state(p.pid) != "T":
        if time.monotonic() > deadline:
            p.kill()
            break
        time.sleep(0.005)
    if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
    out, err = p.communicate()
    return CliRun(argv, p.returncode, out, err)


def run_killed_when(args: Sequence[str], partial_glob: str, count: int, parent: Path,
                    timeout: float = 180) -> CliRun:
    """Real CLI process, SIGKILLed as soon as its temp folder holds `count` files matching the glob."""
    argv = (sys.executable, "-m", "mlx_music.cli", *map(str, args))
    p = subprocess.Popen(argv, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while p.poll() is None and time.monotonic() < deadline:
        tmp = parent / f".out.partial-{p.pid}"
        if len(list(tmp.glob(partial_glob))) >= count:
            os.kill(p.pid, signal.SIGKILL)
            break
        time.sleep(0.0005)
    out, err = p.communicate()
    return CliRun(argv, p.returncode, out, err)


@dataclass(frozen=True)
class CliCase:
    name: str
    run: Callable[[Path, Path, Path], CliRun]  # (hf source, work dir, previous-good source|None) -> run
    check: Callable[[CliRun, Path, dict | None], None]  # (run, work dir, digest of previous output)
    layout: str = "single"
    previous: bool = False

    def __str__(self) -> str:
        return self.name


def _convert_args(src: Path, out: Path, *extra: str) -> list[str]:
    return ["convert", "--hf-path", str(src), "--mlx-path", str(out), "--quiet", *extra]


def _refused(*needles: str, marker: bool = False) -> Callable[[CliRun, Path, dict | None], None]:
    def check(run: CliRun, work: Path, before: dict | None) -> None:
        src = work / "src"
        assert_cli_error(run, "convert", [n.format(src=src, out=work / "dst" / "out") for n in needles])
        _assert_no_partial(work, before)
        if marker:
            assert not (work / "PWNED").exists(), "the pickle payload ran"
    return check


def _assert_no_partial(work: Path, before: dict | None) -> None:
    dst = work / "dst"
    if before is None:
        assert os.listdir(dst) == [], f"partial output left behind: {os.listdir(dst)}"
    else:
        assert (dst / "out").is_dir(), "the previous good output is gone"
        assert tree_digest(dst / "out") == before, "the previous good output was modified"
        assert os.listdir(dst) == ["out"], f"leftovers next to the output: {os.listdir(dst)}"


def _killed_then_rerun(run: CliRun, work: Path, before: dict | None) -> None:
    """After SIGKILL: nothing at --mlx-path that looks complete (or the old folder intact); then a
    plain re-run succeeds and removes the dead run's temporary folder."""
    assert run.returncode == -signal.SIGKILL, f"the conversion was not killed mid-way:\n{run.describe()}"
    dst, out = work / "dst", work / "dst" / "out"
    if before is None:
        assert not out.exists(), f"a killed conversion left {out}: {sorted(os.listdir(out))}"
    else:
        assert out.is_dir() and tree_digest(out) == before, \
            f"--force killed mid-way: the previous output is not intact at {out} (folder now holds {os.listdir(dst)})"
    res = convert_checkpoint(work / "src", out, progress=False, force=before is not None)
    assert res.num_tensors == MONO_TENSORS
    assert os.listdir(dst) == ["out"], f"stale temporary/backup folders after a re-run: {os.listdir(dst)}"


def _disk_full(run: CliRun, work: Path, before: dict | None) -> None:
    assert_cli_error(run, "convert", ["--mlx-path", "write failed"])
    _assert_no_partial(work, before)


def _payload_cli(src: Path, work: Path, prev: Path | None) -> CliRun:
    _bin_malicious(ExecPayload, key="evil")(src)
    return run_cli(_convert_args(src, work / "dst" / "out"))


def _mutated_cli(mutate: Callable[[Path], None], *extra: str) -> Callable[[Path, Path, Path | None], CliRun]:
    def run(src: Path, work: Path, prev: Path | None) -> CliRun:
        mutate(src)
        return run_cli(_convert_args(src, work / "dst" / "out", *extra))
    return run


def _killed_after_exchange(run: CliRun, work: Path, before: dict | None) -> None:
    """Killed right after the atomic swap: the new output is complete in place; the old one
    (now in the temp folder) is swept by the next run."""
    assert run.returncode == -signal.SIGKILL, f"the conversion was not killed mid-way:\n{run.describe()}"
    out = work / "dst" / "out"
    assert len(load_mlx_weights(out)) == MONO_TENSORS
    assert any(p.name.startswith(".out.partial-") for p in (work / "dst").iterdir())
    res = convert_checkpoint(work / "src", out, progress=False, force=True)
    assert res.num_tensors == MONO_TENSORS
    assert os.listdir(work / "dst") == ["out"]


def _killed_fallback_recovers(run: CliRun, work: Path, before: dict | None) -> None:
    """Fallback path killed between its renames: the previous output sits aside as .out.old-PID;
    the next run puts it back intact before doing anything else."""
    assert run.returncode == -signal.SIGKILL, f"the conversion was not killed mid-way:\n{run.describe()}"
    dst, out = work / "dst", work / "dst" / "out"
    assert any(p.name.startswith(".out.old-") for p in dst.iterdir())
    with pytest.raises(OutputError, match="already exists"):  # recovered first, so it exists again
        convert_checkpoint(work / "src", out, progress=False)
    assert tree_digest(out) == before
    assert os.listdir(dst) == ["out"]


def _stopped(point: str, *extra: str) -> Callable[[Path, Path, Path | None], CliRun]:
    def run(src: Path, work: Path, prev: Path | None) -> CliRun:
        return run_stopped_then_killed(_convert_args(src, work / "dst" / "out", "--max-shard-size", "300KB", *extra),
                                       point)
    return run


def _polled(src: Path, work: Path, prev: Path | None) -> CliRun:
    # 300KB shards: about ten of them; kill when the third exists, i.e. mid-write.
    return run_killed_when(_convert_args(src, work / "dst" / "out", "--max-shard-size", "300KB", "--workers", "1"),
                           "model-*.safetensors", 3, work / "dst")


def _fsize(src: Path, work: Path, prev: Path | None) -> CliRun:
    argv = (sys.executable, "-c", _FSIZE, *_convert_args(src, work / "dst" / "out", *(["--force"] if prev else [])))
    r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=cli_env(RELIABILITY_FSIZE="200000"),
                       timeout=180)
    return CliRun(argv, r.returncode, r.stdout, r.stderr)


CLI_CASES = [
    CliCase("cli-malicious-pickle-exec", _payload_cli, _refused("{src}/pytorch_model.bin", "refused", marker=True),
            layout="bin"),
    CliCase("cli-truncated-safetensors-force", _mutated_cli(_truncate(ST, 0.7), "--force"),
            _refused("{src}/model.safetensors", "not a valid safetensors"), previous=True),
    CliCase("cli-existing-output-without-force", _mutated_cli(lambda s: None),
            _refused("--mlx-path", "{out}", "already exists", "--force"), previous=True),
    CliCase("cli-variant-hidden-size", _mutated_cli(lambda s: None, "--variant", "musicgen-small"),
            _refused("{src}/config.json", "hidden_size = 32", "expects 1024", "--variant")),
    CliCase("cli-nan-weights", _mutated_cli(_set_tensor(FC2, _poke(float("nan"), (1, 1)))),
            _refused(FC2, "--allow-nonfinite")),
    CliCase("cli-disk-full", _fsize, _disk_full),
    CliCase("cli-disk-full-force", _fsize, _disk_full, previous=True),
    CliCase("kill-after-first-tensor", _stopped("tensor:1"), _killed_then_rerun),
    CliCase("kill-mid-conversion", _stopped("tensor:70"), _killed_then_rerun),
    CliCase("kill-before-rename", _stopped("before-install"), _killed_then_rerun),
    CliCase("kill-force-before-rename", _stopped("before-install", "--force"), _killed_then_rerun, previous=True),
    CliCase("kill-force-after-exchange", _stopped("after-exchange", "--force"), _killed_after_exchange, previous=True),
    CliCase("kill-force-between-renames", _stopped("between-renames", "--force"), _killed_fallback_recovers,
            previous=True),
    CliCase("kill-polled-shard-bytes", _polled, _killed_then_rerun),
]


def _cli_job(case: CliCase, src_folder: Path, good: Path, root: Path) -> Callable[[], tuple[CliRun, Path, dict | None]]:
    def job() -> tuple[CliRun, Path, dict | None]:
        work = root / case.name
        work.mkdir()
        src = copy_tree(src_folder, work / "src")
        (work / "dst").mkdir()
        before = None
        if case.previous:
            copy_tree(good, work / "dst" / "out")
            before = tree_digest(work / "dst" / "out")
        return case.run(src, work, good if case.previous else None), work, before
    return job


@pytest.fixture(scope="module")
def cli_results(request, hf_folder, good_mono, tmp_path_factory) -> dict[str, Future]:
    root = tmp_path_factory.mktemp("reliability-convert-cli")
    cases = [c for c in selected_params(request) if isinstance(c, CliCase)]
    # Resolve the session fixtures here (they build models and are not thread-safe), then start
    # the processes: each costs seconds of interpreter + torch start-up.
    sources = {c.layout: hf_folder("mono", c.layout) for c in cases}
    return prefetch({c.name: _cli_job(c, sources[c.layout], good_mono, root) for c in cases})


@pytest.mark.parametrize("case", CLI_CASES, ids=str)
def test_cli_convert_failure(case: CliCase, cli_results):
    run, work, before = cli_results[case.name].result()
    case.check(run, work, before)
