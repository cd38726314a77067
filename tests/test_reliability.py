"""Training loses nothing and says plainly what went wrong: SIGKILL and resume, checkpoints
cut short, unwritable output, corrupt images, non-finite losses, damaged model folders."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from configuration_hybrid_vit import HybridViTConfig
from modeling_hybrid_vit import HybridViTForImageClassification, save_model_and_processor
from tests.conftest import PROJECT_ROOT, TINY_MODEL, make_image_dataset, run_isolated
from tests.test_training import base_args, train


def test_sigkill_then_resume_latest_saves_the_uninterrupted_model(dataset_dir, tmp_path, env):
    """Killed just after a checkpoint at the end of an epoch (after its evaluation), then
    resumed: the saved model and the training log are the uninterrupted run's."""
    args = ["--max_train_steps=24", "--checkpointing_steps=2", "--per_device_train_batch_size=6"]  # 4 steps an epoch
    reference = tmp_path / "reference"
    result = train(base_args(dataset_dir, reference, *args), env)
    assert result.returncode == 0, result.stderr[-3000:]

    killed = tmp_path / "killed"
    command = [sys.executable, str(PROJECT_ROOT / "run_train.py"), *base_args(dataset_dir, killed, *args)]
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while not (killed / "checkpoints" / "step_12").exists():
            assert process.poll() is None, "the run finished before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared in time"
            time.sleep(0.002)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "all_results.json").exists() and not (killed / "model.safetensors").exists()

    resumed = train(base_args(dataset_dir, killed, *args, "--resume_from_checkpoint=latest"), env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    a, b = load_file(str(killed / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    logs = [json.loads((out / "training_log.json").read_text()) for out in (killed, reference)]
    killed_log, reference_log = ([{k: v for k, v in e.items() if k != "train_seconds"} for e in log] for log in logs)
    assert killed_log == reference_log
    assert [e["epoch"] for e in logs[0] if "eval_accuracy" in e] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # no evaluation skipped


def test_resume_latest_reports_a_checkpoint_cut_short(dataset_dir, tmp_path, env):
    out = tmp_path / "run"
    args = ["--max_train_steps=4", "--checkpointing_steps=2"]
    assert train(base_args(dataset_dir, out, *args), env).returncode == 0
    # A crash during save_state leaves a folder without its trainer_state.json, written last.
    cut = out / "checkpoints" / "step_6"
    cut.mkdir()
    (cut / "model.safetensors").write_bytes(b"\0" * 10)
    result = train(base_args(dataset_dir, out, "--max_train_steps=6", "--checkpointing_steps=2", "--resume_from_checkpoint=latest"), env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"ignoring incomplete checkpoint {cut}" in result.stderr
    assert f"resuming from {out / 'checkpoints' / 'step_4'}" in result.stderr
    assert (cut / "trainer_state.json").is_file()  # written afresh, whole


def test_resume_latest_with_no_checkpoint_starts_afresh_and_its_card_says_no_resume(dataset_dir, tmp_path, env):
    """A first evening of a long run may already pass --resume_from_checkpoint latest: it starts from
    scratch, and its card gives the command without the flag and does not call it resumed."""
    out = tmp_path / "run"
    result = train(base_args(dataset_dir, out, "--max_train_steps=2", "--resume_from_checkpoint=latest"), env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"no complete checkpoint in {out / 'checkpoints'}; starting from scratch" in result.stderr
    command = next(line for line in (out / "README.md").read_text().splitlines() if line.startswith("- Command:"))
    assert command.startswith("- Command: `python run_train.py ") and command.endswith("--max_train_steps=2`"), command


def test_an_unwritable_output_folder_is_reported_before_training(dataset_dir, tmp_path, env):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = train(base_args(dataset_dir, blocker / "out", "--max_train_steps=2"), env)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: output folder {blocker / 'out'} is not writable"), last
    assert "train:" not in result.stderr  # no step was run
    assert blocker.read_text() == "not a folder"


@pytest.fixture(scope="module")
def corrupt_dataset(tmp_path_factory):
    """Like the tiny dataset, with the image of row 5 replaced by bytes that are no image."""
    from datasets import ClassLabel, Dataset, Features, Image

    folder = tmp_path_factory.mktemp("corrupt")
    good = make_image_dataset(num_per_class=10).cast_column("img", Image(decode=False))
    rows = good.to_dict()
    rows["img"][5] = {"bytes": b"this is not a png", "path": None}
    features = Features({"img": Image(), "label": ClassLabel(names=["class_0", "class_1", "class_2"])})
    Dataset.from_dict(rows, features=features).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    return folder


def test_a_corrupt_image_is_named_by_index_or_skipped_and_counted(corrupt_dataset, tmp_path, env):
    args = ["--max_train_steps=2", "--train_val_split=0.2"]
    out = tmp_path / "stopped"
    result = train(base_args(corrupt_dataset, out, *args), env)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "cannot decode the image at dataset index" in last and "--skip_bad_images" in last, last
    assert "Traceback" not in result.stderr and not out.exists()

    out = tmp_path / "skipped"
    result = train(base_args(corrupt_dataset, out, *args, "--skip_bad_images=true"), env)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    if results["eval_samples"] == 6:  # the bad image landed in the training split
        assert results["num_skipped_images"] == 1
    else:  # it landed in validation, where it is left out too
        assert results["eval_samples"] == 5 and results["num_skipped_images"] == 0


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(dataset_dir, tmp_path, env):
    # One step an epoch: step 1 is evaluated and checkpointed, and learning rates of 1e30
    # make the loss at step 2 NaN.
    out = tmp_path / "run"
    args = ["--per_device_train_batch_size=24", "--learning_rate=1e30", "--transformer_learning_rate=1e30", "--warmup_ratio=0",
            "--max_train_steps=5", "--checkpointing_steps=1"]
    result = train(base_args(dataset_dir, out, *args), env)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the loss became nan at step 2"), last
    assert str(out / "checkpoints" / "step_1") in last
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1"]
    assert not (out / "model.safetensors").exists()  # no model is saved from a run that failed
    step_1 = load_file(str(out / "checkpoints/step_1/model.safetensors"))
    assert all(torch.isfinite(tensor).all() for tensor in step_1.values() if tensor.is_floating_point())


@pytest.fixture
def saved_folder(tmp_path):
    folder = tmp_path / "model"
    save_model_and_processor(HybridViTForImageClassification(HybridViTConfig(**TINY_MODEL)), folder)
    return folder


def load_in_fresh_process(folder, cwd):
    return run_isolated(
        f"""
        from transformers import AutoModelForImageClassification
        try:
            AutoModelForImageClassification.from_pretrained({str(folder)!r}, trust_remote_code=True)
        except Exception as error:
            print(type(error).__name__ + ": " + str(error).splitlines()[0])
        else:
            print("loaded")
        """,
        cwd=cwd,
    )


def test_a_truncated_or_wrong_weights_file_gives_a_clear_error(saved_folder, tmp_path):
    weights = saved_folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    result = load_in_fresh_process(saved_folder, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    message = result.stdout.strip().splitlines()[-1]
    assert message != "loaded" and "safetensors" in message.lower() or "deserializ" in message.lower(), message

    weights.write_bytes(b"PK\x03\x04 a zip file, not safetensors")
    message = load_in_fresh_process(saved_folder, tmp_path).stdout.strip().splitlines()[-1]
    assert message != "loaded", message


def test_a_config_with_invalid_values_gives_a_clear_error(saved_folder, tmp_path):
    config = json.loads((saved_folder / "config.json").read_text())
    config["num_attention_heads"] = 3  # 16 is not divisible by 3
    (saved_folder / "config.json").write_text(json.dumps(config))
    message = load_in_fresh_process(saved_folder, tmp_path).stdout.strip().splitlines()[-1]
    assert message.startswith("ValueError: `hidden_size` (16) must be divisible by `num_attention_heads` (3)"), message


def test_nothing_in_the_project_loads_pickles():
    """Weights go through safetensors only; no script unpickles a file."""
    offenders = []
    for path in PROJECT_ROOT.glob("*.py"):
        source = path.read_text()
        for needle in ("torch.load(", "pickle.load", "pickle.loads", "weights_only=False", "use_safetensors=False"):
            if needle in source:
                offenders.append(f"{path.name}: {needle}")
    assert offenders == []
