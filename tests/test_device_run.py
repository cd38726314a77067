"""scripts/device_run.sh, rehearsed on the CPU with a tiny model and budget: it trains the
fast GPU config, then default.yaml, and leaves logs and trained folders in $OUT."""

import json
import re
import subprocess
import sys
import tarfile

from tests.conftest import PROJECT_ROOT

TINY = ("--image_size 16 --backbone_hidden_sizes 8,16 --patch_size 4 --backbone_layers_per_stage 1 --hidden_size 16 "
        "--num_attention_heads 2 --num_hidden_layers 1 --intermediate_size 16 --per_device_train_batch_size 4 "
        "--per_device_eval_batch_size 8 --num_train_epochs 2 --torch_compile false --mixed_precision no "
        "--train_val_split 0.2")


def test_device_run_trains_both_configs_into_out(dataset_dir, tmp_path, env):
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", "scripts/device_run.sh", "run"],
        cwd=PROJECT_ROOT,
        env={**env, "OUT": str(out), "DATASET": str(dataset_dir), "BUDGET_SECONDS": "90", "PYTHON": sys.executable, "LOOP_SPEED": "",
             "DEVICE_DIR": str(tmp_path / "no_wheels"), "EXTRA_ARGS": TINY,
             # the full-size models, measured for a step or two on the CPU
             "BENCH_ARGS": "--batch_size 4 --inference_batch_size 4 --warmup 1 --repeats 1 --max_samples 16 --matmul_size 64"},
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert {"gpu_fast.log", "gpu_fast.tar.gz", "default.log", "default.tar.gz", "summary.log", "benchmark.json"} <= names
    assert len(names) <= 8  # the device tool brings back at most 8 files
    for run in ("gpu_fast", "default"):
        with tarfile.open(out / f"{run}.tar.gz") as archive:
            members = set(archive.getnames())
        assert {f"{run}/model.safetensors", f"{run}/config.json", f"{run}/training_log.json"} <= members
        assert not any("/checkpoints/" in name for name in members)
    summary = (out / "summary.log").read_text()
    assert summary.count('"eval_accuracy"') == 2 and "== done" in summary
    # benchmark.py measured both configs, and each schedule was sized from that speed
    measured = {row["config"] for row in json.loads((out / "benchmark.json").read_text())["results"]}
    assert measured == {"configs/gpu_fast.yaml", "default.yaml"}
    assert summary.count("epochs (fitted to the measured speed)") == 2, summary


def test_device_run_rejects_unknown_commands():
    result = subprocess.run(["bash", "scripts/device_run.sh", "fly"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr


def test_device_run_sizes_schedules_from_the_loop_speed_without_benchmarking(dataset_dir, tmp_path, env):
    """BENCHMARK=0 skips benchmark.py; LOOP_SPEED (images/s) then sizes each schedule:
    60 s x 9,000 images/s x 0.92 / 45,000 images an epoch = 11 epochs for gpu_fast.yaml."""
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", "scripts/device_run.sh", "run"],
        cwd=PROJECT_ROOT,
        env={**env, "OUT": str(out), "DATASET": str(dataset_dir), "BUDGET_SECONDS": "90", "PYTHON": sys.executable,
             "DEVICE_DIR": str(tmp_path / "no_wheels"), "EXTRA_ARGS": TINY, "BENCHMARK": "0", "LOOP_SPEED": "9000"},
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out / "benchmark.json").exists()
    summary = (out / "summary.log").read_text()
    assert "== gpu_fast: configs/gpu_fast.yaml for at most 1.0 min, 11 epochs (fitted to the measured speed)" in summary
    assert summary.count('"eval_accuracy"') == 2


def test_device_run_gives_the_whole_budget_to_default_yaml_when_fast_seconds_is_0(dataset_dir, tmp_path, env):
    """FAST_SECONDS=0 skips gpu_fast.yaml: default.yaml alone gets what the budget leaves
    (90 s less set-up less a 30 s reserve, about 60 s), sized at LOOP_SPEED with SPEED_MARGIN;
    EXTRA_ARGS reach it (a seed and no per-epoch checkpoints, as for a release run)."""
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", "scripts/device_run.sh", "run"],
        cwd=PROJECT_ROOT,
        env={**env, "OUT": str(out), "DATASET": str(dataset_dir), "BUDGET_SECONDS": "90", "RESERVE_SECONDS": "30",
             "PYTHON": sys.executable, "DEVICE_DIR": str(tmp_path / "no_wheels"), "BENCHMARK": "0", "FAST_SECONDS": "0",
             "LOOP_SPEED": "9000", "SPEED_MARGIN": "0.5", "EXTRA_ARGS": TINY + " --seed 0 --checkpointing_steps null"},
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert not any(name.startswith("gpu_fast") for name in names) and "default.tar.gz" in names
    summary = (out / "summary.log").read_text()
    assert summary.count('"eval_accuracy"') == 1 and "== gpu_fast" not in summary
    # 50-60 s x 9,000 images/s x 0.5 / 45,000 = 5-6 epochs (TINY's own --num_train_epochs, later on the line, wins)
    assert re.search(r"== default: default\.yaml for at most [0-9.]+ min, [56] epochs \(fitted", summary), summary
    with tarfile.open(out / "default.tar.gz") as archive:
        config = archive.extractfile("default/train_config.yaml").read().decode()
    assert "seed: 0" in config and "checkpointing_steps: null" in config
