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
        "--per_device_eval_batch_size 8 --torch_compile false --mixed_precision no "
        "--train_val_split 0.2")


def test_device_run_trains_both_configs_into_out(dataset_dir, tmp_path, env):
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", "scripts/device_run.sh", "run"],
        cwd=PROJECT_ROOT,
        env={**env, "OUT": str(out), "DATASET": str(dataset_dir), "BUDGET_SECONDS": "90", "PYTHON": sys.executable,
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
    # benchmark.py measured both configs for the record; each run sized its own schedule
    measured = {row["config"] for row in json.loads((out / "benchmark.json").read_text())["results"]}
    assert measured == {"configs/gpu_fast.yaml", "default.yaml"}
    assert "== gpu_fast: configs/gpu_fast.yaml, its schedule fitted to 1.0 min" in summary, summary
    fast_log = (out / "gpu_fast.log").read_text()
    assert "schedule fitted to 1 min" in fast_log, fast_log[-2000:]
    for results in re.findall(r"^\{.*?^\}", summary, flags=re.S | re.M):
        assert json.loads(results)["schedule_fitted_to_time"] is True


def test_device_run_rejects_unknown_commands():
    result = subprocess.run(["bash", "scripts/device_run.sh", "fly"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr


def test_device_run_gives_the_whole_budget_to_default_yaml_when_fast_seconds_is_0(dataset_dir, tmp_path, env):
    """FAST_SECONDS=0 skips gpu_fast.yaml and benchmark.py (BENCHMARK=0): default.yaml alone
    gets what the budget leaves (40 s less set-up less a 30 s reserve, at most 10 s), fitted
    by the loop itself; EXTRA_ARGS reach it (a seed and no per-epoch checkpoints, as for a
    release run)."""
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", "scripts/device_run.sh", "run"],
        cwd=PROJECT_ROOT,
        env={**env, "OUT": str(out), "DATASET": str(dataset_dir), "BUDGET_SECONDS": "40", "RESERVE_SECONDS": "30",
             "PYTHON": sys.executable, "DEVICE_DIR": str(tmp_path / "no_wheels"), "BENCHMARK": "0", "FAST_SECONDS": "0",
             "EXTRA_ARGS": TINY + " --seed 0 --checkpointing_steps null"},
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert not any(name.startswith("gpu_fast") for name in names) and "default.tar.gz" in names
    assert "benchmark.json" not in names
    summary = (out / "summary.log").read_text()
    assert summary.count('"eval_accuracy"') == 1 and "== gpu_fast" not in summary
    minutes = float(re.search(r"== default: default\.yaml, its schedule fitted to ([0-9.]+) min", summary).group(1))
    assert 0 < minutes <= 10 / 60
    results = json.loads(re.search(r"^\{.*?^\}", summary, flags=re.S | re.M).group(0))
    assert results["schedule_fitted_to_time"] and results["train_seconds"] <= 1.1 * 60 * minutes + 1e-6
    with tarfile.open(out / "default.tar.gz") as archive:
        config = archive.extractfile("default/train_config.yaml").read().decode()
    assert "seed: 0" in config and "checkpointing_steps: null" in config and "num_train_epochs: auto" in config
