"""`mlx-music` command line: convert, convert-adapter, convert-all, inspect, generate, batch, parity, publish,
serve, cache, train, doctor.

Heavy imports happen inside commands so `mlx-music --help` is instant and the runtime commands
work without the converter's extras (torch) installed.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import click

from mlx_music._meta import EXTRA_OF, __version__, missing_extra


def _user_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [ValueError, FileNotFoundError]
    try:
        from mlx_music.converters.errors import ConvertError

        errs.append(ConvertError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errs)


def friendly_errors(fn):
    """User mistakes print one line on stderr and exit 2; MLX_MUSIC_DEBUG=1 shows tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except _user_errors() as e:
            if os.environ.get("MLX_MUSIC_DEBUG"):
                raise
            msg = " ".join(str(_as_flags(e)).split()) or type(e).__name__  # the API's parameters as flags
            click.echo(f"error: {msg}", err=True)
            sys.exit(2)
        except ModuleNotFoundError as e:
            # An optional dependency of a command (torch for `convert`, transformers for `parity`,
            # ...) is not installed: say which extra brings it, instead of a traceback.
            hint = missing_extra(e.name, getattr(e, "extra", None))
            if hint is None or os.environ.get("MLX_MUSIC_DEBUG"):
                raise
            click.echo(f"error: {click.get_current_context().info_name} {hint}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency is missing; `extra` is the pyproject extra that installs it."""

    def __init__(self, name: str, extra: str):
        super().__init__(f"No module named {name!r}", name=name)
        self.extra = extra


def _require(extra: str, *modules: str) -> None:
    """Raise MissingExtraError for the first of `modules` not installed (friendly_errors prints
    one line naming `extra`), before a command spends time loading anything."""
    import importlib.util

    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except ImportError:  # a finder that refuses the name (an import hook, a broken install)
            found = False
        if not found:
            raise MissingExtraError(name, extra)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlx-music")
def main() -> None:
    """Convert MusicGen checkpoints to MLX and generate music with them."""
    import warnings

    # Warnings (e.g. a prompt truncated to the text encoder's limit) as one line, no source echo.
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"


def _weight_options(fn, cached: bool = False):
    """--dtype and the quantization options, shared by convert and convert-all; with cached=True
    (generate, batch, serve) they choose the cached conversion of an unconverted --model."""
    from mlx_music.runtime.dtypes import DTYPE_NAMES

    for option in reversed((
        click.option("--dtype", type=click.Choice(DTYPE_NAMES), default=None if cached else DTYPE_NAMES[0],
                     show_default=not cached,
                     help=("An unconverted --model (hub repo or folder) is converted once into the cache "
                           "(`mlx-music cache list`) with these settings (default float32). " if cached else "")
                     + "Weight dtype; the manifest keeps T5, EnCodec, norms and biases in float32."),
        click.option("-q", "--quantize", is_flag=True, help="Quantize the decoder per the manifest's policy."),
        click.option("--q-bits", type=click.Choice(["4", "8"]), default="4", show_default=True,
                     help="Bits per weight with -q."),
        click.option("--q-group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True,
                     help="Group size with -q."),
        click.option("--q-recipe", default=None, help="Mixed-precision recipe from the manifest, e.g. mixed-4-8."),
    )):
        fn = option(fn)
    return fn


def _quantize_options(quantize, q_bits, q_group_size, q_recipe):
    """-q and its options → converters.convert.QuantizeOptions, or None without -q."""
    from mlx_music.converters.convert import QuantizeOptions

    if q_recipe and not quantize:
        raise click.UsageError("--q-recipe needs -q/--quantize")
    return QuantizeOptions(int(q_bits), int(q_group_size), q_recipe) if quantize else None


def _warn_quantized_on_cpu(quantization: dict | None) -> None:
    """One warning line where a quantized checkpoint meets a CPU: MLX has no fast quantized CPU
    kernels (benchmarks/RESULTS.md: musicgen-small q8 1.7 steps/s against 13.7 in float32)."""
    if not quantization or not quantization.get("modules"):
        return
    import mlx.core as mx

    if mx.default_device().type == mx.DeviceType.cpu:
        click.echo(f"warning: {quantization['bits']}-bit quantized weights are slow on a CPU (MLX has no fast "
                   "quantized CPU kernels: several times slower than float32); on a CPU use float32 "
                   "without -q", err=True)


def _model_folder(model: str, revision: str | None, dtype: str | None, quantize, quiet: bool,
                  warn: bool = True) -> str:
    """--model → a local MLX checkpoint folder: an unconverted hub repo or folder is converted once
    into the cache (converters/autoconvert.py), with a progress bar unless --quiet. warn: say here
    when the checkpoint is quantized and the device a CPU (generate says it once the model loaded)."""
    from mlx_music.converters.autoconvert import resolve_model

    try:
        folder = resolve_model(model, revision, dtype=dtype, quantize=quantize, progress=not quiet,
                               log=lambda line: click.echo(line, err=True))
    except ValueError as e:
        raise _as_flags(e) from None
    if warn:
        _warn_quantized_on_cpu(json.loads((folder / "config.json").read_text()).get("quantization"))
    return str(folder)


# ---------------------------------------------------------------------------------------------
@main.command()
@click.option("--hf-path", required=True, help="Hub repo id (facebook/musicgen-small) or a local folder in hub layout.")
@click.option("--mlx-path", required=True, type=click.Path(), help="Output folder for the MLX checkpoint.")
@click.option("--variant", default=None, help="Manifest to use (e.g. musicgen-stereo-small); auto-detected from config.json if omitted.")
@_weight_options
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 5GB or 500MB.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) when --hf-path is a repo id.")
@click.option("--force", is_flag=True, help="Replace an existing --mlx-path (atomically, once the new one is complete).")
@click.option("--allow-nonfinite", is_flag=True, help="Convert even if weights hold NaN/Inf.")
@click.option("--workers", type=click.IntRange(1, 64), default=4, show_default=True, help="Reader threads.")
@click.option("--upload-repo", default=None, help="After converting, publish to this hub repo (org/name).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--adapter", default=None, help="PEFT LoRA adapter (folder or hub repo id) to merge into the weights.")
@click.option("--format", "source_format", type=click.Choice(["audiocraft", "transformers"]), default=None,
              help="Source layout when a folder/repo holds both (default: transformers; audiocraft = "
                   "state_dict.bin + compression_state_dict.bin).")
@click.option("--text-encoder", default=None,
              help="audiocraft format: T5 folder or repo id, instead of the one xp.cfg names (resolved offline from the HF cache).")
@click.option("--codec", default=None,
              help="audiocraft format: transformers EnCodec folder or repo id, instead of compression_state_dict.bin.")
@friendly_errors
def convert(hf_path, mlx_path, variant, dtype, quantize, q_bits, q_group_size, q_recipe, max_shard_size,
            revision, force, allow_nonfinite, workers, upload_repo, quiet, adapter, source_format, text_encoder,
            codec):
    """Convert a Hugging Face MusicGen checkpoint into an MLX checkpoint folder."""
    from mlx_music.converters.convert import convert_checkpoint

    qopts = _quantize_options(quantize, q_bits, q_group_size, q_recipe)
    res = convert_checkpoint(hf_path, mlx_path, variant=variant, dtype=dtype, quantize=qopts,
                             max_shard_size=max_shard_size, force=force, revision=revision,
                             allow_nonfinite=allow_nonfinite, workers=workers, progress=not quiet,
                             adapter=adapter, format=source_format, text_encoder=text_encoder, codec=codec)
    click.echo(f"wrote {res.path}: variant {res.variant or 'custom'}, {res.num_tensors} tensors, "
               f"{res.num_parameters:,} parameters, {res.total_bytes / 1e6:.1f} MB")
    if res.quantized:
        _warn_quantized_on_cpu({"bits": qopts.bits, "modules": res.quantized})
        click.echo(f"quantized {len(res.quantized)} modules; skipped {len(res.skipped)}")
        for s in res.skipped:
            click.echo(f"  skipped {s}")
    if upload_repo:
        from mlx_music.converters.publish import publish

        publish(res.path, upload_repo)
        click.echo(f"published to {upload_repo}")


@main.command("convert-adapter")
@click.argument("adapter")
@click.option("--mlx-path", required=True, type=click.Path(), help="Output folder for the MLX adapter.")
@click.option("--base", default=None, type=click.Path(), help="Converted MLX checkpoint to check the adapter against now.")
@click.option("--revision", default=None, help="Hub revision when ADAPTER is a repo id.")
@click.option("--force", is_flag=True, help="Replace an existing --mlx-path.")
@friendly_errors
def convert_adapter_cmd(adapter, mlx_path, base, revision, force):
    """Convert a PEFT LoRA adapter (folder or hub repo id) into an MLX adapter for `generate --adapter`."""
    from mlx_music.converters.adapters import convert_adapter

    out = convert_adapter(adapter, mlx_path, force=force, revision=revision, base=base)
    n = len(json.loads((out / "adapter_config.json").read_text())["modules"])
    click.echo(f"wrote {out}: LoRA adapter, {n} modules")


@main.command("convert-all")
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Folder receiving one sub-folder per variant.")
@click.option("--variant", "variants", multiple=True, help="Variant(s) to convert (default: every manifest).")
@click.option("--hf-root", default=None, type=click.Path(), help="Local folder holding <variant>/ hub folders instead of the hub.")
@_weight_options
@click.option("--force", is_flag=True, help="Convert again even when a verified output exists.")
@click.option("--no-check-variant", is_flag=True, help="Auto-detect instead of enforcing each variant's manifest.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard.")
@click.option("--workers", type=click.IntRange(1, 64), default=4, show_default=True, help="Reader threads.")
@click.option("--json", "as_json", is_flag=True, help="Print the result rows as JSON.")
@friendly_errors
def convert_all_cmd(out_dir, variants, hf_root, dtype, quantize, q_bits, q_group_size, q_recipe, force,
                    no_check_variant, max_shard_size, workers, as_json):
    """Convert every manifest (or --variant list); complete, verified outputs are skipped (resumable)."""
    from dataclasses import asdict

    from mlx_music.converters.convert import QuantizeOptions
    from mlx_music.converters.convert_all import convert_all, format_summary

    qopts = QuantizeOptions(int(q_bits), int(q_group_size), q_recipe) if quantize else None
    rows = convert_all(out_dir, variants=list(variants) or None, hf_root=hf_root, dtype=dtype, quantize=qopts,
                       force=force, check_variant=not no_check_variant, max_shard_size=max_shard_size,
                       workers=workers, progress=False,
                       on_row=None if as_json else (lambda r: click.echo(f"{r.variant}: {r.status} {r.message or ''}")))
    if as_json:
        click.echo(json.dumps([{k: str(v) if k == "path" else v for k, v in asdict(r).items()} for r in rows], indent=2))
    else:
        click.echo(format_summary(rows))
    sys.exit(1 if any(r.status == "failed" for r in rows) else 0)


@main.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@friendly_errors
def inspect(path, as_json):
    """Describe an HF or MLX checkpoint folder: format, variant, tensors, dtypes, manifest diff."""
    from mlx_music.converters.inspect import format_report, inspect_folder

    info = inspect_folder(path)
    click.echo(json.dumps(info, indent=2) if as_json else format_report(info))


# ---------------------------------------------------------------------------------------------
def _output_paths(out: str, n: int) -> list[str]:
    """One file per prompt: song.wav, or song-0.wav, song-1.wav, ... for several prompts."""
    from pathlib import Path

    from mlx_music.runtime.audio_io import SUPPORTED_OUTPUT_EXTENSIONS, _check_output_path

    p = Path(out)
    _check_output_path(p, SUPPORTED_OUTPUT_EXTENSIONS)  # fail before spending minutes generating
    if n == 1:
        return [str(p)]
    return [str(p.with_name(f"{p.stem}-{i}{p.suffix}")) for i in range(n)]


# API parameter -> the `generate` flag that sets it: the runtime names its parameters, the CLI
# names its flags (only ones the user set: a default of None is never at fault).
_FLAGS = {"duration": "--duration", "temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p",
          "guidance_scale": "--guidance", "greedy": "--greedy", "extend_stride": "--extend-stride",
          "melody": "--melody", "audio_prompt": "--continue-from", "seed": "--seed",
          "chunk_seconds": "--chunk-seconds", "prompts": "--prompt", "adapter": "--adapter",
          "dtype": "--dtype", "quantize": "-q", "decoding_steps": "--decoding-steps",
          "span_arrangement": "--span-arrangement", "max_cfg_coef": "--max-cfg-coef", "min_cfg_coef": "--min-cfg-coef",
          # convert / convert-adapter / convert-all / publish: the converter's parameters
          "hf_path": "--hf-path", "mlx_path": "--mlx-path", "variant": "--variant", "max_shard_size": "--max-shard-size",
          "force": "--force", "revision": "--revision", "allow_nonfinite": "--allow-nonfinite", "format": "--format",
          "text_encoder": "--text-encoder", "codec": "--codec", "quantize.bits": "--q-bits",
          "quantize.group_size": "--q-group-size", "quantize.recipe": "--q-recipe", "base": "--base",
          "verify": "--verify", "token": "--token", "base_model": "--base-model",
          # parity: run_parity / run_audiocraft_parity / fidelity_report
          "ac_path": "--hf-path", "reference_path": "--reference-mlx-path", "steps": "--steps"}


def _settings_record(pipe, sampling: dict, magnet: dict):
    """The resolved settings a written file records: MAGNeT's own for MAGNeT checkpoints."""
    if getattr(pipe, "is_magnet", False):
        from mlx_music.runtime.magnet_generation import MagnetSampling

        return MagnetSampling.from_defaults(pipe.defaults, pipe.num_codebooks, **sampling, **magnet)
    from mlx_music.runtime.sampling import SamplingConfig

    return SamplingConfig.from_defaults(pipe.defaults, **sampling)


def _as_flags(e: ValueError) -> ValueError:
    """The API's "parameter value: problem (use other)" → "--flag value: problem (use --other)",
    and its hints "pass force=True" / "text_encoder=PATH" / "format='audiocraft'" → "pass --force" /
    "--text-encoder PATH" / "--format audiocraft": the leading name, a "use X" hint and name=value
    forms of known parameters, never words inside paths or values."""
    import re

    msg = str(e)

    def flag_form(m: re.Match) -> str:
        name, value = m.group(1), m.group(2)
        if name not in _FLAGS:
            return m.group(0)
        return _FLAGS[name] if value == "True" else f"{_FLAGS[name]} {value.strip(chr(39))}"

    out = re.sub(r"(?<![\w/.=-])([a-z_][a-z_.]*[a-z])=(True|'[^'\s]*'|[A-Z][A-Z_]*\b)", flag_form, msg)
    name = out.split(" ", 1)[0].rstrip(":")
    if name in _FLAGS:
        out = _FLAGS[name] + out[len(name):]
        # "(use a and b ...)": its first word, and every snake_case parameter after it (plain words
        # such as "variant" in "(use a musicgen-melody variant)" stay words).
        out = re.sub(r"\(use (\w+)([^)]*)", lambda m: "(use " + _FLAGS.get(m.group(1), m.group(1)) + re.sub(
            r"(?<![\w/.-])[a-z]+(?:_[a-z]+)+(?![\w/.-])", lambda w: _FLAGS.get(w.group(0), w.group(0)),
            m.group(2)), out)
    return e if out == msg else ValueError(out)


@main.command()
@click.option("--model", "model_path", required=True, help="MLX checkpoint folder or hub repo id (org/name).")
@click.option("--prompt", "prompts", multiple=True, required=True, help="Text description; repeat for a batch.")
@click.option("--duration", type=float, default=10.0, show_default=True,
              help="Seconds of audio (with --continue-from: total length including the prompt).")
@click.option("--out", required=True, help="Output file (.wav, .flac, .ogg); several prompts add -0, -1, ...")
@click.option("--seed", type=int, default=None,
              help="Seed in [0, 4294967295] (prompt i uses seed + i, mod 2**32); same seed, same audio. Without it: "
                   "a random one, printed and recorded in each file's comment tag.")
@click.option("--guidance", type=float, default=None, help="Classifier-free guidance scale (default from the checkpoint: 3.0).")
@click.option("--temperature", type=float, default=None, help="Sampling temperature (default 1.0).")
@click.option("--top-k", type=int, default=None, help="Sample from the k most likely tokens (default 250; 0 disables).")
@click.option("--top-p", type=float, default=None, help="Nucleus sampling mass in (0, 1] (default off).")
@click.option("--greedy", is_flag=True, default=None, help="Deterministic argmax decoding instead of sampling.")
@click.option("--melody", default=None, type=click.Path(), help="Melody audio file for melody models (any rate, mono or stereo).")
@click.option("--continue-from", "continue_from", default=None, type=click.Path(), help="Audio file to continue.")
@click.option("--extend-stride", type=float, default=None,
              help="Seconds each new window advances past one window (default: the model family's, as audiocraft: "
                   "MusicGen 18 s of its 30 s window, AudioGen 2 s of 10 s).")
@click.option("--stream", is_flag=True, help="Write the WAV progressively while generating; prints time to first audio.")
@click.option("--chunk-seconds", type=float, default=1.0, show_default=True, help="Chunk size with --stream.")
@click.option("--revision", default=None, help="Hub revision when --model is a repo id.")
@click.option("--verify", is_flag=True, help="Check every weight file's sha256 against the conversion record.")
@click.option("--no-compile", is_flag=True, help="Do not compile the decoder step (debugging).")
@click.option("-v", "--verbose", is_flag=True, help="Print steps/s and the active BLAS.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--adapter", default=None, help="MLX LoRA adapter (from `mlx-music convert-adapter`) applied to --model.")
@click.option("--decoding-steps", default=None,
              help="MAGNeT: decoding passes per codebook, comma-separated (default 20,10,10,10).")
@click.option("--span-arrangement", type=click.Choice(["nonoverlap", "stride1"]), default=None,
              help="MAGNeT: fixed spans (nonoverlap, the default; trims to whole spans) or overlapping (stride1).")
@click.option("--max-cfg-coef", type=float, default=None, help="MAGNeT: guidance at each codebook's first pass (default 10).")
@click.option("--min-cfg-coef", type=float, default=None, help="MAGNeT: guidance at each codebook's last pass (default 1).")
@functools.partial(_weight_options, cached=True)
@friendly_errors
def generate(model_path, prompts, duration, out, seed, guidance, temperature, top_k, top_p, greedy, melody,
             continue_from, extend_stride, stream, chunk_seconds, revision, verify, no_compile, verbose, quiet,
             adapter, dtype, quantize, q_bits, q_group_size, q_recipe, decoding_steps=None, span_arrangement=None,
             max_cfg_coef=None, min_cfg_coef=None):
    """Generate music from text (and a melody or an audio prompt) with an MLX checkpoint."""
    import dataclasses
    import math
    import time

    from mlx_music.runtime import load, save_audio
    from mlx_music.runtime.audio_io import generation_tags
    from mlx_music.runtime.sampling import check_seed, derive_seed, random_seed

    if not math.isfinite(duration) or duration <= 0:
        raise ValueError(f"--duration {duration}: must be a positive number of seconds")
    if decoding_steps is not None:
        try:
            decoding_steps = [int(x) for x in decoding_steps.split(",")]
        except ValueError:
            raise ValueError(f"--decoding-steps {decoding_steps}: expected integers separated by commas") from None
    magnet = dict(decoding_steps=decoding_steps, span_arrangement=span_arrangement, max_cfg_coef=max_cfg_coef,
                  min_cfg_coef=min_cfg_coef)
    seed = check_seed(seed, "--seed")  # before the model loads
    # without --seed: a random one, printed and recorded in the files, so a result can be redone
    given_seed, seed = seed is not None, random_seed() if seed is None else seed
    paths = _output_paths(out, len(prompts))
    if stream and len(prompts) > 1:
        raise click.UsageError("--stream writes one file: give a single --prompt")
    if stream and not paths[0].lower().endswith(".wav"):
        raise ValueError(f"--out {paths[0]}: --stream writes WAV files (.wav)")
    for opt, path in (("--melody", melody), ("--continue-from", continue_from)):
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"{opt} {path}: file not found")
    t0 = time.perf_counter()
    try:
        folder = _model_folder(model_path, revision, dtype, _quantize_options(quantize, q_bits, q_group_size, q_recipe),
                               quiet, warn=False)
        pipe = load(folder, verify=verify, adapter=adapter)
        _warn_quantized_on_cpu(pipe.config.get("quantization"))
    except ValueError as e:
        if str(e).startswith("adapter"):
            raise _as_flags(e) from None
        raise
    if verbose:
        from mlx_music.blas import blas_info

        click.echo(f"loaded {model_path} in {time.perf_counter() - t0:.1f} s; BLAS: {blas_info()['blas']}", err=True)
    pipe.compile_step = not no_compile
    sampling = dict(guidance_scale=guidance, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    kwargs = dict(seed=seed, **sampling, melody=melody, audio_prompt=continue_from, extend_stride=extend_stride,
                  **magnet)
    try:
        if stream:
            chunks = pipe.stream(list(prompts), duration, chunk_seconds=chunk_seconds, **kwargs)
        else:
            result = pipe.generate(list(prompts), duration, progress=not quiet, **kwargs)
    except ValueError as e:
        raise _as_flags(e) from None
    if not given_seed:
        click.echo(f"seed {seed} (pass --seed {seed} for the same audio again)", err=True)
    # What each file records in its metadata (a comment tag): enough to make it again.
    made = {"duration": duration, "model": model_path,
            "settings": dataclasses.asdict(_settings_record(pipe, sampling, magnet)),
            **{k: v for k, v in (("melody", melody), ("audio_prompt", continue_from), ("extend_stride", extend_stride),
                                 ("adapter", adapter)) if v is not None}}

    def tags(i: int) -> dict:
        return generation_tags({"seed": derive_seed(seed, i), "prompt": prompts[i], **made})

    if stream:
        from mlx_music.runtime.audio_io import ProgressiveWavWriter

        writer = ProgressiveWavWriter(paths[0], pipe.sample_rate, pipe.audio_channels, tags=tags(0))
        try:
            for chunk in chunks:
                writer.write(chunk.audio[0])
                st = chunk.stats
                if chunk.start == 0:
                    click.echo(f"time to first audio: {st.first_audio_seconds:.2f} s "
                               f"({st.first_audio_steps} steps)", err=True)
        finally:
            writer.close()
        click.echo(f"wrote {paths[0]} ({writer.frames / pipe.sample_rate:.2f} s, {pipe.audio_channels} ch, "
                   f"{pipe.sample_rate} Hz, seed {seed})")  # the line the non-streamed path prints
        return
    if verbose and getattr(pipe, "is_magnet", False):  # passes over the whole clip, not one frame each
        st, seconds = result.stats, max(a.shape[-1] for a in result.audio) / result.sample_rate
        click.echo(f"{st.steps} decoding passes in {st.seconds:.2f} s ({seconds / st.seconds:.2f}x real time)", err=True)
    elif verbose:
        st = result.stats
        click.echo(f"{st.steps} steps in {st.seconds:.2f} s: {st.steps_per_s:.1f} steps/s "
                   f"({st.steps_per_s / pipe.frame_rate:.2f}x real time)", err=True)
    for i, (path, a) in enumerate(zip(paths, result.audio)):
        save_audio(path, a, result.sample_rate, tags=tags(i))
        click.echo(f"wrote {path} ({a.shape[-1] / result.sample_rate:.2f} s, {a.shape[0]} ch, {result.sample_rate} Hz, "
                   f"seed {result.seeds[i]})")


@main.command()
@click.option("--hf-path", default=None, help="Reference Hugging Face folder or repo id (needs the convert + dev extras).")
@click.option("--mlx-path", required=True, help="MLX checkpoint to check.")
@click.option("--reference-mlx-path", default=None,
              help="Compare a quantized checkpoint against this reference instead (an fp32 MLX checkpoint, or a "
                   "transformers folder / repo id): per-codebook top-1 agreement and KL.")
@click.option("--continue-from", "continue_from", default=None, type=click.Path(exists=True),
              help="Audio prompt: adds greedy continuation rows.")
@click.option("--sequences", type=click.IntRange(1, 64), default=4, show_default=True, help="Fidelity: code sequences per prompt.")
@click.option("--length", type=click.IntRange(8, 1500), default=50, show_default=True, help="Fidelity: frames per sequence.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the fixed inputs.")
@click.option("--dequantize", is_flag=True, help="Fidelity: run quantized layers as float matmuls (fast on CPU; same numbers up to round-off).")
@click.option("--max-kl", type=float, default=None, help="Fidelity: fail above this mean KL.")
@click.option("--melody", default=None, type=click.Path(exists=True), help="Melody file for melody rows (default: a test signal).")
@click.option("--steps", type=click.IntRange(2, 500), default=12, show_default=True, help="Greedy tokens to compare.")
@click.option("--min-top1", type=float, default=None, help="With --reference-mlx-path: fail below this top-1 agreement.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--adapter", default=None,
              help="PEFT LoRA adapter: the reference is transformers + peft merge_and_unload(); --mlx-path is its "
                   "merged conversion, or the base (the adapter is then applied at run time).")
@friendly_errors
def parity(hf_path, mlx_path, reference_mlx_path, continue_from, sequences, length, seed, dequantize, max_kl,
           melody, steps, min_top1, as_json, adapter):
    """Check an MLX checkpoint against transformers (or a quantized one against fp32). Exit 1 on failure."""
    from mlx_music.runtime.sampling import check_seed

    check_seed(seed, "--seed", "the seed of parity's fixed inputs; default 0")  # the one seed range
    if reference_mlx_path and adapter:
        raise click.UsageError("--adapter compares against transformers + peft: use it with --hf-path, "
                               "not --reference-mlx-path")
    if reference_mlx_path:
        from mlx_music.eval.fidelity import fidelity_report

        rep = fidelity_report(mlx_path, reference_mlx_path, num_sequences=sequences, length=length, seed=seed,
                              dequantize=dequantize)
        ok = rep.passes(min_top1 if min_top1 is not None else 0.0, max_kl=max_kl)
        click.echo(rep.to_json() if as_json else rep.format_table())
        sys.exit(0 if ok else 1)
    if not hf_path:
        raise click.UsageError("give --hf-path (transformers reference) or --reference-mlx-path")
    _require("parity", "torch", "transformers", *(["peft"] if adapter else []))  # before any model loads
    from mlx_music.eval.audiocraft_parity import is_audiocraft_source, run_audiocraft_parity

    if is_audiocraft_source(hf_path) and not adapter:  # an audiocraft-format folder: audiocraft is the reference
        rep = run_audiocraft_parity(hf_path, mlx_path, steps=steps, melody=melody, seed=seed)
        click.echo(rep.to_json() if as_json else rep.format_table())
        sys.exit(0 if rep.ok else 1)
    from mlx_music.eval.parity import run_parity

    rep = run_parity(hf_path, mlx_path, steps=steps, melody=melody, audio_prompt=continue_from, seed=seed,
                     adapter=adapter)
    click.echo(rep.to_json() if as_json else rep.format_table())
    sys.exit(0 if rep.ok else 1)


@main.command()
@click.argument("folder", type=click.Path())
@click.option("--repo", "--repo-id", "repo", required=True, help="Hub repo id to upload to (org/name).")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--dry-run", is_flag=True, help="List exactly what would be uploaded; upload nothing.")
@click.option("--revision", default=None, help="Branch to upload to.")
@click.option("--message", default=None, help="Commit message.")
@click.option("--token", default=None, help="Hub token (default: HF_TOKEN or the token saved by `hf auth login`).")
@click.option("--base-model", default=None,
              help="Adapter folder: Hub id of the model it was trained on, when train's --model was a local folder.")
@friendly_errors
def publish(folder, repo, private, dry_run, revision, message, token, base_model):
    """Upload a converted MLX checkpoint folder, or a `train` adapter folder (MLX + PEFT adapter and
    model card), to the Hugging Face hub in one commit."""
    from mlx_music.converters.publish import publish as do_publish

    files = do_publish(folder, repo, private=private, dry_run=dry_run, revision=revision, commit_message=message,
                       token=token, log=click.echo, base_model=base_model)  # lists each file with its size
    if dry_run:
        click.echo(f"dry run: would upload {len(files)} files to {repo}; nothing uploaded")
    else:
        click.echo(f"uploaded {len(files)} files to https://huggingface.co/{repo}")


@main.command()
@click.argument("data", type=click.Path())
@click.option("--model", "model_path", required=True, help="MLX checkpoint folder or hub repo id (float, q8 or q4).")
@click.option("--out", required=True, type=click.Path(), help="Output folder: MLX adapter + peft/ + metrics.")
@click.option("--steps", type=int, default=2000, show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True, help="Pieces per micro-batch (all ranks).")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--rank", type=int, default=16, show_default=True, help="LoRA rank.")
@click.option("--alpha", type=float, default=16.0, show_default=True, help="LoRA alpha (scale = alpha / rank).")
@click.option("--lora-dropout", type=float, default=0.0, show_default=True)
@click.option("--rslora", is_flag=True, help="scale = alpha / sqrt(rank).")
@click.option("--targets", default="q_proj,k_proj,v_proj,out_proj,fc1,fc2", show_default=True,
              help="Comma-separated modules (also lm_heads, embed_tokens, enc_to_dec_proj, audio_enc_to_dec_proj).")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Peak learning rate (AdamW).")
@click.option("--warmup", type=int, default=0, show_default=True, help="Linear warmup steps before the cosine.")
@click.option("--weight-decay", type=float, default=0.01, show_default=True)
@click.option("--clip", type=float, default=1.0, show_default=True, help="Max gradient norm (0: off).")
@click.option("--segment", type=float, default=30.0, show_default=True, help="Seconds per training piece.")
@click.option("--min-seconds", type=float, default=1.0, show_default=True,
              help="Shorter trailing pieces are dropped; shorter files are an error.")
@click.option("--val-fraction", type=float, default=0.05, show_default=True)
@click.option("--val-every", type=int, default=100, show_default=True)
@click.option("--save-every", type=int, default=100, show_default=True)
@click.option("--text-dropout", type=float, default=0.3, show_default=True,
              help="Probability a sample is trained unconditioned (keeps CFG working).")
@click.option("--caption-from-filename", is_flag=True, help="Files without a caption use their file name.")
@click.option("--sample-prompt", default=None, help="Write OUT/samples/step-N.wav of this prompt at each validation.")
@click.option("--sample-seconds", type=float, default=5.0, show_default=True)
@click.option("--grad-checkpoint", is_flag=True, help="Recompute activations in the backward pass (less memory).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@friendly_errors
def train(data, model_path, out, steps, batch_size, grad_accum, rank, alpha, lora_dropout, rslora, targets, lr, warmup,
          weight_decay, clip, segment, min_seconds, val_fraction, val_every, save_every, text_dropout,
          caption_from_filename, sample_prompt, sample_seconds, grad_checkpoint, resume, seed, quiet):
    """LoRA / QLoRA fine-tuning on an audiofolder (audio + metadata.jsonl/csv with captions)."""
    from mlx_music.train.run import TrainingStopped, TrainOptions, train as run_train

    opts = TrainOptions(data=data, model=model_path, out=out, steps=steps, batch_size=batch_size,
                        grad_accum=grad_accum, rank=rank, alpha=alpha, lora_dropout=lora_dropout, rslora=rslora,
                        targets=tuple(t.strip() for t in targets.split(",") if t.strip()), lr=lr, warmup=warmup,
                        weight_decay=weight_decay, clip=clip, segment=segment, min_seconds=min_seconds,
                        val_fraction=val_fraction, val_every=val_every, save_every=save_every,
                        text_dropout=text_dropout, caption_from_filename=caption_from_filename,
                        sample_prompt=sample_prompt, sample_seconds=sample_seconds,
                        grad_checkpoint=grad_checkpoint, resume=resume,
                        seed=seed, progress=not quiet)
    try:
        folder = run_train(opts)
    except TrainingStopped as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    click.echo(f"wrote {folder}: MLX adapter (generate --adapter {folder}) and PEFT adapter ({folder}/peft)")


@main.command()
@click.argument("prompts", type=click.Path(), required=False)
@click.option("--model", "model_path", default=None, help="MLX checkpoint folder or hub repo id (org/name). Required.")
@click.option("--out-dir", default=None, type=click.Path(),
              help="Folder for the audio files and results.jsonl (created). Required.")
@click.option("--status", "status_dir", default=None, type=click.Path(),
              help="Only report on the job in this folder: ok / failed / missing rows; exit 0 when every row "
                   "is ok, 1 when rows failed, 3 when rows are missing (rerun the job).")
@click.option("--batch-size", type=click.IntRange(1, 1024), default=4, show_default=True,
              help="Rows generated together (rows are sorted by duration first).")
@click.option("--format", "fmt", type=click.Choice(["wav", "flac"]), default="wav", show_default=True,
              help="Audio file format (16-bit PCM).")
@click.option("--strict", is_flag=True, help="Check every row first; stop (exit 2) if any row is bad.")
@click.option("--revision", default=None, help="Hub revision when --model is a repo id.")
@click.option("--verify", is_flag=True, help="Check every weight file's sha256 against the conversion record.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@functools.partial(_weight_options, cached=True)
@friendly_errors
def batch(prompts, model_path, out_dir, batch_size, fmt, strict, revision, verify, quiet, dtype, quantize, q_bits,
          q_group_size, q_recipe, status_dir):
    """Generate one audio file per row of a JSONL or CSV prompts file into --out-dir, with a
    results.jsonl manifest. Resumable: a rerun redoes only rows not finished. Under `mlx.launch`
    the rows are split over the ranks. Exit 1 (from rank 0) if a row failed. `mlx.launch` does
    not forward the ranks' exit codes: check with `mlx-music batch --status DIR` after it."""
    from mlx_music.runtime.batch_job import batch_status, run_batch

    if status_dir is not None:
        try:
            st = batch_status(status_dir)
        except ValueError as e:  # the API's out_dir is this command's --status: one line, exit 2
            msg = str(e)
            raise ValueError("--status" + msg[len("out_dir"):] if msg.startswith("out_dir ") else msg) from None
        click.echo(f"{st.rows} rows: {len(st.ok)} ok, {len(st.failed)} failed, {len(st.missing)} missing")
        for i in st.failed:
            click.echo(f"failed: {i}: {st.reasons[i]}")
        for i in st.missing:
            click.echo(f"missing: {i}")
        sys.exit(st.exit_code)
    for value, what in ((prompts, "PROMPTS (the prompts file)"), (model_path, "--model"), (out_dir, "--out-dir")):
        if value is None:
            raise click.UsageError(f"missing {what} (or pass --status DIR to check a job)")

    model_path = _model_folder(model_path, revision, dtype, _quantize_options(quantize, q_bits, q_group_size, q_recipe),
                               quiet)
    s = run_batch(prompts, model_path, out_dir, batch_size=batch_size, fmt=fmt, strict=strict,
                  progress=not quiet, verify=verify, log=click.echo)
    rate = f"{s.audio_seconds / s.seconds:.2f} s of audio/s" if s.seconds else "-"
    where = f"rank {s.rank}/{s.size}: " if s.size > 1 else ""
    click.echo(f"{where}generated {s.generated} rows, {s.audio_seconds:.1f} s of audio in {s.seconds:.1f} s ({rate})",
               err=s.rank > 0)
    if s.rank == 0:
        for line in s.failures[:20]:
            click.echo(f"failed: {line}", err=True)
        if len(s.failures) > 20:
            click.echo(f"... and {len(s.failures) - 20} more failed rows (see {s.manifest})", err=True)
    # the codes of --status; mlx.launch stops every rank when one exits non-zero
    sys.exit(0 if s.rank > 0 else 3 if s.missing else 1 if s.failed else 0)


def _model_specs(specs: tuple[str, ...]) -> dict[str, str]:
    """``--model`` values (``PATH``, ``REPO`` or ``ID=PATH``) → {id: source}; the id defaults to
    the last path component."""
    out: dict[str, str] = {}
    for spec in specs:
        mid, sep, src = spec.partition("=")
        if not sep:
            mid, src = os.path.basename(os.path.normpath(spec)), spec
        if mid in out:
            raise click.BadParameter(f"{spec}: model id {mid!r} is given twice; name one with ID=PATH",
                                     param_hint="--model")
        out[mid] = src
    return out


@main.command()
@click.option("--model", "models", multiple=True, required=True,
              help="MLX checkpoint folder or hub repo id; repeat for several. ID=PATH names it (default id: the folder name).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Another than loopback (e.g. 0.0.0.0) prints a warning: anyone who can reach "
                   "it can use the server (see --api-key).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port.")
@click.option("--max-batch", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Most requests of one model decoded as one batch.")
@click.option("--batch-wait-ms", type=click.FloatRange(0, 10000), default=50.0, show_default=True,
              help="How long the first waiting request waits for others to join its batch.")
@click.option("--max-queue", type=click.IntRange(1, 100000), default=64, show_default=True,
              help="Waiting requests before the server answers 503 (with Retry-After).")
@click.option("--max-duration", type=click.FloatRange(0, 3600, min_open=True), default=30.0, show_default=True,
              help="Longest request in seconds; longer ones are refused, not clipped.")
@click.option("--max-upload-mb", type=click.FloatRange(0, 64, min_open=True), default=16.0, show_default=True,
              help="Largest request body (melody / audio prompt uploads); at most 64, so that uploads stay in "
                   "memory and the server's private folder, never in the system temp folder.")
@click.option("--chunk-seconds", type=click.FloatRange(0.02, 30), default=0.5, show_default=True,
              help="Audio per streamed chunk.")
@click.option("--keep-clips", type=click.IntRange(1, 10000), default=32, show_default=True,
              help="Finished clips of the page kept in memory for download.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True, help="uvicorn log level.")
@click.option("--api-key", envvar="MLX_MUSIC_API_KEY", default=None,
              help="Require this key on every request but the page (Authorization: Bearer KEY, X-API-Key: KEY, "
                   "or the page's cookie). Also read from $MLX_MUSIC_API_KEY.")
@click.option("--allow-origin", "allow_origins", multiple=True,
              help="A web origin (scheme://host:port) whose pages may call this server; repeat for several, "
                   "'*' for any. By default a request from another origin's page is refused (403).")
@functools.partial(_weight_options, cached=True)
@friendly_errors
def serve(models, host, port, max_batch, batch_wait_ms, max_queue, max_duration, max_upload_mb, chunk_seconds,
          keep_clips, log_level, dtype, quantize, q_bits, q_group_size, q_recipe, api_key, allow_origins):
    """Serve a web page and an HTTP API (OpenAPI schema at /openapi.json) that generate with these models."""
    try:
        from mlx_music.server import ServerConfig, serve as run_server
    except ImportError as e:  # one line naming the extra, exit 2 (as every missing extra)
        raise MissingExtraError(e.name if e.name in EXTRA_OF else "fastapi", "serve") from None
    cfg = ServerConfig(max_batch=max_batch, batch_wait_ms=batch_wait_ms, max_queue=max_queue,
                       max_duration=max_duration, max_upload_bytes=int(max_upload_mb * 1024 * 1024),
                       chunk_seconds=chunk_seconds, keep_clips=keep_clips, api_key=api_key or None,
                       allow_origins=tuple(allow_origins))
    qopts = _quantize_options(quantize, q_bits, q_group_size, q_recipe)
    # The server takes MLX checkpoint folders: unconverted sources are converted (once) here.
    specs = {mid: _model_folder(src, None, dtype, qopts, False) for mid, src in _model_specs(models).items()}
    click.echo(f"loading {', '.join(specs)}; then serving on http://{host}:{port}/ "
               "(API schema at /openapi.json)", err=True)
    run_server(specs, host=host, port=port, config=cfg, log_level=log_level)


@main.group()
def cache():
    """Conversions of unconverted --model sources, kept for the next run (in $MLX_MUSIC_CACHE,
    default: mlx-music/ beside the Hugging Face hub cache)."""


@cache.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@friendly_errors
def cache_list(as_json):
    """Show each cached conversion: source, revision, settings, size."""
    from mlx_music.converters.autoconvert import cache_dir, list_cache

    entries = list_cache()
    if as_json:
        click.echo(json.dumps([{**e.__dict__, "path": str(e.path)} for e in entries], indent=2))
        return
    click.echo(f"cache: {cache_dir()}")
    for e in entries:
        click.echo(f"{e.bytes / 1e6:9.1f} MB  {e.source}  revision {e.revision[:12]}  {e.settings}  ({e.name})")
    click.echo(f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}, "
               f"{sum(e.bytes for e in entries) / 1e6:.1f} MB")


@cache.command("remove")
@click.argument("names", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Remove every entry.")
@friendly_errors
def cache_remove(names, everything):
    """Delete cached conversions, by entry name or by source (a hub repo id or folder: all its
    settings); --all empties the cache."""
    from mlx_music.converters.autoconvert import remove_cache

    if not names and not everything:
        raise click.UsageError("name the entries (or sources) to remove, or pass --all")
    try:
        removed = remove_cache(list(names), everything=everything)
    except ValueError as e:
        raise ValueError(str(e).replace("names ", "", 1)) from None
    for e in removed:
        click.echo(f"removed {e.name} ({e.bytes / 1e6:.1f} MB)")
    click.echo(f"freed {sum(e.bytes for e in removed) / 1e6:.1f} MB")


@main.command()
def doctor():
    """Show versions, the MLX device and which BLAS MLX's CPU kernels use."""
    import platform

    from mlx_music.blas import blas_info, preload_fast_blas

    # The same preload a generation does, before MLX is imported here, so the line below reports
    # what `generate` would really use (idempotent: `import mlx_music` normally did it already,
    # and then its first, true reason stands).
    preload_fast_blas()
    import mlx.core as mx

    info = blas_info()
    click.echo(f"python   {platform.python_version()} ({platform.platform()})")
    click.echo(f"mlx      {mx.__version__}; default device {mx.default_device()}")
    click.echo(f"blas     {info['blas']}" + (f"  (fast path skipped: {info['reason']})" if info.get("reason") else ""))
    for mod in ("torch", "transformers", "sentencepiece"):
        try:
            m = __import__(mod)
            click.echo(f"{mod:<8} {getattr(m, '__version__', '?')} (converter/parity extras)")
        except ImportError:
            click.echo(f"{mod:<8} not installed (only needed by convert/parity)")


if __name__ == "__main__":  # pragma: no cover
    main()
