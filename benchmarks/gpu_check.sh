#!/usr/bin/env bash
# The 7B path at full size on one lent GPU (an H200), in under 8 minutes, as ONE JSON of figures.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [OUT_JSON]     (default OUT_JSON: benchmarks/gpu_check.json)
#
# The GPU host has no hub, so the real Qwen2.5-VL-7B architecture (28 layers, 32 vision blocks,
# 152064-row embedding) is built with random weights in bf16 by `riskva tiny-model --size 7b-random`.
# Everything else is the project's own entry points, unchanged:
#   1. data:  `riskva synth` 1024x768 photos (~1000 image tokens each at the 7B recipe's pixel cap)
#             + `riskva prepare` (JSONL)
#   2. train: `accelerate launch --config_file configs/deepspeed_zero2.yaml -m riskva_core.train` with
#             the default 7B LoRA recipe (riskva_core.train.recipes.LORA_7B: bf16, gradient
#             checkpointing, LoRA r64 on the language model, batch 2) for a few steps; peak GPU
#             memory sampled with nvidia-smi, training tokens/s from the run's metrics.json
#   3. merge: `riskva merge` with default flags (bf16, judged by the merged model's logits and
#             greedy answers against bf16's own noise at the 7B's depth), timed; a few steps at lr
#             1e-4 leave per-layer updates below bf16's resolution: the JSON reports how much
#             survived (min_kept, warnings) and the gate's figures
#   4. infer: greedy generation tokens/s at batch 8 against batch 1 on the merged model (Generator)
#   5. vllm:  where `vllm` is importable, `vllm serve` on the merged folder (a standard Hugging Face
#             folder) answers the test photos, and its greedy answers must equal `riskva serve --api
#             openai`'s (same pixels, same prompt; gpu_check.py vllm-parity). Skipped, with a printed line,
#             where vllm is absent and in --dry-run: nothing about vLLM is run or claimed on a CPU.
# --dry-run runs the same steps on the tiny model on CPU in about a minute (tests/model/test_benchmark_dry_runs.py).
set -euo pipefail

MODE=full
if [[ "${1:-}" == "--dry-run" ]]; then MODE=dry; shift; fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(realpath -m "${1:-$REPO/benchmarks/gpu_check.json}")"
PY="${PY:-$REPO/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3)"
BIN="$(dirname "$PY")"
WORK="${GPU_CHECK_WORK:-$(mktemp -d /tmp/riskva-gpu-check.XXXXXX)}"
mkdir -p "$WORK"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
cd "$REPO"
echo "$MODE" > "$WORK/mode.txt"
: > "$WORK/timings.txt"

if [[ "$MODE" == full ]]; then
  SIZE=7b-random; IMAGES=(1024 768); N_IMAGES=40; STEPS=6; GA=2; NEW_TOKENS=64
  nvidia-smi -L >/dev/null || { echo "gpu_check: no usable GPU (nvidia-smi -L failed); use --dry-run" >&2; exit 2; }
  unset DS_ACCELERATOR
  RECIPE_OVERRIDES=()
else
  SIZE=tiny; IMAGES=(128 96); N_IMAGES=10; STEPS=2; GA=1; NEW_TOKENS=4
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  # The same recipe, shrunk where a CPU needs it (the 7B recipe's bf16 is kept: DeepSpeed bf16 on CPU ranks,
  # which upstream allows with --use_cpu).
  RECIPE_OVERRIDES=(--min_pixels 784 --max_pixels 3136 --max_length 512 --lora_r 4 --lora_alpha 8 --use_cpu)
fi

timed() {  # timed NAME CMD...: run, append "NAME seconds" to timings.txt
  local name=$1; shift
  local t0=$EPOCHREALTIME
  "$@"
  awk -v n="$name" -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%s %.3f\n", n, b - a }' >> "$WORK/timings.txt"
}

# 1. data
"$BIN/riskva" synth --output_path "$WORK/raw" --num_images "$N_IMAGES" --image_size "${IMAGES[@]}" --num_workers 4 >/dev/null
"$BIN/riskva" prepare --format jsonl --csv_path "$WORK/raw/metadata.csv" --image_base_path "$WORK/raw" \
  --output_path "$WORK/prepared" --max_image_size "${IMAGES[@]}" >/dev/null

# 2. model + train
timed tiny_model "$BIN/riskva" tiny-model --size "$SIZE" --dataset_path "$WORK/prepared" --output_dir "$WORK/model" >/dev/null
mapfile -t RECIPE < <("$PY" -c "from riskva_core.train.recipes import resolve; print('\n'.join(resolve('lora')[1]))")
# --main_process_port 0: a free port, so the check runs beside anything else on the host.
TRAIN=("$BIN/accelerate" launch --config_file configs/deepspeed_zero2.yaml --num_processes 1 --main_process_port 0
       -m riskva_core.train --model_name_or_path "$WORK/model" --dataset_path "$WORK/prepared"
       --output_dir "$WORK/train" "${RECIPE[@]}" --max_steps "$STEPS" --gradient_accumulation_steps "$GA"
       --save_strategy no --logging_steps 1 --report_to none "${RECIPE_OVERRIDES[@]}")
printf '%q ' "${TRAIN[@]}" > "$WORK/train_command.txt"
SAMPLER=""
trap 'if [[ -n "$SAMPLER" ]]; then kill "$SAMPLER" 2>/dev/null || true; fi' EXIT  # also when a step fails
if command -v nvidia-smi >/dev/null && [[ "$MODE" == full ]]; then
  "$PY" benchmarks/gpu_check.py sample-gpu-memory "$WORK/gpu_peak_mib.txt" & SAMPLER=$!
fi
timed train "${TRAIN[@]}"
if [[ -n "$SAMPLER" ]]; then kill "$SAMPLER"; SAMPLER=""; fi

# 3. merge
timed merge "$BIN/riskva" merge --base_model_path "$WORK/model" --adapter_path "$WORK/train/adapter" \
  --output_dir "$WORK/merged"

# 4. batched inference, batch 8 vs batch 1
timed infer "$PY" benchmarks/gpu_check.py infer "$WORK/merged" "$WORK/prepared" "$WORK/infer.json" \
  --max_new_tokens "$NEW_TOKENS" --batch_sizes 1 8 --n_images 8

# 5. vLLM against riskva serve (not `timed`: its failure must reach the exit status)
VLLM_SAME=yes
if [[ "$MODE" != full ]]; then
  SKIP="a dry run on CPU: nothing about vLLM is run or claimed"
elif ! "$PY" -c "import vllm" 2>/dev/null; then
  SKIP="vllm is not installed in $PY's environment"
else
  SKIP=""
  t0=$EPOCHREALTIME
  "$PY" benchmarks/gpu_check.py vllm-parity "$WORK/merged" "$WORK/prepared" "$WORK/vllm.json" \
    --max_new_tokens "$NEW_TOKENS" --n_images 8 || VLLM_SAME=no
  awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "vllm %.3f\n", b - a }' >> "$WORK/timings.txt"
fi
if [[ -n "$SKIP" ]]; then
  echo "gpu_check: vLLM step skipped: $SKIP" >&2
  "$PY" -c 'import json, sys; print(json.dumps({"skipped": sys.argv[1]}))' "$SKIP" > "$WORK/vllm.json"
fi

"$PY" benchmarks/gpu_check.py collect "$WORK" "$OUT"
echo "gpu_check: wrote $OUT (work folder $WORK)" >&2
if [[ "$VLLM_SAME" != yes ]]; then
  echo "gpu_check: vLLM's greedy answers are not riskva serve's (or vLLM did not answer): see $WORK/vllm.json and $WORK/vllm_parity/" >&2
  exit 1
fi
