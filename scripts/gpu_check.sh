#!/usr/bin/env bash
# Every GPU check of vitdeploy in one go, for a GPU machine lent for a few minutes
# (see shared/GPU.md). Each section has its own time budget; $OUT/sections.json records
# every section's status, and the files a section writes are packed into
# $OUT/results.tar as soon as it ends (the device tool brings back at most 8 files), so
# a section that fails or times out loses nothing else. Runs from a plain checkout
# (PYTHONPATH=., nothing installed).
#
#   OUT=/some/dir bash scripts/gpu_check.sh                  # on the GPU machine
#   GPU_CHECK_SECTIONS=bench_small,bench_vit_b_16 ...        # only these sections (env always runs)
#   GPU_CHECK_SMOKE=1 GPU_CHECK_DATA=DIR GPU_CHECK_WORK=TMP OUT=/tmp/x bash scripts/gpu_check.sh
#                                                            # plumbing test on a CPU, tiny work
#   GPU_CHECK_LIST=1 bash scripts/gpu_check.sh               # "SECTION BUDGET_SECONDS" per section, runs nothing
#                                                            # (scripts/gpu_plan.py adds them up into the lease plan)
# Data: .gpu/compact/ (copy of shared/data/compact) is unpacked to .gpu/data.
#
# Budgets: each section's is written beside it with its arithmetic, from the 2026-11-27 H200 run
# (docs/results/2026-11-27-h200*, "measured") or, where nothing ran on a GPU yet, from the smoke run on
# 2 CPU cores (docs/results/2026-12-01-gpu-plan.md, "smoke"); a section stops at its budget (timeout)
# and what it wrote so far is kept.
set -u
cd "$(dirname "$0")/.."
LIST=${GPU_CHECK_LIST:-0}
OUT=${OUT:-$PWD/gpu-results}
W=${GPU_CHECK_WORK:-.gpu}   # runs, artifacts and results staged here
RES=$W/results
[ "$LIST" = 1 ] || mkdir -p "$OUT" "$RES"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOG="$OUT/gpu_check.log"
DATA=.gpu/data
SMOKE=${GPU_CHECK_SMOKE:-0}

if [ "$SMOKE" = 1 ]; then  # the same sections with tiny work, on the CPU
  DEVICE=cpu; TP_ARGS=(--model vit_cifar_tiny --batch-size 8 --steps 2 --warmup-steps 1); TPC_ARGS=("${TP_ARGS[@]}")
  RUN_ARGS=(--epochs 1 --subset 64 --val-size 40 --batch-size 16); PARITY_IMAGES=20
  SWEEP_ARGS=(--subset 300 --only recipe crop4)
  BENCH_ARGS=(--limit 20 --batch-sizes 1,4 --min-iters 2 --max-seconds 0.5)
  B16_MODEL=vit_cifar_tiny; B16_TRAIN=(--subset 64 --val-size 40 --batch-size 16); B16_BENCH=("${BENCH_ARGS[@]}")
  FOLDER_ARGS=(--train-per-class 3 --test-per-class 1 --side 48); FOLDER_TP=("${TP_ARGS[@]}" --store-size 36)
  [ -d "$DATA" ] || DATA=${GPU_CHECK_DATA:?set GPU_CHECK_DATA to a folder with cifar-10-batches-py}
else
  DEVICE=cuda; TP_ARGS=(--model vit_b_16 --model vit_cifar_small --model vit_cifar_tiny --steps 20 --warmup-steps 5)
  TPC_ARGS=(--model vit_b_16 --steps 30 --warmup-steps 5 --compile)
  RUN_ARGS=(--epochs 6); PARITY_IMAGES=2000; SWEEP_ARGS=()
  BENCH_ARGS=(--batch-sizes 1,8,32,128,256 --max-seconds 2)
  B16_MODEL=vit_b_16; B16_TRAIN=(--subset 2560 --val-size 256 --batch-size 64); B16_BENCH=(--backend pytorch --limit 1000 --batch-sizes 1,8,32,128 --max-seconds 2)
  FOLDER_ARGS=(--train-per-class 200 --test-per-class 1 --side 256); FOLDER_TP=(--model vit_b_16 --steps 20 --warmup-steps 5)
fi

# section NAME BUDGET_SECONDS COMMAND...: run it under a timeout, log its output, record its status, pack results.
section() {
  local name=$1 budget=$2; shift 2
  if [ "$LIST" = 1 ]; then echo "$name $budget"; return 0; fi
  case ",${GPU_CHECK_SECTIONS:-$name}," in *",$name,"*) ;; *) [ "$name" = env ] || return 0 ;; esac
  local start=$SECONDS
  echo "=== $name (budget ${budget}s, $(date -u +%H:%M:%S)): $*" >>"$LOG"
  timeout --kill-after=10 "$budget" "$@" >>"$LOG" 2>&1
  local rc=$?
  "$PY" - "$OUT/sections.json" "$name" "$rc" "$((SECONDS - start))" "$budget" "$*" <<'PYEOF'
import fcntl, json, sys
path, name, rc, seconds, budget, command = sys.argv[1:]
with open(path + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # sections may finish concurrently
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
  tar -cf "$OUT/.results.tar.$name" -C "$RES" . && mv -f "$OUT/.results.tar.$name" "$OUT/results.tar"
  echo "=== $name: rc=$rc after $((SECONDS - start))s" >>"$LOG"
  return "$rc"
}

# skipped NAME REASON: record a selected section that was not run, and why.
skipped() {
  [ "$LIST" = 1 ] && return 0
  case ",${GPU_CHECK_SECTIONS:-$1}," in *",$1,"*) ;; *) return 0 ;; esac
  echo "=== $1: skipped: $2" >>"$LOG"
  "$PY" - "$OUT/sections.json" "$1" "$2" <<'PYEOF'
import json, sys
path, name, reason = sys.argv[1:]
try:
    record = json.load(open(path))
except (OSError, ValueError):
    record = {"sections": []}
record["sections"].append({"section": name, "status": "skipped", "reason": reason})
json.dump(record, open(path, "w"), indent=2)
PYEOF
}

# measured 4-6 s
section env 15 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || true; \
  $PY -m vitdeploy info --json > '$RES/env.json'"

if [ "$LIST" = 1 ] || { [ ! -f "$DATA/cifar-10-batches-py/test_batch" ] && [ -f .gpu/compact/unpack.py ]; }; then
  section data 40 "$PY" .gpu/compact/unpack.py "$DATA"  # measured 7-8 s
fi

# Issue 2: GPU-marked tests; training throughput (real data vs synthetic).
# measured 17 s for 5 tests; 9 now (CUDA graphs, augmentation on the GPU): about 2 x 17 = 34 s
section gpu_tests 60 "$PY" -m pytest -q -m "gpu or trt" tests -p no:cacheprovider

# measured 16-17 s
section train_throughput 60 "$PY" -m vitdeploy bench-train "${TP_ARGS[@]}" --source both --data-dir "$DATA" \
  --device "$DEVICE" --json "$RES/train_throughput.json"

# Issue 23: an image folder of 2,000 JPEGs at 256 px (writing them: about 10 s), decoded once to the 256 px cache
# (about 3 s on 8 workers), then vit_b_16 bf16 training throughput with the images held on the GPU vs streamed from
# the memory-mapped cache vs synthetic: smoke-run only so far (2 CPU cores); about 15 s per bench-train: 45 s, 75
section folder_stream 75 bash -c "rm -rf $W/folder \
  && $PY scripts/image_folder.py $W/folder --data '$DATA' ${FOLDER_ARGS[*]} \
  && $PY -m vitdeploy bench-train ${FOLDER_TP[*]} --source both --data-dir $W/folder --data-placement memory \
     --device $DEVICE --json '$RES/folder_memory.json' \
  && $PY -m vitdeploy bench-train ${FOLDER_TP[*]} --source real --data-dir $W/folder --data-placement stream \
     --device $DEVICE --json '$RES/folder_stream.json'"

# Issue 2's 2-epoch CPU recipe in fp32 with candidate settings, many runs at once on the GPU (chooses what to
# confirm on a CPU). In the background: the short run and export below need little GPU.
section recipe_sweep 140 env OMP_NUM_THREADS=1 "$PY" scripts/recipe_sweep.py --data-dir "$DATA" --device "$DEVICE" \
  --runs "$W/runs/sweep" --out-json "$RES/recipe_sweep.json" "${SWEEP_ARGS[@]}" &
SWEEP=$!

# measured 49 s alone (run1; 100 s ran out in run2 with recipe_sweep sharing the GPU): 49 s x 1.5
section cifar_small_run 75 bash -c "rm -rf $W/runs/cifar_small; $PY -m vitdeploy train --model vit_cifar_small \
  --device $DEVICE --data-dir '$DATA' --out $W/runs/cifar_small ${RUN_ARGS[*]} \
  && cp $W/runs/cifar_small/summary.json '$RES/cifar_small_run.json'"

# Issue 3: export the run above with --fp16; parity of fp32/fp16 ONNX on ONNX Runtime CPU, and on CUDA
# (ONNX Runtime CUDA, TensorRT) where those are installed. The manifest is the result.
# measured 33 s (44 s with the sweep beside it) with 2,000 parity images
section export_fp16 90 bash -c "rm -rf $W/art/cifar_small; $PY -m vitdeploy export $W/runs/cifar_small \
  --out $W/art/cifar_small --fp16 --parity-images $PARITY_IMAGES --timing-cache $W/tensorrt-timing.cache; \
  rc=\$?; cp $W/art/cifar_small/manifest.json '$RES/export_manifest.json' 2>/dev/null; exit \$rc"
wait "$SWEEP"

# Issue 4: every backend usable here on the small model (accuracy and parity on the full test set, then
# latency/throughput per batch size, end-to-end and device modes). measured 84 s
section bench_small 120 "$PY" -m vitdeploy bench "$W/art/cifar_small" --backend all --out "$RES/bench_small" \
  "${BENCH_ARGS[@]}"

# Issue 2: vit_b_16 bf16 training throughput with torch.compile (eager is measured above). measured 56 s
section train_throughput_compiled 120 "$PY" -m vitdeploy bench-train "${TPC_ARGS[@]}" --source both \
  --data-dir "$DATA" --device "$DEVICE" --json "$RES/train_throughput_compiled.json"

# Issue 4: vit_b_16 at 224 px (a few training steps from scratch: latency does not depend on the weights;
# parity is on those weights), exported in fp32, then pytorch fp32/fp16/bf16 (and ort-cuda/trt where
# installed: add them to --backend); ort-cpu at batch 128 alone would take this section's budget.
# measured: training 40 steps and the export took about 60 s, pytorch's 24 timed configurations about 50 s
# (the rest of the 181 s went to ort-cpu, no longer benched here)
section bench_vit_b_16 180 bash -c "rm -rf $W/runs/b16 $W/art/b16 \
  && $PY -m vitdeploy train --model $B16_MODEL --no-pretrained --device $DEVICE --data-dir '$DATA' --out $W/runs/b16 \
     --epochs 1 ${B16_TRAIN[*]} \
  && $PY -m vitdeploy export $W/runs/b16 --out $W/art/b16 --parity-images 64 --no-trt \
  && $PY -m vitdeploy bench $W/art/b16 --out '$RES/bench_vit_b_16' ${B16_BENCH[*]}"

# Issue 6: data-parallel throughput when the machine has several GPUs (it usually has one: then the JSON says so).
ddp_check() {
  local n
  n=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
  if [ "$n" -lt 2 ]; then
    printf '{"gpus": %s, "ddp": "not measured: data-parallel training needs 2 or more GPUs"}\n' "$n" > "$RES/ddp.json"
    return 0
  fi
  rm -rf "$W/runs/ddp"
  "$PY" -m torch.distributed.run --standalone --nproc-per-node "$n" -m vitdeploy train --model vit_b_16 --no-pretrained \
    --device "$DEVICE" --data-dir "$DATA" --out "$W/runs/ddp" --epochs 1 --max-steps 40 --batch-size $((128 * n)) \
    && cp "$W/runs/ddp/summary.json" "$RES/ddp.json"
}
export -f ddp_check
export PY RES W DATA DEVICE
# one GPU: a few seconds; 2+ GPUs: 40 steps of vit_b_16 (about 3 s at 2,128 images/s) plus start-up (~30 s)
section ddp 120 bash -c ddp_check

# Issue 13: the long recipe from scratch on vit_cifar_small in bf16 with torch.compile, sized to LONG_SECONDS of
# training by the rate bench-train measures first (same batch, precision and compile). Every epoch logs its test
# accuracy and times as it goes, and metrics.jsonl is kept even when the budget cuts the run: the curve survives.
if [ "$SMOKE" = 1 ]; then
  LONG_MODEL=vit_cifar_tiny; LONG_RATE=(--batch-size 16 --steps 2 --warmup-steps 1); LONG_TRAIN=(--subset 64 --val-size 40 \
    --batch-size 16 --test-size 40); LONG_SECONDS=1; LONG_TRAIN_LIMIT=150; LONG_BUDGET=240
else
  LONG_MODEL=vit_cifar_small; LONG_RATE=(--batch-size 512 --steps 40 --warmup-steps 5 --precision bf16 --compile)
  LONG_TRAIN=(--precision bf16 --compile); LONG_SECONDS=${GPU_CHECK_LONG_SECONDS:-300}
  LONG_TRAIN_LIMIT=$((LONG_SECONDS + 150)); LONG_BUDGET=$((LONG_TRAIN_LIMIT + 90))  # compile and evaluation; the rate probe
fi
long_run() {
  local epochs rc
  rm -rf "$W/runs/cifar_long"
  "$PY" -m vitdeploy bench-train --model "$LONG_MODEL" --recipe long "${LONG_RATE[@]}" --source real --data-dir "$DATA" \
    --device "$DEVICE" --json "$RES/cifar_long_rate.json" || return 1
  epochs=$("$PY" scripts/long_epochs.py "$RES/cifar_long_rate.json" --seconds "$LONG_SECONDS" --data-dir "$DATA" \
    "${LONG_TRAIN[@]}") || return 1
  echo "long recipe: $epochs epochs for ${LONG_SECONDS}s of training"
  # SIGTERM at the limit: training stops at a step boundary and saves a checkpoint; the files are copied either way.
  timeout "$LONG_TRAIN_LIMIT" "$PY" -m vitdeploy train --model "$LONG_MODEL" --recipe long --epochs "$epochs" \
    --test-each-epoch --device "$DEVICE" --data-dir "$DATA" --out "$W/runs/cifar_long" "${LONG_TRAIN[@]}"
  rc=$?
  for name in metrics.jsonl config.json summary.json; do
    cp "$W/runs/cifar_long/$name" "$RES/cifar_long_$name" 2>/dev/null
  done
  return $rc
}
export -f long_run
export LONG_MODEL LONG_SECONDS LONG_TRAIN_LIMIT
export LONG_RATE_S="${LONG_RATE[*]}" LONG_TRAIN_S="${LONG_TRAIN[*]}"
section cifar_long "$LONG_BUDGET" bash -c 'LONG_RATE=($LONG_RATE_S); LONG_TRAIN=($LONG_TRAIN_S); long_run'

# Issues 11 and 18: ONNX Runtime CUDA, from the onnxruntime-gpu wheel carried in parts (the last of back-to-back
# runs: scripts/gpu_plan.py prints them). Headline first, and every bench rewrites its report after each
# measurement: ort-cuda fp16 and fp32 on vit_b_16 at batch 1, 8, 32, end-to-end and device (ort_b16); the fp16
# policy comparison (ort_policy); CUDA graphs (ort_graphs); CUDA parity of the trained small model (ort_small).
# A probe decides: without a working CUDA session every ORT section is recorded as skipped with its reason.
# Parity on ONNX Runtime CPU inside these sections uses few images: the CUDA parity is the point here.
ORT_PARTS=${GPU_CHECK_ORT_PARTS:-.gpu/ort}
ORT_SITE=${GPU_CHECK_ORT_SITE:-$W/ort-site}  # the wheel is installed inside the work folder
if [ "$SMOKE" = 1 ]; then
  ORT_BACKEND=ort-cpu; GRAPH=(); B16_ORT=vit_cifar_tiny; ORT_SIZES=1,4; POLICY_SIZES=4; SMALL_SIZES=1,4
  ORT_LIMIT=20; SMALL_LIMIT=20; ORT_TIME=(--min-iters 2 --max-seconds 0.3)
else
  ORT_BACKEND=ort-cuda; GRAPH=(--cuda-graph); B16_ORT=vit_b_16; ORT_SIZES=1,8,32; POLICY_SIZES=8,32; SMALL_SIZES=1,32,128
  ORT_LIMIT=256; SMALL_LIMIT=1000; ORT_TIME=(--max-seconds 1.5)
fi
# The ORT run carries the first 1,000 test images (.gpu/testset) beside the last part; the rest run unpacks all.
ORT_DATA=$DATA
[ "$LIST" = 1 ] || [ -f "$DATA/cifar-10-batches-py/test_batch" ] || ORT_DATA=.gpu/testset
B16_ART=$W/art/ort_b16
# Seconds of the ORT sections, measured here on 2 CPU cores (AVX-512 Intel Xeon, with the test suite running
# beside: upper bounds; the GPU machine has 16 cores) unless said otherwise; docs/results/2026-12-01-gpu-plan.md.
# A process that imports torch and vitdeploy: 10 s. One timed configuration: at most --max-seconds 1.5 plus its
# warm-up (at most a quarter of that): 2 s. An ONNX Runtime CUDA session of vit_b_16: 10 s (a guess: none was
# ever created; ORT CPU takes about 1.5 s here). Export of vit_b_16, fp32 + fp16, --no-trt, 32 parity images:
# measured 61 s (matmul policy) and 51 s (activations); CUDA parity adds a session and 32 images.
if [ "$LIST" = 1 ] || [ -f "$ORT_PARTS/wheel.json" ]; then
  # joining the four parts (two sha256 passes over 256 MB) and installing the wheel: measured 3 s; x 5
  section ort_join 15 "$PY" scripts/gpu_ort.py join "$ORT_PARTS" --target "$ORT_SITE"
fi
export PYTHONPATH="$ORT_SITE:$PYTHONPATH"
# the probe's own timeout (gpu_ort.py PROBE_TIMEOUT_S, 30 s; 1.1 s here, where the CUDA session falls back) + 5 s
if section ort_probe 35 "$PY" scripts/gpu_ort.py probe --target "$ORT_SITE" --json "$RES/ort_probe.json" || [ "$SMOKE" = 1 ]; then
  # random checkpoint: measured 4.3 s, 5 + export 61 + bench: process 10, 2 sessions 20, reference and parity on
  # 256 images 5, 2 precisions x 3 sizes x 2 modes x 2 s = 24: 125 s
  section ort_b16 125 bash -c "rm -rf $B16_ART \
    && $PY scripts/gpu_ort.py random-checkpoint $B16_ORT $W/runs/ort_b16.pt --data-dir '$ORT_DATA' \
    && $PY -m vitdeploy export $W/runs/ort_b16.pt --out $B16_ART --fp16 --no-trt --max-batch 32 --parity-images 32 \
       --data-dir '$ORT_DATA' \
    && cp $B16_ART/manifest.json '$RES/ort_b16_manifest.json' \
    && $PY -m vitdeploy bench $B16_ART --backend $ORT_BACKEND --precision fp16,fp32 --limit $ORT_LIMIT \
       --batch-sizes $ORT_SIZES ${ORT_TIME[*]} --out '$RES/ort_b16'"
  # README "fp16 policy": the activations graph against ort_b16's matmul graph at batch 32 (and 8).
  # export 51 (fp32 again, then the activations graph) + bench: process 10, session 10, parity 5, 2 sizes x 2 modes
  # x 2 s = 8: 84 s, 90
  section ort_policy 90 bash -c "rm -rf $W/art/ort_b16_act \
    && $PY -m vitdeploy export $W/runs/ort_b16.pt --out $W/art/ort_b16_act --fp16 --fp16-policy activations --no-trt \
       --max-batch 32 --parity-images 32 --data-dir '$ORT_DATA' \
    && cp $W/art/ort_b16_act/manifest.json '$RES/ort_policy_manifest.json' \
    && $PY -m vitdeploy bench $W/art/ort_b16_act --backend $ORT_BACKEND --precision fp16 --limit $ORT_LIMIT \
       --batch-sizes $POLICY_SIZES ${ORT_TIME[*]} --out '$RES/ort_policy'"
  # ort_b16's fp16 bench with CUDA graphs (captured and checked per batch size; smoke: the plain bench again):
  # process 10, session 10, parity 5, 6 configurations x 2 s = 12, capture and check 3 x 1 s: 40 s, 45
  section ort_graphs 45 bash -c "$PY -m vitdeploy bench $B16_ART --backend $ORT_BACKEND --precision fp16 \
    --limit $ORT_LIMIT --batch-sizes $ORT_SIZES ${ORT_TIME[*]} ${GRAPH[*]} --out '$RES/ort_graphs'"
  # The small model trained in run 1 while the machine stayed warm, else one carried as .gpu/ort/model.pt, else
  # random weights (accuracy is then chance). export (32 px, fp32 + fp16, 500 parity images): measured 33 s with
  # 2,000 + bench: process 10, sessions 4, parity 1,000 images 5, 2 x 2 backends x 3 sizes x 2 modes x 2 s = 48: 100 s
  section ort_small 100 bash -c "ckpt=$W/runs/cifar_small; [ -f \$ckpt/best.pt ] || ckpt=$ORT_PARTS/model.pt; \
    [ -f \$ckpt ] || [ -d \$ckpt ] || { ckpt=$W/runs/ort_small_random.pt; \
      $PY scripts/gpu_ort.py random-checkpoint vit_cifar_small \$ckpt --data-dir '$ORT_DATA' || exit 1; }; \
    rm -rf $W/art/ort_small \
    && $PY -m vitdeploy export \$ckpt --out $W/art/ort_small --fp16 --no-trt --parity-images 500 --data-dir '$ORT_DATA' \
    && cp $W/art/ort_small/manifest.json '$RES/ort_small_manifest.json' \
    && $PY -m vitdeploy bench $W/art/ort_small --backend $ORT_BACKEND,pytorch --precision fp32,fp16 --limit $SMALL_LIMIT \
       --batch-sizes $SMALL_SIZES ${ORT_TIME[*]} --out '$RES/ort_small'"
else
  reason="ONNX Runtime CUDA probe failed: $(cat "$RES/ort_probe.json" 2>/dev/null | tr '\n' ' ')"
  for name in ort_b16 ort_policy ort_graphs ort_small; do skipped "$name" "$reason"; done
fi

[ "$LIST" = 1 ] || { echo "results in $OUT:"; ls -1 "$OUT"; tar -tvf "$OUT/results.tar"; }
