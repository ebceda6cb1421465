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
#
# ---------------------------------------------------------------- round 3 (issue 25; prepared 2026-12-05,
# not yet run: no device was lent). Phases can be chained: `bash benchmarks/h200_run.sh A B C`.
#   bash benchmarks/h200_run.sh stage      call 1: copy the first MLX CUDA wheel part to /root (carry .device/p1)
#   bash benchmarks/h200_run.sh setup      as above (carry .device/p2)
#   bash benchmarks/h200_run.sh r3-check   gpu_check.py: every kernel against its fallback, the opt-in small-row
#                                          GEMV included (MLX_MUSIC_GEMV=1); marks it validated in $STATE/gemv_ok
#   bash benchmarks/h200_run.sh r3-prims   primitives per step (count_primitives.py), small and medium:
#                                          MLX_MUSIC_KERNELS=0 (plain MLX), default, MLX_MUSIC_GEMV=1 (if validated)
#   bash benchmarks/h200_run.sh r3-mlx     for each of $R3_CONFIGS (small medium large): the torch CUDA-graph loop
#                                          (fp16) and MLX fp32/bf16/q8 at batch 1/4/16, default environment and
#                                          MLX_MUSIC_GEMV=1 (if validated; float modes $GEMV_MODES), the reference
#                                          in the same call as the model's MLX runs
#   bash benchmarks/h200_run.sh r3-train   bench_train.py: LoRA training, mlx-music vs transformers + peft
#   bash benchmarks/h200_run.sh ac-setup   install the carried audiocraft wheels (carry .device/ac) into /root/acsite
#   bash benchmarks/h200_run.sh r3-magnet  bench_magnet.py: MAGNeT 10 s clip, mlx-music vs audiocraft, batch 1 and 8
# The lease (device time is short: ~30 min a session; calls back to back, the machine stays warm 30 s):
#   call 1 (carry .device/p1):  bash benchmarks/h200_run.sh stage
#   call 2 (carry .device/p2):  bash benchmarks/h200_run.sh setup r3-check r3-prims && R3_CONFIGS=small bash benchmarks/h200_run.sh r3-mlx
#   call 3:                     R3_CONFIGS=medium bash benchmarks/h200_run.sh r3-mlx
#   call 4:                     R3_CONFIGS=large bash benchmarks/h200_run.sh r3-mlx r3-train
#   call 5 (carry .device/ac):  bash benchmarks/h200_run.sh ac-setup r3-magnet
#   Estimates (round 2 ran 3 models' MLX modes per 10-min call): call 2 ~8 min, 3 ~4, 4 ~7, 5 ~6. Each call
#   under timeout_s=600. Short of device time: PRIM_SIZES=small, REPS=1, then drop call 5, then r3-train.
# Every phase prints its wall time; results go to $OUT/<phase>.json and $OUT/*.txt.
# CPU rehearsal of everything but the CUDA-only parts (tiny shapes, a few steps, minutes):
#   DRY=1 bash benchmarks/h200_run.sh r3-check r3-prims r3-mlx r3-train r3-magnet
#
# What the calls carry (prepare here, in the repo root; .device/ is git-ignored; 64 MiB a call):
#   .device/p1/part.aa, .device/p2/part.ab: the MLX CUDA wheel (mlx-cuda-13 0.32.4, 89.8 MB; its nvidia-*
#   cu13 dependencies are in the device image), split with `split -b 45M` (the tracked tree, ~9 MB, travels
#   too: 60M parts went over the limit), plus in .device/p2 mlx itself, soundfile and soxr:
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d /tmp/mlxcuda mlx==0.32.4 mlx-cuda-13==0.32.4 soundfile==0.14.0 soxr==1.1.0
#     (cd /tmp/mlxcuda && split -b 45M mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl part.)
#     mv /tmp/mlxcuda/part.aa .device/p1/; mv /tmp/mlxcuda/part.ab .device/p2/
#     cp /tmp/mlxcuda/mlx-0.32.4-*.whl /tmp/mlxcuda/soundfile-*.whl /tmp/mlxcuda/soxr-*.whl .device/p2/
#   Prepared in /work/main/.device on 2026-12-05 (p1 47 MB, p2 45 MB, ac 37 MB; the joined wheel's
#   sha256 94cb48fb...6732bee); setup checks it.
#   .device/ac: audiocraft 1.3.0 (an sdist on PyPI: built to a wheel here) and the pure-python packages its
#   MAGNeT path imports that the device image lacks (torch, torchaudio, transformers, einops, numba,
#   sentencepiece, torchmetrics, scikit-learn are there; xformers, spacy, demucs are tests/audiocraft_shims.py's):
#     pip wheel --no-deps -w .device/ac audiocraft==1.3.0 omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 \
#       julius==0.2.8 flashy==0.0.2 dora-search==0.1.13 colorlog==6.12.0 treetable==0.2.6 retrying==1.4.2 \
#       submitit==1.5.4 num2words==0.5.14 docopt==0.6.2 librosa==0.11.0 audioread==3.1.0 pooch==1.9.0 \
#       platformdirs==4.14.9 decorator==5.2.1
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .device/ac av==18.1.0
#   (the versions are /tmp/acvenv's, where bench_magnet.py's audiocraft side runs on CPU; soundfile and
#   soxr come with .device/p2). Checked here on 2026-12-05: 36 MB in all (av 34 MB); installed with
#   `pip install --no-deps --target` next to einops, numba, llvmlite, lazy-loader, joblib, msgpack,
#   torchmetrics and lightning-utilities (all in the device image), `from audiocraft.models import MAGNeT`
#   imports (with tests/audiocraft_shims.py).
set -u
export PYTHONPATH=/root/pylib:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
OUTD=${OUT:-/tmp/bench-out}; mkdir -p "$OUTD" /tmp/res
DRY=${DRY:-0}             # 1: CPU rehearsal of the round-3 phases (tiny shapes, no torch CUDA graph)
STATE=${STATE:-/root}     # what a phase leaves for the next call (the machine stays warm between calls)
[ "$DRY" = 1 ] && STATE=/tmp/r3-state
mkdir -p "$STATE"
STEPS=${STEPS:-$([ "$DRY" = 1 ] && echo 12 || echo 150)}
CONFIGS=${CONFIGS:-"small small-stereo medium large medium-stereo large-stereo"}
HF_CONFIGS=${HF_CONFIGS:-"large-stereo"}
GRAPH_CONFIGS=${GRAPH_CONFIGS:-"medium large medium-stereo small-stereo"}
R3_CONFIGS=${R3_CONFIGS:-$([ "$DRY" = 1 ] && echo tiny || echo "small medium large")}
PRIM_SIZES=${PRIM_SIZES:-$([ "$DRY" = 1 ] && echo tiny || echo "small medium")}
GEMV_MODES=${GEMV_MODES:-"fp32,bf16"}   # q8 decoders have no float linears
GRAPH=$([ "$DRY" = 1 ] && echo "" || echo fp16)   # the torch CUDA-graph loop needs CUDA
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
# The opt-in GEMV is timed only once r3-check validated it on this machine (a DRY run times it on the
# CPU, where it is the plain matmul, to exercise the commands).
gemv_ok() { [ "$DRY" = 1 ] || [ -f "$STATE/gemv_ok" ]; }
[ $# -gt 0 ] || { echo "usage: bash benchmarks/h200_run.sh PHASE [PHASE...] (see the header)"; exit 2; }
for phase in "$@"; do
t0=$(date +%s)
echo "[h200_run] phase $phase (DRY=$DRY) at $(date -u +%H:%M:%S)"
case $phase in
stage)
  cp .device/p1/part.aa /root/part.aa && ls -la /root/part.aa
  python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())";;
setup)
  cat /root/part.aa .device/p2/part.ab > /root/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl
  sha256sum /root/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl  # 94cb48fba73e5ee3... (PyPI's)
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
r3-check)
  set -o pipefail
  rm -f "$STATE/gemv_ok"
  python3 benchmarks/gpu_check.py | tee "$OUTD/gpu_check.txt"; rc=$?
  # the GEMV lines pass and the kernel really ran (not the fallback): mark it validated
  if grep -q "^gemv validated" "$OUTD/gpu_check.txt"; then touch "$STATE/gemv_ok"; fi
  echo "[h200_run] gpu_check exit $rc; small-row GEMV validated: $([ -f "$STATE/gemv_ok" ] && echo yes || echo no)"
  set +o pipefail;;
r3-prims)
  for sz in $PRIM_SIZES; do
    envs=("MLX_MUSIC_KERNELS=0" "")
    gemv_ok && envs+=("MLX_MUSIC_GEMV=1")
    for e in "${envs[@]}"; do
      tag=$(echo "${e:-default}" | tr '=,' '__')
      env $e python3 benchmarks/count_primitives.py --size "$sz" --modes fp32,bf16,q8 --batch 1,16 --kinds 6 \
        --json "/tmp/res/prims-$sz-$tag.json" | grep "^|" | tee -a "$OUTD/prims.txt"
    done
  done
  merge prims;;
r3-mlx)
  for c in $R3_CONFIGS; do
    # one call per model: the CUDA-graph loop first, then each MLX mode (both environments, alternated,
    # for the float modes, the only ones the GEMV changes)
    if gemv_ok; then
      bench $(args $c) --repeats "${REPS:-2}" --hf-modes "" --graph-modes "$GRAPH" --modes "$GEMV_MODES" \
        --mlx-env "" --mlx-env "MLX_MUSIC_GEMV=1" --json /tmp/res/r3-$c.json --timeout 240 | tee -a "$OUTD/r3-mlx.txt"
      bench $(args $c) --repeats "${REPS:-2}" --hf-modes "" --graph-modes "" --modes q8 \
        --json /tmp/res/r3-$c-q8.json --timeout 240 | tee -a "$OUTD/r3-mlx.txt"
    else
      bench $(args $c) --repeats "${REPS:-2}" --hf-modes "" --graph-modes "$GRAPH" --modes fp32,bf16,q8 \
        --json /tmp/res/r3-$c.json --timeout 240 | tee -a "$OUTD/r3-mlx.txt"
    fi
    merge r3
  done;;
r3-train)
  # The issue's target is bf16 on small and medium (torch on cuda when it sees one); fp32 small too.
  if [ "$DRY" = 1 ]; then runs=("tiny float32" "tiny bfloat16"); targs=(--steps 2 --warmup 1 --rounds 1)
  else runs=("small,medium bfloat16" "small float32"); targs=(--batch-size 4 --seconds 10 --steps 10 --warmup 3 --rounds 2); fi
  for run in "${runs[@]}"; do
    set -- $run
    python3 benchmarks/bench_train.py --sizes "$1" --dtype "$2" "${targs[@]}" --json "/tmp/res/train-$2.json" \
      | tee -a "$OUTD/train.txt"
  done
  merge train;;
ac-setup)
  pip install -q --no-index --no-deps --no-compile --target /root/acsite .device/ac/*.whl 2>&1 | grep -v WARNING
  PYTHONPATH=/root/acsite:$PYTHONPATH python3 -c "
import sys; sys.path.insert(0, 'tests')
from audiocraft_shims import install_shims; install_shims()
from audiocraft.models import MAGNeT; import audiocraft; print('audiocraft', audiocraft.__version__)";;
r3-magnet)
  # audiocraft runs from /root/acsite (ac-setup) in the device's python3; MLX from /root/pylib
  if [ "$DRY" = 1 ]; then margs=(--shapes tiny --batches 1 --decoding-steps 1,1,1,1 --repeats 1)
  else margs=(--shapes small --batches 1,8 --repeats 2 --musicgen --acvenv python3 --timeout 500)
       export PYTHONPATH=/root/acsite:$PYTHONPATH; fi
  python3 benchmarks/bench_magnet.py "${margs[@]}" --json /tmp/res/magnet-all.json | tee "$OUTD/magnet.txt"
  merge magnet;;
*)
  echo "unknown phase: $phase (see the header of benchmarks/h200_run.sh)"; exit 2;;
esac
echo "[h200_run] phase $phase took $(( $(date +%s) - t0 )) s"
done
