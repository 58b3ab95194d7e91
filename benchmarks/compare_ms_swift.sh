#!/usr/bin/env bash
# Matched training throughput, RisKVA against ms-swift 4.6.0 (issue 21), in one run.
#
#   SWIFT_VENV=/path/to/venv bash benchmarks/compare_ms_swift.sh          # 4 x 1200 steps, a quiet machine
#   STEPS=20 SWIFT_VENV=... bash benchmarks/compare_ms_swift.sh           # smoke test
#
# ms-swift lives in its own venv, never in the project's (it caps transformers < 5.20 and peft < 0.21):
#   python -m venv /tmp/swiftenv && /tmp/swiftenv/bin/pip install torch==2.14.1 torchvision==0.29.1 \
#     && /tmp/swiftenv/bin/pip install ms-swift==4.6.0
# Order A B B A (riskva, swift, swift, riskva), STEPS optimizer steps each, then each run's Trainer
# train_samples_per_second and the ratios riskva/swift of the pairs (run1/run2, run4/run3) and
# their median. Logs: $CMP/logs/run_pair-<time>-<steps>/.
#
# Equal terms (checked at every step of a 30-step run: the same loss to 5-6 digits and the same
# total_flos): the `small` tiny model, the same 95 prepared samples in file order (sequential
# sampler on both), 48 image tokens per photo (MIN=MAX pixels 37632), LoRA r8/alpha16, dropout 0,
# on the language model's 7 linear projections only (ViT and merger frozen, no lm_head), lr 1e-4
# cosine with ceil(3 % of STEPS) warmup steps, AdamW (betas 0.9/0.999, wd 0, clip 1.0), fp32 on
# CPU, batch 4 x accumulation 1, no gradient checkpointing, no eval, no save, 0 DataLoader workers,
# seed 0, labels = the answer + its <|im_end|> (ms-swift through ms_swift_equal_terms.py, which also
# gives its Qwen2.5-VL template the tiny model's image token id: unpatched it feeds 1 image token).
set -euo pipefail

STEPS=${STEPS:-1200}
RISKVA_REPO=${RISKVA_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
RISKVA_VENV=${RISKVA_VENV:-$RISKVA_REPO/.venv}
SWIFT_VENV=${SWIFT_VENV:?set SWIFT_VENV to a venv with ms-swift 4.6.0 (see the header)}
CMP=${CMP:-/tmp/riskva-vs-swift}
MODEL=${MODEL:-$CMP/models/small}
PREP=${PREP:-$CMP/prepared}
PLUGIN=${PLUGIN:-$RISKVA_REPO/benchmarks/ms_swift_equal_terms.py}
LOGROOT=${LOGROOT:-$CMP/logs}
WORK=${WORK:-/tmp/cmp_pair}
NICE=${NICE:-0}                           # 19 on a shared machine
LOCK=${LOCK:-}                            # a flock file other heavy work also takes, if any
THREADS=${THREADS:-2}

# Hold the heavy-work lock for all four runs, so that they see the same conditions.
if [[ -n "$LOCK" && -z "${RUN_PAIR_LOCKED:-}" ]]; then
    export RUN_PAIR_LOCKED=1
    echo "waiting for $LOCK ..." >&2
    exec flock "$LOCK" "$0" "$@"
fi

# The inputs, built once by the project's own commands: 113 synthetic photos -> 95 train samples.
if [[ ! -f "$PREP/train.jsonl" || ! -f "$MODEL/config.json" ]]; then
    "$RISKVA_VENV/bin/riskva" synth --output_path "$CMP/raw" --num_images 113 --seed 0 >/dev/null
    "$RISKVA_VENV/bin/riskva" prepare --format jsonl --csv_path "$CMP/raw/metadata.csv" \
        --image_base_path "$CMP/raw" --output_path "$PREP" >/dev/null
    "$RISKVA_VENV/bin/riskva" tiny-model --size small --dataset_path "$PREP" --output_dir "$MODEL" >/dev/null
fi

WARMUP=$(( (3 * STEPS + 99) / 100 ))      # ceil(0.03 * STEPS): what --warmup_ratio 0.03 means
PIX=37632                                 # 48 image tokens * 28 * 28
LOGDIR=$LOGROOT/run_pair-$(date +%Y%m%d-%H%M%S)-$STEPS
mkdir -p "$LOGDIR" "$WORK"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=$THREADS \
    TOKENIZERS_PARALLELISM=false

run_riskva() {  # $1 = run number
    local out=$WORK/riskva-$1
    rm -rf "$out"
    (cd "$RISKVA_REPO" && PYTHONPATH=$RISKVA_REPO nice -n "$NICE" "$RISKVA_VENV/bin/riskva" train \
        --model_name_or_path "$MODEL" --dataset_path "$PREP/train.jsonl" --output_dir "$out" \
        --recipe seed --use_lora True --lora_r 8 --lora_alpha 16 --lora_dropout 0 \
        --lora_target_modules all-linear --tune_merger False --train_lm_head False --tune_vision False \
        --min_pixels $PIX --max_pixels $PIX --max_length 4096 --gradient_checkpointing False \
        --learning_rate 1e-4 --lr_scheduler_type cosine --warmup_steps "$WARMUP" \
        --weight_decay 0.0 --adam_beta2 0.999 \
        --per_device_train_batch_size 4 --gradient_accumulation_steps 1 \
        --train_sampling_strategy sequential --max_steps "$STEPS" \
        --eval_strategy no --save_strategy no --logging_steps 1 --report_to none \
        --dataloader_num_workers 0 --seed 0 --bf16 False) > "$LOGDIR/$1_riskva.log" 2>&1
}

run_swift() {  # $1 = run number
    local out=$WORK/swift-$1
    rm -rf "$out"
    (cd "$WORK" && MAX_PIXELS=$PIX MIN_PIXELS=$PIX PATH=$SWIFT_VENV/bin:$PATH nice -n "$NICE" \
        "$SWIFT_VENV/bin/swift" sft --model "$MODEL" --model_type qwen2_5_vl --template qwen2_5_vl \
        --external_plugins "$PLUGIN" --tuner_type lora \
        --dataset "$PREP/train.jsonl" --dataset_shuffle false --train_dataloader_shuffle false \
        --split_dataset_ratio 0 --lora_rank 8 --lora_alpha 16 --lora_dropout 0 \
        --target_modules all-linear --freeze_vit true --freeze_aligner true \
        --max_length 4096 --gradient_checkpointing false --vit_gradient_checkpointing false \
        --learning_rate 1e-4 --lr_scheduler_type cosine --warmup_steps "$WARMUP" \
        --weight_decay 0.0 --adam_beta2 0.999 \
        --per_device_train_batch_size 4 --gradient_accumulation_steps 1 --max_steps "$STEPS" \
        --include_num_input_tokens_seen true \
        --eval_strategy no --save_strategy no --logging_steps 1 --report_to none \
        --dataloader_num_workers 0 --seed 0 --torch_dtype float32 \
        --output_dir "$out") > "$LOGDIR/$1_swift.log" 2>&1
}

{
    echo "STEPS=$STEPS WARMUP=$WARMUP NICE=$NICE THREADS=$THREADS MODEL=$MODEL PREP=$PREP"
    echo "riskva: $RISKVA_REPO @ $(git -C "$RISKVA_REPO" rev-parse --short HEAD 2>/dev/null || echo '?')" \
         "$(git -C "$RISKVA_REPO" status --porcelain 2>/dev/null | grep -q . && echo '(dirty)')"
    for v in "$RISKVA_VENV" "$SWIFT_VENV"; do
        echo "$v: $("$v/bin/pip" freeze 2>/dev/null | grep -iE '^(torch|torchvision|transformers|peft|accelerate|ms-swift|qwen-vl-utils|trl|datasets)==' | tr '\n' ' ')"
    done
    uptime
} | tee "$LOGDIR/env.txt"

i=0
for who in riskva swift swift riskva; do
    i=$((i + 1))
    echo "[$(date +%T)] run $i: $who, $STEPS steps ..."
    start=$(date +%s)
    if ! "run_$who" "$i"; then
        echo "run $i ($who) FAILED; tail of $LOGDIR/${i}_$who.log:"
        tail -30 "$LOGDIR/${i}_$who.log"
        exit 1
    fi
    echo "[$(date +%T)] run $i done in $(( $(date +%s) - start )) s wall"
done
uptime | tee -a "$LOGDIR/env.txt"

# Read each run's figures from its own files (full precision), the console log as a fallback.
"$RISKVA_VENV/bin/python" - "$LOGDIR" "$WORK" "$STEPS" <<'EOF' | tee "$LOGDIR/summary.txt"
import glob, json, re, statistics, sys
logdir, work, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])

def riskva(n):
    m = json.load(open(f"{work}/riskva-{n}/adapter/metrics.json"))
    hist = [h for h in m["history"] if "loss" in h]
    return m["final"]["train_samples_per_second"], m["final"]["train_runtime"], hist[0]["loss"], None

def swift(n):
    last = json.loads(open(glob.glob(f"{work}/swift-{n}/v*/logging.jsonl")[-1]).read().splitlines()[-1])
    hist = last["log_history"]
    fin = [h for h in hist if "train_runtime" in h][-1]
    log = open(f"{logdir}/{n}_swift.log", encoding="utf-8", errors="replace").read()
    tok = re.findall(r"\[(\d+) \* (\d+)\]<\|vision_end\|>", log)
    return fin["train_samples_per_second"], fin["train_runtime"], hist[0]["loss"], tok[0][1] if tok else "?"

rows = {}
for n, who in enumerate(["riskva", "swift", "swift", "riskva"], 1):
    sps, rt, loss1, tok = (riskva if who == "riskva" else swift)(n)
    rows[n] = sps
    extra = f", image tokens/sample {tok}" if tok else ""
    print(f"run {n} {who:6s}: train_samples_per_second {sps:.3f}  (train_runtime {rt:.1f} s, "
          f"{rt / steps:.3f} s/step, first-step loss {loss1:.6f}{extra})")
p1, p2 = rows[1] / rows[2], rows[4] / rows[3]
print(f"pair 1 (run1/run2) riskva/swift = {p1:.3f}")
print(f"pair 2 (run4/run3) riskva/swift = {p2:.3f}")
print(f"median ratio riskva/swift = {statistics.median([p1, p2]):.3f}")
EOF
echo "logs: $LOGDIR"
