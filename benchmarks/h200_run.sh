#!/usr/bin/env bash
# The H200 measurements of benchmarks/RESULTS.md, in the phases the device calls ran them.
#   bash benchmarks/h200_run.sh hf        transformers fp32/fp16 + torch CUDA-graph fp16 (torch only)
#   bash benchmarks/h200_run.sh mlx       kernel check, MLX fp32/bf16/q8 (+ the code before: MLX_MUSIC_SRC)
#   bash benchmarks/h200_run.sh parity    GPU logits vs transformers fp32, full-size small
# Results: $OUT/<phase>.json (all configs merged), logs on stdout.
set -u
OUTD=${OUT:-/tmp/bench-out}; mkdir -p "$OUTD" /tmp/res
STEPS=${STEPS:-150}
CONFIGS=${CONFIGS:-"small small-stereo medium large medium-stereo large-stereo"}
merge() { python3 - "$1" <<'PY'
import json, glob, sys
out = {}
for f in sorted(glob.glob(f"/tmp/res/{sys.argv[1]}-*.json")):
    out[f.split("/")[-1][:-5]] = json.load(open(f))
json.dump(out, open(f"{__import__('os').environ.get('OUT', '/tmp/bench-out')}/{sys.argv[1]}.json", "w"), indent=1)
PY
}
args() { case $1 in *-stereo) echo "--size ${1%-stereo} --stereo";; *) echo "--size $1";; esac; }
case $1 in
hf)
  for c in $CONFIGS; do
    python3 benchmarks/bench_generate.py --direct $(args $c) --batch 1,4,16 --steps $STEPS --repeats 1 \
      --hf-modes fp32,fp16 --graph-modes fp16 --modes "" --json /tmp/res/hf-$c.json --timeout 240 | grep "^\[bench\]\|^|"
    merge hf
  done;;
mlx)
  python3 benchmarks/gpu_check.py
  c=small
  python3 benchmarks/bench_generate.py --direct --size small --batch 1,4,16 --steps $STEPS --repeats 1 --hf-modes "" \
    --graph-modes "" --modes fp32,bf16,q8 --mlx-env MLX_MUSIC_SRC=.device/base --json /tmp/res/mlx-before-small.json | grep "^\[bench\]"
  merge mlx
  for c in $CONFIGS; do
    python3 benchmarks/bench_generate.py --direct $(args $c) --batch 1,4,16 --steps $STEPS --repeats 1 --hf-modes "" \
      --graph-modes "" --modes fp32,bf16,q8 --json /tmp/res/mlx-$c.json --timeout 200 | grep "^\[bench\]\|^|"
    merge mlx
  done;;
parity)
  python3 - <<'PY'
import sys; sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
import bench_generate as b
src = b.build_hub_model("small", False, "cuda")
b.convert_mode(src, "small", False, "fp32", "fp32")
PY
  python3 -c "from mlx_music.cli import main; main()" parity --hf-path benchmarks/.cache/hf-small \
    --mlx-path benchmarks/.cache/mlx-small-fp32 --steps 12 | tee "$OUTD/parity.txt";;
esac
