#!/usr/bin/env bash
# The full Qwen2.5-VL-7B architecture through the product's own commands, with DEFAULT flags, on
# this 2-core, 24 GB CPU box: train (DeepSpeed), merge, infer, register, serve one request.
#
#   bash benchmarks/full_7b_cpu.sh [--dry-run] [--keep] [OUT_JSON]   (default OUT_JSON: benchmarks/full_7b_cpu.json)
#
# Run it ALONE: the 7B in bf16 is 16.6 GB of the box's 24 GB, and each step loads it once.
# The box has no hub, so `riskva tiny-model --size 7b-random` builds the real architecture (28 text
# layers, 32 vision blocks, 152064-row embedding; about 8.3 B parameters) with random bf16 weights
# and the script lays it out in a temporary Hugging Face cache as Qwen/Qwen2.5-VL-7B-Instruct, so
# every step resolves the hub id offline, as a user's GPU host without network access would.
#
# Flags are the defaults a user gets, except what only shortens the run or names this box:
#   train  --max_steps 2 --gradient_accumulation_steps 1 --save_steps 2 (two optimizer steps and one
#          checkpoint instead of 3 epochs; the checkpoint save is where host memory used to blow up)
#          --num_processes 1 (one CPU rank; two would need two copies of the weights)
#          --main_process_port 0 (a free port, not 29500: the dry run's test runs beside gpu_check's)
#   photos 1024x768, so at the recipe's pixel cap each sample is about 1000 image tokens (issue 21's
#          memory figure is taken at that length)
# Each step's wall time, peak RSS (whole process tree and largest process), output size and peak
# disk growth go to WORK/steps.jsonl; `collect` writes OUT_JSON and prints the table that
# benchmarks/RESULTS.md records.
# --dry-run runs the same steps on the tiny model in about a minute (tests/model/test_benchmark_dry_runs.py).
set -euo pipefail

MODE=full
KEEP=0
while [[ "${1:-}" == --* ]]; do
  case "$1" in
    --dry-run) MODE=dry ;;
    --keep) KEEP=1 ;;
    *) echo "full_7b_cpu: unknown flag $1" >&2; exit 2 ;;
  esac
  shift
done
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(realpath -m "${1:-$REPO/benchmarks/full_7b_cpu.json}")"
PY="${PY:-$REPO/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3)"
BIN="$(dirname "$PY")"
WORK="${FULL_7B_WORK:-$(mktemp -d /tmp/riskva-full-7b.XXXXXX)}"
mkdir -p "$WORK"
if [[ "$KEEP" == 0 ]]; then trap 'rm -rf "$WORK"' EXIT; fi
HUB_ID="Qwen/Qwen2.5-VL-7B-Instruct"
REVISION="0123456789abcdef0123456789abcdef01234567"  # the fake cache's snapshot commit
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_HUB_CACHE="$WORK/hf_cache" \
  TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 DS_ACCELERATOR=cpu RISKVA_HOME="$WORK/home" \
  MLFLOW_DISABLE_TELEMETRY=true TRANSFORMERS_NO_ADVISORY_WARNINGS=1
unset HF_HOME RISKVA_MLFLOW_TRACKING_URI RISKVA_MLFLOW_REGISTRY_URI MLFLOW_TRACKING_URI MLFLOW_REGISTRY_URI
cd "$REPO"
echo "$MODE" > "$WORK/mode.txt"
: > "$WORK/steps.jsonl"

if [[ "$MODE" == full ]]; then
  SIZE=7b-random; IMAGES=(1024 768); N_IMAGES=12
else
  SIZE=tiny; IMAGES=(128 96); N_IMAGES=10
fi
step() { "$PY" benchmarks/full_7b_cpu.py step "$@"; }

# 0. data (not measured: no model involved)
"$BIN/riskva" synth --output_path "$WORK/raw" --num_images "$N_IMAGES" --image_size "${IMAGES[@]}" --num_workers 2 >/dev/null
"$BIN/riskva" prepare --format jsonl --csv_path "$WORK/raw/metadata.csv" --image_base_path "$WORK/raw" \
  --output_path "$WORK/prepared" --max_image_size "${IMAGES[@]}" >/dev/null

# 1. the base model, laid out in the cache as the hub would leave it
SNAPSHOT="$WORK/hf_cache/models--${HUB_ID//\//--}/snapshots/$REVISION"
mkdir -p "$(dirname "$SNAPSHOT")" "$WORK/hf_cache/models--${HUB_ID//\//--}/refs"
step build_model "$WORK" --out_dir "$SNAPSHOT" -- \
  "$BIN/riskva" tiny-model --size "$SIZE" --dataset_path "$WORK/prepared" --output_dir "$SNAPSHOT"
printf '%s' "$REVISION" > "$WORK/hf_cache/models--${HUB_ID//\//--}/refs/main"
cp "$SNAPSHOT/tiny_model_info.json" "$WORK/model_info.json"
# The demo-size tiny model would pick the demo recipe; the dry run checks the 7B recipe's path.
[[ "$MODE" == dry ]] && rm -f "$SNAPSHOT/tiny_model_info.json"

# 2. train: the README's multi-GPU command on one CPU rank, default recipe (chosen from the base model)
step train "$WORK" --out_dir "$WORK/train" -- \
  "$BIN/accelerate" launch --config_file configs/deepspeed_zero2.yaml --num_processes 1 --main_process_port 0 \
  -m riskva_core.train --model_name_or_path "$HUB_ID" --dataset_path "$WORK/prepared" \
  --output_dir "$WORK/train" --max_steps 2 --gradient_accumulation_steps 1 --save_steps 2 --report_to none

# 3. merge, default flags (bf16, verified against base + adapter)
step merge "$WORK" --out_dir "$WORK/merged" -- \
  "$BIN/riskva" merge --base_model_path "$HUB_ID" --adapter_path "$WORK/train/adapter" --output_dir "$WORK/merged"

# 4. infer one photo on the merged model, default flags
IMAGE="$(ls "$WORK"/raw/images/* | head -n 1)"
step infer "$WORK" --out_dir "$WORK/infer" -- \
  "$BIN/riskva" infer --model_path "$WORK/merged" --image_path "$IMAGE" --output_file "$WORK/infer/predictions.json"

# 5. register in MLflow (sqlite + local artifacts under RISKVA_HOME), default flags
step register "$WORK" --out_dir "$WORK/home/mlflow" -- \
  "$BIN/riskva" register --model_path "$WORK/merged"

# 6. serve one request from the registered version (MLflow's scoring server, default flags)
"$PY" benchmarks/full_7b_cpu.py serve-one "$WORK" "models:/riskva/1" "$IMAGE" \
  --tracking_uri "sqlite:///$WORK/home/mlflow/mlflow.db"

"$PY" benchmarks/full_7b_cpu.py collect "$WORK" "$OUT"
echo "full_7b_cpu: wrote $OUT (work folder $WORK$([[ $KEEP == 1 ]] && echo ", kept" || echo ", removed"))" >&2
