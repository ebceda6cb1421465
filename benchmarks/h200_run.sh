#!/usr/bin/env bash
# The H200 measurements of benchmarks/RESULTS.md, in the phases the device calls ran them.
#   bash benchmarks/h200_run.sh setup    join the carried MLX CUDA wheel parts, pip install --target /root/pylib
#   bash benchmarks/h200_run.sh sweep    kernel check; MLX's CUDA-graph settings on small (picks the best
#                                        into /root/best_env); transformers + torch CUDA graph on small
#   bash benchmarks/h200_run.sh mlx      MLX fp32/bf16/q8 at batch 1/4/16, every config, with /root/best_env
#   bash benchmarks/h200_run.sh hf       transformers + torch CUDA graph for the configs in $HF_CONFIGS,
#                                        CUDA graph alone for $GRAPH_CONFIGS
#   bash benchmarks/h200_run.sh parity   GPU logits vs transformers fp32, full-size small
# Results: $OUT/<phase>.json (configs merged), logs on stdout.
set -u
export PYTHONPATH=/root/pylib:${PYTHONPATH:-}
OUTD=${OUT:-/tmp/bench-out}; mkdir -p "$OUTD" /tmp/res
STEPS=${STEPS:-150}
CONFIGS=${CONFIGS:-"small small-stereo medium large medium-stereo large-stereo"}
HF_CONFIGS=${HF_CONFIGS:-"large-stereo"}
GRAPH_CONFIGS=${GRAPH_CONFIGS:-"medium large medium-stereo small-stereo"}
ENVS=(""  "MLX_USE_CUDA_GRAPHS=0" "MLX_MAX_OPS_PER_BUFFER=1000,MLX_MAX_MB_PER_BUFFER=1000000" "MLX_MAX_OPS_PER_BUFFER=50")
merge() { python3 - "$1" <<'PY'
import glob, json, os, sys
out = {}
for f in sorted(glob.glob(f"/tmp/res/{sys.argv[1]}-*.json")):
    out[f.split("/")[-1][:-5]] = json.load(open(f))
json.dump(out, open(f"{os.environ.get('OUT', '/tmp/bench-out')}/{sys.argv[1]}.json", "w"), indent=1)
PY
}
args() { case $1 in *-stereo) echo "--size ${1%-stereo} --stereo";; *) echo "--size $1";; esac; }
bench() { python3 benchmarks/bench_generate.py --direct --steps "$STEPS" --batch 1,4,16 "$@" | grep "^\[bench\]\|^|"; }
case $1 in
setup)
  cat /root/part.aa .device/p2/part.ab > /root/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl
  pip install -q --no-deps --target /root/pylib /root/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl \
    .device/p2/*.whl 2>&1 | grep -v WARNING
  python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())";;
sweep)
  python3 benchmarks/gpu_check.py
  envargs=(); for e in "${ENVS[@]}"; do envargs+=(--mlx-env "$e"); done
  bench --size small --batch 1,16 --repeats 2 --hf-modes "" --graph-modes "" --modes fp32,bf16,q8 \
    "${envargs[@]}" --json /tmp/res/sweep-small.json --timeout 200
  merge sweep
  python3 - <<'PY'
import json, math
rs = json.load(open("/tmp/res/sweep-small.json"))["results"]
score = {}
for r in rs:
    score.setdefault(r["env"], []).append(math.log(r["steps_per_s"]))
gm = {e: math.exp(sum(v) / len(v)) for e, v in score.items()}
for e, g in gm.items():
    print(f"[sweep] env {e or '(default)'}: geometric mean {g:.1f} steps/s over {len(score[e])} cells")
best = max(gm, key=gm.get) if gm else ""
open("/root/best_env", "w").write(best)
print(f"[sweep] best: {best or '(default)'}")
PY
  bench --size small --hf-modes fp32,fp16 --graph-modes fp16 --modes "" --repeats 1 --json /tmp/res/hf-small.json \
    --timeout 240
  merge hf;;
mlx)
  env=$(cat /root/best_env 2>/dev/null || true)
  for c in $CONFIGS; do
    reps=${REPS:-2}
    bench $(args $c) --repeats $reps --hf-modes "" --graph-modes "" --modes fp32,bf16,q8 --mlx-env "$env" \
      --json /tmp/res/mlx-$c.json --timeout 200
    merge mlx
  done;;
hf)
  for c in $HF_CONFIGS; do
    bench $(args $c) --repeats 1 --hf-modes fp32,fp16 --graph-modes fp16 --modes "" --json /tmp/res/hf-$c.json --timeout 300
    merge hf
  done
  for c in $GRAPH_CONFIGS; do
    bench $(args $c) --repeats 2 --hf-modes "" --graph-modes fp16 --modes "" --json /tmp/res/graph-$c.json --timeout 200
    merge graph
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
