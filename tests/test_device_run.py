"""scripts/device_run.sh, rehearsed on the CPU with a tiny model and budget: it trains the
fast GPU config, then default.yaml, and leaves logs and trained folders in $OUT."""

import subprocess
import tarfile

from tests.conftest import PROJECT_ROOT

TINY = ("--image_size 16 --backbone_hidden_sizes 8,16 --backbone_layers_per_stage 1 --hidden_size 16 "
        "--num_attention_heads 2 --num_hidden_layers 1 --intermediate_size 16 --per_device_train_batch_size 4 "
        "--per_device_eval_batch_size 8 --num_train_epochs 2 --torch_compile false --mixed_precision no "
        "--train_val_split 0.2")


def test_device_run_trains_both_configs_into_out(dataset_dir, tmp_path, env):
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", "scripts/device_run.sh", "run"],
        cwd=PROJECT_ROOT,
        env={**env, "OUT": str(out), "DATASET": str(dataset_dir), "BUDGET_SECONDS": "90",
             "DEVICE_DIR": str(tmp_path / "no_wheels"), "EXTRA_ARGS": TINY},
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert {"gpu_fast.log", "gpu_fast.tar.gz", "default.log", "default.tar.gz", "summary.log"} <= names
    assert len(names) <= 8  # the device tool brings back at most 8 files
    for run in ("gpu_fast", "default"):
        with tarfile.open(out / f"{run}.tar.gz") as archive:
            members = set(archive.getnames())
        assert {f"{run}/model.safetensors", f"{run}/config.json", f"{run}/training_log.json"} <= members
        assert not any("/checkpoints/" in name for name in members)
    summary = (out / "summary.log").read_text()
    assert summary.count('"eval_accuracy"') == 2 and "== done" in summary


def test_device_run_rejects_unknown_commands():
    result = subprocess.run(["bash", "scripts/device_run.sh", "fly"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr
