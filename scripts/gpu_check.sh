#!/usr/bin/env bash
# Every GPU check of vitdeploy in one go, for a GPU machine lent for a few minutes
# (see shared/GPU.md). Each section has its own time budget; each writes its JSON under
# $OUT as soon as it ends, and $OUT/sections.json records every section's status, so a
# section that fails or times out loses nothing else. Runs from a plain checkout
# (PYTHONPATH=., nothing installed).
#
#   OUT=/some/dir bash scripts/gpu_check.sh          # on the GPU machine
#   GPU_CHECK_SMOKE=1 OUT=/tmp/x bash scripts/gpu_check.sh   # plumbing test on a CPU
#   GPU_CHECK_SECTIONS=bench,export_fp16 ...               # only these sections (env always runs)
#
# Data: .gpu/compact/ (copy of shared/data/compact) is unpacked to .gpu/data.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT" .gpu
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOG="$OUT/gpu_check.log"
DATA=.gpu/data
SMOKE=${GPU_CHECK_SMOKE:-0}

if [ "$SMOKE" = 1 ]; then  # the same sections with tiny work, on the CPU
  DEVICE=cpu; BENCH_ARGS=(--model vit_cifar_tiny --batch-size 8 --steps 2 --warmup-steps 1)
  RUN_ARGS=(--epochs 1 --subset 64 --val-size 40 --batch-size 16); PARITY_IMAGES=20
  SWEEP_ARGS=(--subset 300 --only recipe crop0)
  [ -d "$DATA" ] || DATA=${GPU_CHECK_DATA:?set GPU_CHECK_DATA to a folder with cifar-10-batches-py}
else
  DEVICE=cuda; BENCH_ARGS=(--model vit_b_16 --model vit_cifar_small --model vit_cifar_tiny --steps 20 --warmup-steps 5)
  RUN_ARGS=(--epochs 6); PARITY_IMAGES=2000; SWEEP_ARGS=()
fi

# section NAME BUDGET_SECONDS COMMAND...: run it under a timeout, log its output, record its status.
section() {
  local name=$1 budget=$2; shift 2
  case ",${GPU_CHECK_SECTIONS:-$name}," in *",$name,"*) ;; *) [ "$name" = env ] || return 0 ;; esac
  local start=$SECONDS
  echo "=== $name (budget ${budget}s): $*" >>"$LOG"
  timeout --kill-after=10 "$budget" "$@" >>"$LOG" 2>&1
  local rc=$?
  "$PY" - "$OUT/sections.json" "$name" "$rc" "$((SECONDS - start))" "$budget" "$*" <<'PYEOF'
import json, sys
path, name, rc, seconds, budget, command = sys.argv[1:]
try:
    record = json.load(open(path))
except (OSError, ValueError):
    record = {"sections": []}
rc = int(rc)
status = "ok" if rc == 0 else "timeout" if rc in (124, 137) else "failed"
record["sections"].append({"section": name, "status": status, "rc": rc, "seconds": int(seconds),
                           "budget_seconds": int(budget), "command": command})
json.dump(record, open(path, "w"), indent=2)
PYEOF
  echo "=== $name: rc=$rc after $((SECONDS - start))s" >>"$LOG"
}

section env 30 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || true; \
  $PY -m vitdeploy info --json > '$OUT/env.json'"

if [ ! -f "$DATA/cifar-10-batches-py/data_batch_5" ]; then
  section data 40 "$PY" .gpu/compact/unpack.py "$DATA"
fi

# Issue 2: GPU-marked tests, training throughput (real data vs synthetic), a short real run.
section gpu_tests 60 "$PY" -m pytest -q -m "gpu or trt" tests -p no:cacheprovider

section train_throughput 60 "$PY" -m vitdeploy bench-train "${BENCH_ARGS[@]}" --source both --data-dir "$DATA" \
  --device "$DEVICE" --json "$OUT/train_throughput.json"

# Issue 2's 2-epoch CPU recipe, in fp32 with candidate settings, many runs in parallel (chooses what to confirm on a CPU).
section recipe_sweep 100 env OMP_NUM_THREADS=1 "$PY" scripts/recipe_sweep.py --data-dir "$DATA" --device "$DEVICE" \
  --runs .gpu/runs/sweep --out-json "$OUT/recipe_sweep.json" "${SWEEP_ARGS[@]}"

section cifar_small_run 60 bash -c "rm -rf .gpu/runs/cifar_small; $PY -m vitdeploy train --model vit_cifar_small --device $DEVICE --data-dir '$DATA' \
  --out .gpu/runs/cifar_small ${RUN_ARGS[*]} && cp .gpu/runs/cifar_small/summary.json '$OUT/cifar_small_run.json'"

# Issue 3: export the run above with --fp16; parity of fp32/fp16 ONNX on ONNX Runtime CPU, and on CUDA
# (ONNX Runtime CUDA, TensorRT) where those are installed. The manifest is the result.
section export_fp16 60 bash -c "rm -rf .gpu/art/cifar_small; $PY -m vitdeploy export .gpu/runs/cifar_small --out .gpu/art/cifar_small --fp16 \
  --parity-images $PARITY_IMAGES --timing-cache .gpu/tensorrt-timing.cache; \
  rc=\$?; cp .gpu/art/cifar_small/manifest.json '$OUT/export_manifest.json' 2>/dev/null; exit \$rc"

echo "results in $OUT:"; ls -1 "$OUT"
