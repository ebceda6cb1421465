"""`mlx-music` command line: convert, convert-all, inspect, generate, parity, publish, doctor.

Heavy imports happen inside commands so `mlx-music --help` is instant and the runtime commands
work without the converter's extras (torch) installed.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import click


def _user_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [ValueError, FileNotFoundError]
    try:
        from converters.errors import ConvertError

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
            msg = " ".join(str(e).split()) or type(e).__name__
            click.echo(f"error: {msg}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option("0.1.0", prog_name="mlx-music")
def main() -> None:
    """Convert MusicGen checkpoints to MLX and generate music with them."""


# ---------------------------------------------------------------------------------------------
@main.command()
@click.option("--hf-path", required=True, help="Hub repo id (facebook/musicgen-small) or a local folder in hub layout.")
@click.option("--mlx-path", required=True, type=click.Path(), help="Output folder for the MLX checkpoint.")
@click.option("--variant", default=None, help="Manifest to use (e.g. musicgen-stereo-small); auto-detected from config.json if omitted.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True,
              help="Weight dtype; the manifest keeps T5, EnCodec, norms and biases in float32.")
@click.option("-q", "--quantize", is_flag=True, help="Quantize the decoder per the manifest's policy.")
@click.option("--q-bits", type=click.Choice(["4", "8"]), default="4", show_default=True, help="Bits per weight with -q.")
@click.option("--q-group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True, help="Group size with -q.")
@click.option("--q-recipe", default=None, help="Mixed-precision recipe from the manifest, e.g. mixed-4-8.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 5GB or 500MB.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) when --hf-path is a repo id.")
@click.option("--force", is_flag=True, help="Replace an existing --mlx-path (atomically, once the new one is complete).")
@click.option("--allow-nonfinite", is_flag=True, help="Convert even if weights hold NaN/Inf.")
@click.option("--workers", type=click.IntRange(1, 64), default=4, show_default=True, help="Reader threads.")
@click.option("--upload-repo", default=None, help="After converting, publish to this hub repo (org/name).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@friendly_errors
def convert(hf_path, mlx_path, variant, dtype, quantize, q_bits, q_group_size, q_recipe, max_shard_size,
            revision, force, allow_nonfinite, workers, upload_repo, quiet):
    """Convert a Hugging Face MusicGen checkpoint into an MLX checkpoint folder."""
    from converters.convert import QuantizeOptions, convert_checkpoint

    if q_recipe and not quantize:
        raise click.UsageError("--q-recipe needs -q/--quantize")
    qopts = QuantizeOptions(int(q_bits), int(q_group_size), q_recipe) if quantize else None
    res = convert_checkpoint(hf_path, mlx_path, variant=variant, dtype=dtype, quantize=qopts,
                             max_shard_size=max_shard_size, force=force, revision=revision,
                             allow_nonfinite=allow_nonfinite, workers=workers, progress=not quiet)
    click.echo(f"wrote {res.path}: variant {res.variant or 'custom'}, {res.num_tensors} tensors, "
               f"{res.num_parameters:,} parameters, {res.total_bytes / 1e6:.1f} MB")
    if res.quantized:
        click.echo(f"quantized {len(res.quantized)} modules; skipped {len(res.skipped)}")
        for s in res.skipped:
            click.echo(f"  skipped {s}")
    if upload_repo:
        from converters.publish import publish

        publish(res.path, upload_repo)
        click.echo(f"published to {upload_repo}")


@main.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@friendly_errors
def inspect(path, as_json):
    """Describe an HF or MLX checkpoint folder: format, variant, tensors, dtypes, manifest diff."""
    from converters.inspect import format_report, inspect_folder

    info = inspect_folder(path)
    click.echo(json.dumps(info, indent=2) if as_json else format_report(info))


if __name__ == "__main__":  # pragma: no cover
    main()
