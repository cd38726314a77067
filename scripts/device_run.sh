#!/usr/bin/env bash
# The whole GPU run in one call, for a lent machine that has torch, transformers and
# accelerate but not `datasets`, and no network:
#
#   here:   bash scripts/device_run.sh prepare      # wheels + the CIFAR-10 parquet into .device/
#   there:  bash scripts/device_run.sh run          # (device tool: carry [".device"])
#
# `run` installs the carried wheels, measures both configs with benchmark.py (for the
# record), trains configs/gpu_fast.yaml for FAST_SECONDS, then default.yaml for what is left
# of BUDGET_SECONDS, each with `--num_train_epochs auto` so that the loop sizes its own
# schedule from the speed it measures, samples GPU utilisation, and leaves in $OUT (at most
# 8 files come back): summary.log, benchmark.json, one log per run, each trained folder as
# a .tar.gz (checkpoints left out), and nvidia-smi's utilisation samples.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE_DIR=${DEVICE_DIR:-.device}
OUT=${OUT:-outputs/device}
PY=${PYTHON:-python3}                       # the device image has python3, not always python
BUDGET_SECONDS=${BUDGET_SECONDS:-480}       # wall-clock for the whole run, set-up and both runs included
FAST_SECONDS=${FAST_SECONDS:-60}            # gpu_fast.yaml's training-time limit; 0 skips that run (all the budget to default.yaml)
RESERVE_SECONDS=${RESERVE_SECONDS:-75}      # default.yaml's start-up, evaluations and saving
BENCHMARK=${BENCHMARK:-1}                   # 0: skip benchmark.py (about 70 s on the H200)
BENCH_ARGS=${BENCH_ARGS:---batch_size 512 --inference_batch_size 256 --warmup 5 --repeats 20 --max_samples 8192 --matmul_size 8192}
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
    minutes=$("$PY" -c "print(max($seconds, 1) / 60)")
    echo "== $name: $config, its schedule fitted to $minutes min" | tee -a "$OUT/summary.log"
    # shellcheck disable=SC2086
    "$PY" run_train.py --config "$config" --dataset_name "$DATASET" --output_dir "$WORK/$name" \
        --num_train_epochs auto --max_train_minutes "$minutes" --report_to none $EXTRA_ARGS 2>&1 \
        | tr '\r' '\n' | grep -v '^train: ' > "$OUT/$name.log" || true
    if [ -f "$WORK/$name/all_results.json" ]; then
        cat "$WORK/$name/all_results.json" >> "$OUT/summary.log"
        tar czf "$OUT/$name.tar.gz" -C "$WORK" --exclude "$name/checkpoints" --exclude "$name/tensorboard" "$name"
    else
        tail -n 20 "$OUT/$name.log" >> "$OUT/summary.log"
    fi
}

run() {
    local start
    start=$(date +%s)
    mkdir -p "$OUT"
    WORK=$(mktemp -d)
    if compgen -G "$DEVICE_DIR/wheels/*.whl" > /dev/null; then
        # Into a folder of its own, not the image's environment, as the device README advises.
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$DEVICE_DIR"/wheels/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
    "$PY" -c "import sys, torch, torchvision, transformers, accelerate, datasets, pyarrow
print('python', sys.version.split()[0], '| torch', torch.__version__, '| torchvision', torchvision.__version__,
      '| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| datasets', datasets.__version__,
      '| pyarrow', pyarrow.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" \
        2>&1 | tee -a "$OUT/summary.log"
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv >> "$OUT/summary.log" || true
        nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 1 > "$OUT/gpu_utilisation.csv" &
        SMI=$!
        trap 'kill $SMI 2>/dev/null || true' EXIT
    fi
    # Each config's full training step, input pipeline included, for the record.
    # shellcheck disable=SC2086
    [ "$BENCHMARK" = 0 ] || "$PY" benchmark.py --configs configs/gpu_fast.yaml default.yaml --models hybrid-vit --mixed_precision bf16 \
        --channels_last --dataset_name "$DATASET" $BENCH_ARGS --output_json "$OUT/benchmark.json" \
        --output_md "$WORK/benchmark.md" > "$WORK/benchmark.log" 2>&1 || tail -n 20 "$WORK/benchmark.log" >> "$OUT/summary.log"
    cat "$WORK/benchmark.md" >> "$OUT/summary.log" 2>/dev/null || true
    echo "== set-up and benchmark took $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.log"
    [ "$FAST_SECONDS" = 0 ] || train gpu_fast configs/gpu_fast.yaml "$FAST_SECONDS"
    # What is left, less a margin for start-up, evaluation and saving.
    train default default.yaml $(( BUDGET_SECONDS - ($(date +%s) - start) - RESERVE_SECONDS ))
    echo "== done in $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.log"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
