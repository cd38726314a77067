#!/usr/bin/env bash
# The whole GPU run in one call, for a lent machine that has torch, transformers and
# accelerate but not `datasets`, and no network:
#
#   here:   bash scripts/device_run.sh prepare      # wheels + the CIFAR-10 parquet into .device/
#   there:  bash scripts/device_run.sh run          # (device tool: carry [".device"])
#
# `run` installs the carried wheels, trains configs/gpu_fast.yaml, then default.yaml for
# what is left of BUDGET_SECONDS, samples GPU utilisation, and leaves in $OUT (at most 8
# files come back): one log per run, each trained folder as a .tar.gz (checkpoints left
# out), and nvidia-smi's utilisation samples.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE_DIR=${DEVICE_DIR:-.device}
OUT=${OUT:-outputs/device}
BUDGET_SECONDS=${BUDGET_SECONDS:-480}       # training time for both runs together
DATASET=${DATASET:-$DEVICE_DIR/data}
EXTRA_ARGS=${EXTRA_ARGS:-}                  # appended to both runs, e.g. for a tiny CPU rehearsal

prepare() {
    mkdir -p "$DEVICE_DIR/wheels" "$DEVICE_DIR/data"
    grep -qxF "/$DEVICE_DIR/" .git/info/exclude 2>/dev/null || echo "/$DEVICE_DIR/" >> .git/info/exclude
    # The device's python3 is 3.12 with pyarrow, pandas, fsspec and xxhash already there.
    pip download --no-deps --only-binary=:all: --python-version 3.12 -d "$DEVICE_DIR/wheels" \
        "datasets==$(python -c 'import datasets; print(datasets.__version__)')" dill multiprocess
    cp ../shared/data/cifar10/train-00000-of-00001.parquet "$DEVICE_DIR/data/"
    du -sh "$DEVICE_DIR"
}

train() {  # name config seconds
    local name=$1 config=$2 seconds=$3
    local minutes
    minutes=$(python -c "print(max($seconds, 1) / 60)")
    echo "== $name: $config for at most $minutes min" | tee -a "$OUT/summary.log"
    # shellcheck disable=SC2086
    python run_train.py --config "$config" --dataset_name "$DATASET" --output_dir "$WORK/$name" \
        --max_train_minutes "$minutes" --report_to none $EXTRA_ARGS 2>&1 | tr '\r' '\n' | grep -v '^train: ' > "$OUT/$name.log" || true
    if [ -f "$WORK/$name/all_results.json" ]; then
        cat "$WORK/$name/all_results.json" >> "$OUT/summary.log"
        tar czf "$OUT/$name.tar.gz" -C "$WORK" --exclude "$name/checkpoints" --exclude "$name/tensorboard" "$name"
    else
        tail -n 20 "$OUT/$name.log" >> "$OUT/summary.log"
    fi
}

run() {
    mkdir -p "$OUT"
    WORK=$(mktemp -d)
    if compgen -G "$DEVICE_DIR/wheels/*.whl" > /dev/null; then
        python -m pip install --no-index --no-deps -q "$DEVICE_DIR"/wheels/*.whl
    fi
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 1 > "$OUT/gpu_utilisation.csv" &
        SMI=$!
        trap 'kill $SMI 2>/dev/null || true' EXIT
    fi
    local start elapsed
    start=$(date +%s)
    train gpu_fast configs/gpu_fast.yaml 60
    elapsed=$(( $(date +%s) - start ))
    # What is left, less a margin for start-up, evaluation and saving.
    train default default.yaml $(( BUDGET_SECONDS - elapsed - 60 ))
    echo "== done in $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.log"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
