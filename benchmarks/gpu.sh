#!/usr/bin/env bash
# benchmarks/gpu.sh: the train stage on one CUDA GPU, in bfloat16, in under 10 minutes.
#
#   bash benchmarks/gpu.sh                    # on the GPU machine (after gpu_carry.sh here)
#   bash benchmarks/gpu.sh --cpu-rehearsal    # the same steps on this CPU, tiny, fp32 unless
#                                             # GPU_BENCH_PRECISION=bf16 (or GPU_BENCH_DEVICE=cpu)
#
# For a machine with one CUDA GPU whose Python has PyTorch (CUDA build), that reaches no
# package registry, and to which only the working tree plus benchmarks/.gpu-carry/ (made by
# benchmarks/gpu_carry.sh, under 64 MiB together) is brought. In order, each step time-boxed
# within GPU_BENCH_BUDGET seconds (540 by default):
#   1. checks the GPU (bf16) and the carried folder;
#   2. installs into a folder of its own only the carried wheels the machine lacks or holds in
#      versions the project does not take (benchmarks/gpu_bench.py requirements); the image's
#      torch is never replaced; then imports everything once;
#   3. builds the model: SmolLM2-135M-Instruct's config and tokenizer with seeded RANDOM
#      weights of its shapes (the bundled GGUF is 94 MiB, the weights do not travel);
#   4. runs the train stage (`python -m pipelines.cli train`, i.e. `llmops train`, with --set
#      overrides only) in bf16 with DeepSpeed ZeRO-2 (configs/deepspeed/zero2.json; it also
#      merges the adapter) and ZeRO-3: training tokens/s from the stage's rank-0 step lines,
#      losses, the adapter gate (trained vs reloaded loss, inside the stage), GPU memory;
#   5. resume: starts a ZeRO-3 run, kills its process group (SIGKILL) after its first complete
#      checkpoint, starts it again and checks that it resumed from the last complete checkpoint;
#   6. generation tokens/s of the merged model (bf16, greedy, a fixed number of new tokens);
#   7. prints every figure as Markdown tables (gpu_bench.py summary), also when a step failed.
# A missing piece is named on one line with its fix; a failed step is named on a line
# "gpu.sh: FAILED: ..." and the script exits non-zero after printing the figures it has.
# Logs, metrics and the figures (record.jsonl) are in GPU_BENCH_WORK (a temp folder by
# default) and, when $OUT is set (the device tool), copied to $OUT/gpu-bench/.
#
# Environment: GPU_PYTHON (the interpreter with PyTorch: python3; .venv/bin/python in the
# rehearsal), GPU_CARRY (benchmarks/.gpu-carry), GPU_BENCH_WORK, GPU_BENCH_BUDGET,
# GPU_BENCH_STEPS / _BATCH / _WARMUP (the timed runs), GPU_BENCH_RESUME_CONFIG (zero3).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

MODE=gpu
[[ ${1:-} == --cpu-rehearsal || ${GPU_BENCH_DEVICE:-cuda} == cpu ]] && MODE=cpu
CARRY=${GPU_CARRY:-benchmarks/.gpu-carry}
CARRY=$(cd "$(dirname "$CARRY")" 2>/dev/null && echo "$PWD/$(basename "$CARRY")" || echo "$CARRY")
WORK=${GPU_BENCH_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-bench.XXXXXX")}
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd)
RECORD=$WORK/record.jsonl
START=$(date +%s)
MAX_LENGTH=128
RESUME_CONFIG=${GPU_BENCH_RESUME_CONFIG:-zero3}
if [[ $MODE == gpu ]]; then
  PY=${GPU_PYTHON:-python3}
  BUDGET=${GPU_BENCH_BUDGET:-540}
  STEPS=${GPU_BENCH_STEPS:-40} BATCH=${GPU_BENCH_BATCH:-16} WARMUP=${GPU_BENCH_WARMUP:-5} EVAL_SAMPLES=64
  RESUME_STEPS=30 RESUME_SAVE=10
  PRECISION=bf16
  GEN=(--device cuda --dtype bf16 --batches "1 32" --new-tokens 64 --repeats 3)
else
  PY=${GPU_PYTHON:-.venv/bin/python}
  BUDGET=${GPU_BENCH_BUDGET:-1800}
  STEPS=${GPU_BENCH_STEPS:-4} BATCH=${GPU_BENCH_BATCH:-4} WARMUP=${GPU_BENCH_WARMUP:-1} EVAL_SAMPLES=8
  RESUME_STEPS=6 RESUME_SAVE=2
  # fp32 unless asked: a CPU without native bf16 (AVX2 only, e.g. AMD EPYC Zen 3) runs the stage's bf16
  # autocast ~25x slower than fp32 (benchmarks/RESULTS.md, training loop), far too slow for a rehearsal
  PRECISION=${GPU_BENCH_PRECISION:-fp32}
  GEN=(--device cpu --dtype "$PRECISION" --batches "1 4" --new-tokens 8 --repeats 1)
  export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=""  # DeepSpeed's CPU accelerator, gloo
fi
RESERVE=20  # seconds kept for the summary
SITE=$WORK/site
export PYTHONPATH=$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HOME=$WORK/hf
# no registry, no telemetry: nothing may wait on the network
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1
# MLflow 3.17 refuses its file store unless asked (the sqlite store would need sqlalchemy + alembic carried)
export MLFLOW_ALLOW_FILE_STORE=true
FAILS=()

say() { echo "gpu.sh [$(( $(date +%s) - START ))s] $*"; }
bench() { "$PY" benchmarks/gpu_bench.py "$@"; }
failed() {  # failed STEP DETAIL: one line, recorded for the summary
  FAILS+=("$1")
  echo "gpu.sh: FAILED: $1: $2"
  bench fail --what "$1" --detail "$2" --record "$RECORD" 2>/dev/null || true
}
fatal() { failed "$1" "$2"; exit 1; }
# seconds a step may take: its cap, or what is left of the budget; 0 when under `min`
box() {
  local cap=$1 min=${2:-15} left
  left=$(( START + BUDGET - RESERVE - $(date +%s) ))
  (( left < cap )) && cap=$left
  (( cap < min )) && cap=0
  echo "$cap"
}
finish() {
  local rc=$?
  echo
  echo "=== figures ($MODE$([[ $MODE == cpu ]] && echo ' rehearsal: CPU, tiny runs; not GPU figures'), $(( $(date +%s) - START )) s) ==="
  if command -v "$PY" >/dev/null 2>&1; then
    bench summary --record "$RECORD" || { (( rc )) || rc=1; }
  fi
  if [[ -n ${OUT:-} && -d ${OUT:-} ]]; then
    mkdir -p "$OUT/gpu-bench"
    cp "$RECORD" "$OUT/gpu-bench/" 2>/dev/null
    for file in "$WORK"/*.log "$WORK"/*/train*.log "$WORK"/*/reports/train/metrics.json; do
      [[ -f $file ]] && cp "$file" "$OUT/gpu-bench/$(realpath --relative-to="$WORK" "$file" | tr / _)"
    done
  fi
  if (( ${#FAILS[@]} )); then
    echo "gpu.sh: ${#FAILS[@]} step(s) failed: ${FAILS[*]} (logs in $WORK)"
    exit 1
  fi
  (( rc == 0 )) && echo "gpu.sh: every step passed in $(( $(date +%s) - START )) s (work folder $WORK)"
  exit "$rc"
}
trap finish EXIT

say "mode $MODE, budget ${BUDGET}s, work folder $WORK, carried folder $CARRY"

# --- 1. the machine and what was brought ----------------------------------------------------
command -v "$PY" >/dev/null 2>&1 \
  || fatal python "MISSING: $PY not found; set GPU_PYTHON to the interpreter that has PyTorch with CUDA"
for need in wheels/ prepared/train.parquet prepared/validation.parquet model/config.json model/tokenizer.json; do
  [[ -e $CARRY/$need ]] || fatal carry "MISSING: $CARRY/$need; run \`bash benchmarks/gpu_carry.sh\` where pip reaches PyPI and name $CARRY in the device call's carry list"
done
line=$(timeout 120 "$PY" benchmarks/gpu_bench.py gpu 2>&1); rc=$?
line=$(tail -1 <<<"$line")
if [[ $MODE == gpu ]]; then
  (( rc == 0 )) || fatal gpu "$line"
  say "GPU: $line"
else
  say "rehearsal on CPU (the GPU check says: $line)"
fi

# --- 2. requirements: install only what is missing, never torch ------------------------------
t=$(box 90)
(( t )) || fatal requirements "no time left in the ${BUDGET}s budget"
timeout "$t" "$PY" benchmarks/gpu_bench.py requirements --wheels "$CARRY/wheels" --select-out "$WORK/selected.txt" \
  | tee "$WORK/requirements.log"
rc=${PIPESTATUS[0]}
(( rc == 124 )) && fatal requirements "timed out after ${t}s"
# A MISSING line names the package and the fix; the import check below decides whether it stops the run
# (package metadata can require what a working image does without).
(( rc == 0 )) || say "requirements: $(grep -c '^MISSING' "$WORK/requirements.log") package(s) missing (above); continuing to the import check"
if [[ -s $WORK/selected.txt ]]; then
  "$PY" -m pip --version >/dev/null 2>&1 \
    || fatal install "MISSING: pip for $PY, needed to install $(wc -l < "$WORK/selected.txt") carried wheel(s); use an interpreter that has pip (GPU_PYTHON)"
  say "installing $(wc -l < "$WORK/selected.txt") carried wheel(s) into $SITE (first on PYTHONPATH; the image's torch stays)"
  t=$(box 120)
  (( t )) || fatal install "no time left in the ${BUDGET}s budget"
  mapfile -t wheels < "$WORK/selected.txt"
  timeout "$t" "$PY" -m pip install --quiet --no-deps --no-index --no-compile --disable-pip-version-check \
      --target "$SITE" "${wheels[@]}" > "$WORK/install.log" 2>&1 \
    || fatal install "pip could not install the carried wheels: $(grep -iE 'error' "$WORK/install.log" | tail -1)"
  timeout 60 "$PY" benchmarks/gpu_bench.py requirements --wheels "$CARRY/wheels" | grep -E '^(MISSING|WARNING|requirements)'
fi
imports="import torch, transformers, peft, accelerate, trl, datasets, deepspeed, mlflow, pydantic, pipelines.cli"
t=$(box 120)
(( t )) || fatal imports "no time left in the ${BUDGET}s budget"
timeout "$t" "$PY" -c "$imports" > "$WORK/imports.log" 2>&1 \
  || fatal imports "the train stage's imports fail: $(grep -E 'Error|error' "$WORK/imports.log" | tail -1); carry a fitting wheel (benchmarks/gpu_carry.sh) or install it in the image; see $WORK/imports.log"
bench environment --site "$SITE" --record "$RECORD" || true

# --- 3. the model: its shapes, random weights ------------------------------------------------
t=$(box 120)
(( t )) || fatal shapes "no time left in the ${BUDGET}s budget"
timeout "$t" "$PY" benchmarks/gpu_bench.py shapes --config-dir "$CARRY/model" --out "$WORK/model" --record "$RECORD" \
  > "$WORK/shapes.log" 2>&1 || fatal shapes "$(tail -1 "$WORK/shapes.log")"
grep '^shapes:' "$WORK/shapes.log"

# --- 4. the train stage under ZeRO-2 and ZeRO-3 ----------------------------------------------
PORT=29500
train_args() {  # train_args RUN_DIR CONFIG STEPS SAVE_STEPS MERGE: the stage's --set overrides
  local run=$1 config=$2 steps=$3 save=$4 merge=$5
  ARGS=(train
    --set "base_model.output_dir=$WORK/model" --set "paths.prepared_dir=$CARRY/prepared"
    --set "paths.reports_dir=$run/reports" --set "train.adapter_dir=$run/adapter"
    --set "train.merged_dir=$run/merged" --set "train.checkpoint_dir=$run/checkpoints"
    --set "train.precision=$PRECISION" --set "train.deepspeed.config=configs/deepspeed/$config.json"
    --set train.deepspeed.num_processes=1 --set "train.deepspeed.master_port=$PORT"
    --set "train.max_steps=$steps" --set "train.save_steps=$save" --set "train.eval_steps=$steps"
    --set train.logging_steps=1 --set train.warmup_steps=0 --set "train.max_length=$MAX_LENGTH"
    --set "train.per_device_train_batch_size=$BATCH" --set "train.per_device_eval_batch_size=$BATCH"
    --set train.gradient_accumulation_steps=1 --set "train.max_train_samples=$(( steps * BATCH ))"
    --set "train.max_eval_samples=$EVAL_SAMPLES" --set "train.merge=$merge"
    --set "tracking.uri=file://$WORK/mlruns" --set tracking.experiment=gpu-bench
    --set tracking.system_metrics_interval=2)
}

gpu_memory_start() {  # sample the GPU's memory in use while a run goes (nvidia-smi, MiB)
  MEMPID=
  if [[ $MODE == gpu ]] && command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$1" 2>/dev/null &
    MEMPID=$!
  fi
}
gpu_memory_stop() { [[ -n $MEMPID ]] && kill "$MEMPID" 2>/dev/null; wait "$MEMPID" 2>/dev/null; MEMPID=; }

figures() {  # figures RUN LOG LABEL CONFIG WARMUP STEPS WALL RC
  bench train-figures --log "$2" --metrics "$1/reports/train/metrics.json" --prepared "$CARRY/prepared" \
    --tokenizer "$WORK/model" --mlruns "$WORK/mlruns" --label "$3" --config "$4" --record "$RECORD" \
    --batch "$BATCH" --max-length "$MAX_LENGTH" --warmup "$5" --max-train-samples "$(( $6 * BATCH ))" \
    --gpu-memory-log "$1/gpu-memory.txt" --wall "$7" --rc "$8"
}

seconds_since() { awk -v a="$1" -v b="$(date +%s%N)" 'BEGIN {printf "%.1f", (b - a) / 1e9}'; }

train_run() {  # train_run LABEL CONFIG MERGE
  local label=$1 config=$2 merge=$3 run=$WORK/$1 t started rc
  mkdir -p "$run"
  PORT=$(( PORT + 1 ))
  train_args "$run" "$config" "$STEPS" "$STEPS" "$merge"
  t=$(box 180 30)
  (( t )) || { failed "train $label" "no time left in the ${BUDGET}s budget"; return; }
  say "train $label: configs/deepspeed/$config.json, $PRECISION, $STEPS steps of batch $BATCH (at most ${t}s; log $run/train.log)"
  gpu_memory_start "$run/gpu-memory.txt"
  started=$(date +%s%N)
  timeout -k 15 "$t" "$PY" -m pipelines.cli "${ARGS[@]}" > "$run/train.log" 2>&1
  rc=$?
  gpu_memory_stop
  grep -E "adapter gate|train: done|error" "$run/train.log" | tail -3
  if (( rc == 124 || rc == 137 )); then
    failed "train $label" "timed out after ${t}s (log $run/train.log)"
  fi
  # prints "train LABEL: <figures>" or "... FAILED: <the log's error line>"
  figures "$run" "$run/train.log" "$label" "$config" "$WARMUP" "$STEPS" \
    "$(seconds_since "$started")" "$rc" \
    || FAILS+=("train-$label")
}

train_run zero2 zero2 true
train_run zero3 zero3 false

# --- 5. resume: kill a run after a complete checkpoint, start it again ------------------------
resume_run() {
  local config=$RESUME_CONFIG run=$WORK/resume-$RESUME_CONFIG t pid waited=0 complete from rc started
  mkdir -p "$run"
  PORT=$(( PORT + 1 ))
  train_args "$run" "$config" "$RESUME_STEPS" "$RESUME_SAVE" false
  t=$(box 180 40)
  (( t )) || { failed resume "no time left in the ${BUDGET}s budget"; return; }
  say "resume ($config): $RESUME_STEPS steps, a checkpoint every $RESUME_SAVE; killing it after checkpoint-$RESUME_SAVE is complete"
  setsid "$PY" -m pipelines.cli "${ARGS[@]}" > "$run/train-killed.log" 2>&1 &
  pid=$!
  until [[ -f $run/checkpoints/checkpoint-$RESUME_SAVE/checkpoint-complete.json ]] \
        && grep -qE "loop: step $(( RESUME_SAVE + 1 ))/" "$run/train-killed.log"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid"; rc=$?
      failed resume "the run ended (exit code $rc) before it could be killed after checkpoint-$RESUME_SAVE: $(tail -1 "$run/train-killed.log")"
      return
    fi
    if (( waited >= t * 5 )); then
      kill -KILL -- -"$pid" 2>/dev/null
      failed resume "no complete checkpoint-$RESUME_SAVE within ${t}s (log $run/train-killed.log)"
      return
    fi
    sleep 0.2; waited=$(( waited + 1 ))
  done
  kill -KILL -- -"$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  sleep 1  # let the kernel release the ranks' ports
  complete=$(for marker in "$run"/checkpoints/checkpoint-*/checkpoint-complete.json; do
               [[ -f $marker ]] && basename "$(dirname "$marker")" | sed 's/^checkpoint-//'; done | sort -n | xargs)
  say "resume ($config): killed (SIGKILL to the process group) after $(grep -oE 'loop: step [0-9]+' "$run/train-killed.log" | tail -1); complete checkpoints: ${complete:-none}; starting it again"
  from=$(tr ' ' '\n' <<<"$complete" | awk -v max="$RESUME_STEPS" '$1 < max' | tail -1)
  t=$(box 180 30)
  (( t )) || { failed resume "no time left in the ${BUDGET}s budget to start it again"; return; }
  gpu_memory_start "$run/gpu-memory.txt"
  started=$(date +%s%N)
  timeout -k 15 "$t" "$PY" -m pipelines.cli "${ARGS[@]}" > "$run/train.log" 2>&1
  rc=$?
  local wall
  wall=$(seconds_since "$started")
  gpu_memory_stop
  grep -E "resuming from|adapter gate|train: done|error" "$run/train.log" | tail -4
  bench resume-check --log "$run/train.log" --killed-log "$run/train-killed.log" \
    --metrics "$run/reports/train/metrics.json" --checkpoints "$run/checkpoints" --complete "$complete" \
    --max-steps "$RESUME_STEPS" --rc "$rc" --config "$config" --record "$RECORD" || FAILS+=("resume")
  figures "$run" "$run/train.log" "resumed-$config" "$config" "$(( ${from:-0} + 1 ))" "$RESUME_STEPS" "$wall" "$rc" \
    >/dev/null || true
}
resume_run

# --- 6. generation with the merged model ------------------------------------------------------
merged=$WORK/zero2/merged
if [[ -f $merged/config.json ]]; then
  t=$(box 150 20)
  if (( t )); then
    say "generate: $merged (the ZeRO-2 run's merged model) (at most ${t}s)"
    timeout -k 10 "$t" "$PY" benchmarks/gpu_bench.py generate --model "$merged" \
        --prompts "$CARRY/prepared/validation.parquet" "${GEN[@]}" --record "$RECORD" 2>&1 \
      | tee "$WORK/generate.log" | grep -E '^generate'
    rc=${PIPESTATUS[0]}
    (( rc == 0 )) || failed generate "exit code $rc: $(grep -E 'Error|error' "$WORK/generate.log" | tail -1)"
  else
    failed generate "no time left in the ${BUDGET}s budget"
  fi
else
  failed generate "no merged model in $merged (the ZeRO-2 run did not finish)"
fi
