"""Regenerate tests/data/tiny-musicgen-stereo: a random-init stereo MusicGen in hub layout
(well under 5 MB) so the README's commands run offline on a fresh machine.

    python tests/make_embedded_checkpoint.py
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import tiny_models  # noqa: E402

OUT = Path(__file__).parent / "data" / "tiny-musicgen-stereo"


def main() -> None:
    model = tiny_models.build_model("stereo", seed=7, hidden_size=24, ffn_dim=96, num_attention_heads=2,
                                    max_position_embeddings=1600)
    model = model.half()  # stored as float16 (as some hub files are); the converter upcasts
    shutil.rmtree(OUT, ignore_errors=True)
    tiny_models.write_hub_folder(model, OUT, layout="single")
    readme = OUT / "README.md"
    readme.write_text("---\nlicense: mit\ntags:\n- musicgen\n---\n# tiny-musicgen-stereo\n\n"
                      "Random weights (made by tests/make_embedded_checkpoint.py): it makes noise, not music. "
                      "It exists so the toolkit can be tried offline.\n")
    size = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"{OUT}: {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
