"""README.md model card for a converted MLX checkpoint (Hub metadata + usage + provenance).

`render_model_card(config, record)` takes the folder's config.json (notes/SPEC.md) and the
conversion record (conversion.json, possibly before its "files" entry exists). The YAML front
matter is huggingface_hub's ModelCardData, with only keys the Hub understands (library_name, tags,
base_model, base_model_relation, license, pipeline_tag), so the repo shows up under the MLX library
filter and links to its source.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from mlx_music._meta import pip_hint

# Used in the usage snippet when the target repo is not known yet at conversion time;
# converters/publish.py replaces it with the real repo id when uploading.
REPO_PLACEHOLDER = "YOUR_HF_USER/REPO_NAME"

_EXAMPLE_PROMPT = "80s pop track with bassy drums and synth"


def _source(record: dict[str, Any]) -> dict[str, Any]:
    src = record.get("source")
    return src if isinstance(src, dict) else {}


def _base_model(record: dict[str, Any]) -> str | None:
    return record.get("base_model") or _source(record).get("repo_id") or None


def _quant_summary(q: dict[str, Any] | None) -> str | None:
    if not q:
        return None
    parts = []
    if q.get("bits") is not None:
        parts.append(f"{q['bits']}-bit")
    if q.get("group_size") is not None:
        parts.append(f"group size {q['group_size']}")
    if q.get("recipe"):
        parts.append(f"recipe `{q['recipe']}`")
    n_q, n_s = len(q.get("quantized") or ()), len(q.get("skipped") or ())
    if n_q or n_s:
        parts.append(f"{n_q} tensors quantized, {n_s} kept in full precision")
    return ", ".join(parts) or "quantized"


def _human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # unreachable


def render_model_card(config: dict[str, Any], record: dict[str, Any], *, repo_id: str | None = None) -> str:
    """Return README.md text for an MLX MusicGen checkpoint.

    `config`: the checkpoint's config.json. `record`: the conversion record; used keys are
    base_model / source.{repo_id,revision,files,layout}, license, converter, dtype, created,
    quantization, files (optional: name -> {sha256, size}). `repo_id`: where the checkpoint will be
    published (defaults to record["repo_id"], else a placeholder that publish() fills in).
    """
    repo = repo_id or record.get("repo_id") or REPO_PLACEHOLDER
    base = _base_model(record)
    stereo = int(config.get("audio_channels") or 1) == 2
    melody = config.get("model_type") == "musicgen_melody" or bool(config.get("melody"))
    quant = config.get("quantization") or record.get("quantization")
    variant = config.get("variant") or record.get("variant") or (base.split("/")[-1] if base else "musicgen")
    dtype = record.get("dtype") or config.get("dtype") or "float32"

    tags = ["mlx", "musicgen", "text-to-audio"]
    if stereo:
        tags.append("stereo")
    if melody:
        tags.append("melody")
    if quant:
        tags.append("quantized")
        if isinstance(quant.get("bits"), int):  # mixed-precision recipes get no single N-bit tag
            tags.append(f"{quant['bits']}-bit")

    data = ModelCardData(
        library_name="mlx", license=record.get("license") or None, base_model=base or None,
        # the Hub's standard way to flag quantizations
        base_model_relation="quantized" if base and quant else None,
        pipeline_tag="text-to-audio", tags=tags)

    title = f"# {variant} (MLX)"
    src_link = f"[{base}](https://huggingface.co/{base})" if base else "a local MusicGen checkpoint"
    kind = "stereo " if stereo else ""
    intro = (f"This is {src_link} converted to [MLX](https://github.com/ml-explore/mlx) for "
             f"**mlx-music**, a small MusicGen runtime that needs neither PyTorch nor transformers. "
             f"It is a {kind}text-to-music model"
             f"{' that can also follow a reference melody' if melody else ''} generating "
             f"{config.get('sample_rate', 32000)} Hz audio.")

    prompt = _EXAMPLE_PROMPT
    usage = [
        "## Usage", "", "```bash", pip_hint(),
        f'mlx-music generate --model {repo} --prompt "{prompt}" --out x.wav', "```", "",
        "```python", "from mlx_music import load", "", f'model = load("{repo}")',
        f'result = model.generate(["{prompt}"], duration=10)  # result.audio[0]: [channels, samples]', "```",
    ]

    dec, te = config.get("decoder") or {}, config.get("text_encoder") or {}
    details = ["## Model", "", "| | |", "|---|---|",
               f"| Architecture | {config.get('model_type', 'musicgen')} |",
               f"| Audio | {config.get('sample_rate', 32000)} Hz, {'stereo' if stereo else 'mono'}, "
               f"{config.get('num_codebooks', '?')} codebooks at {config.get('frame_rate', 50)} Hz |"]
    if dec:
        details.append(f"| Decoder | {dec.get('num_layers', '?')} layers, hidden {dec.get('hidden_size', '?')}, "
                       f"{dec.get('num_heads', '?')} heads |")
    if te:
        details.append(f"| Text encoder | T5, {te.get('num_layers', '?')} layers, d_model {te.get('d_model', '?')} |")
    details.append(f"| Weights dtype | {dtype} |")
    qs = _quant_summary(quant)
    details.append(f"| Quantization | {qs or 'none'} |")

    src = _source(record)
    prov = ["## Provenance", "", "| | |", "|---|---|",
            f"| Source repo | {src_link} |",
            f"| Source revision | {('`' + src['revision'] + '`') if src.get('revision') else 'unknown'} |"]
    if src.get("layout"):
        prov.append(f"| Source layout | {src['layout']} |")
    if record.get("converter"):
        prov.append(f"| Converter | {record['converter']} |")
    if record.get("created"):
        prov.append(f"| Converted | {record['created']} |")
    prov.append(f"| dtype | {dtype} |")
    if record.get("license"):
        prov.append(f"| License | {record['license']} (inherited from the source model) |")
    src_files = src.get("files")
    if src_files:
        names = list(src_files) if isinstance(src_files, (list, tuple, dict)) else [str(src_files)]
        prov += ["", "Source files: " + ", ".join(f"`{n}`" for n in names) + "."]
    files = record.get("files")
    if isinstance(files, dict) and files:
        prov += ["", "| File | Size | sha256 |", "|---|---|---|"]
        for name, meta in sorted(files.items()):
            prov.append(f"| `{name}` | {_human_size(int(meta.get('size', 0)))} | "
                        f"`{str(meta.get('sha256', ''))[:16]}…` |")
    prov += ["", "`conversion.json` in this repo records the sha256 and size of every file."]

    body = [title, "", intro, "", *usage, "", *details, "", *prov]
    if record.get("license"):
        body += ["", "## License", "",
                 f"The weights keep the license of the original model: `{record['license']}`."]
    return str(ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(body) + "\n"))


# -- LoRA adapters (the output folder of `mlx-music train`) ---------------------------------------

# Where the adapter and its base will live is unknown when training writes the card;
# converters/publish.py replaces these with the repo id and the base model's Hub id.
ADAPTER_PLACEHOLDER = "THIS_FOLDER"
BASE_PLACEHOLDER = "BASE"


def _target_name(module: str) -> str:
    """decoder.layers.0.self_attn.q_proj -> q_proj; decoder.lm_heads.2 -> lm_heads."""
    parts = module.split(".")
    return parts[-2] if parts[-1].isdigit() else parts[-1]


def adapter_card_data(base_model: str | None) -> ModelCardData:
    """Hub metadata of an adapter repo: library mlx (the repo's top is the MLX adapter; the PEFT
    copy is in peft/), its base model, relation "adapter"."""
    return ModelCardData(library_name="mlx", base_model=base_model or None,
                         base_model_relation="adapter" if base_model else None, pipeline_tag="text-to-audio",
                         tags=["mlx", "mlx-music", "musicgen", "lora", "peft"])


def render_adapter_card(*, base_model: str | None, info: dict[str, Any], modules: list[str], rank: int,
                        alpha: float) -> str:
    """README.md text for a LoRA adapter trained by `mlx-music train`: base model, data size
    (training / held-out / dropped pieces, seconds of audio), steps, last train and validation loss,
    LoRA settings, and usage with ADAPTER_PLACEHOLDER / BASE_PLACEHOLDER for the adapter's and the
    base's locations. `info`: adapter_config.json's "training" object (train_pieces, train_seconds,
    val_pieces, dropped_pieces, step, loss, val_loss); `modules`: MLX module paths adapted."""
    base = base_model or "unknown"
    front = ["---", adapter_card_data(base_model).to_yaml(), "---"]
    body = [f"# LoRA adapter for {base}", "", "Trained with `mlx-music train` (LoRA on MLX).", "",
            "| | |", "|---|---|", f"| base model | {base} |",
            f"| data | {info.get('train_pieces')} training pieces ({info.get('train_seconds')} s of audio), "
            f"{info.get('val_pieces')} held out, {info.get('dropped_pieces')} short pieces dropped |",
            f"| steps | {info.get('step')} |", f"| train loss (last step) | {info.get('loss')} |",
            f"| validation loss (last) | {info.get('val_loss')} |",
            f"| LoRA | rank {rank}, alpha {alpha:g}, {', '.join(sorted({_target_name(m) for m in modules}))} |", "",
            f"MLX: `mlx-music generate --model {BASE_PLACEHOLDER} --adapter {ADAPTER_PLACEHOLDER} "
            "--prompt \"...\"`.", "",
            "transformers + peft: `PeftModel.from_pretrained(MusicgenForConditionalGeneration.from_pretrained("
            f"{BASE_PLACEHOLDER}), \"{ADAPTER_PLACEHOLDER}/peft\")`.", ""]
    return "\n".join(front + [""] + body)
