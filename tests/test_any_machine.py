"""Right on any machine: `mixed_precision: auto` picks a precision the hardware runs
natively, and `num_train_epochs: auto` fits the learning-rate schedule to
`max_train_minutes` from the run's own measured speed, exactly resumable."""

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import run_train
from tests.conftest import PROJECT_ROOT
from tests.test_training import assert_same_weights, base_args, train, weights

# On an x86 CPU with native bf16 these cap oneDNN and ATen at AVX2, where bf16 is emulated,
# as on an AVX2-only host (where they change nothing).
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


@pytest.mark.parametrize(
    "requested, speedup, expected",
    [("auto", 0.004, "no"), ("auto", 3.0, "bf16"), ("bf16", 0.004, "bf16"), ("no", 3.0, "no"), ("fp16", 3.0, "fp16")],
)
def test_auto_takes_bf16_on_a_cpu_only_where_it_is_native(requested, speedup, expected):
    choice, reason = run_train.choose_mixed_precision(requested, torch.device("cpu"), bf16_speedup=speedup)
    assert choice == expected
    if speedup < 1 and requested in ("auto", "bf16"):
        assert "emulated" in reason and "250x slower" in reason  # the measured slowdown, named
    if requested == "auto" and speedup > 1:
        assert "native" in reason


@pytest.mark.parametrize("bf16_supported, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_a_cuda_gpu_takes_bf16_where_supported_else_fp16(monkeypatch, bf16_supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "a GPU")
    assert run_train.choose_mixed_precision("auto", torch.device("cuda"))[0] == expected
    assert run_train.choose_mixed_precision("bf16", torch.device("cuda")) == ("bf16", "as set")


def test_the_timed_matrix_product_tells_native_from_emulated_bf16():
    """On this machine's own CPU: the measurement and the flags agree. A CPU with AVX-512
    BF16 or AMX runs bf16 natively; one without emulates it (far slower than float32)."""
    speedup = run_train.bf16_matmul_speedup()
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if platform.machine() in ("x86_64", "AMD64") and flags:
        native = "avx512_bf16" in flags or "amx_bf16" in flags
        assert (speedup >= 1.0) == native, speedup


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="AVX2 is an x86 instruction set")
def test_auto_trains_in_float32_where_bf16_is_emulated_and_bf16_warns(dataset_dir, tmp_path, env):
    for requested, expected in (("auto", "no"), ("bf16", "bf16")):
        out = tmp_path / requested
        result = train(base_args(dataset_dir, out, "--max_train_steps=2", f"--mixed_precision={requested}"), {**env, **AVX2_ONLY})
        assert result.returncode == 0, result.stderr[-3000:]
        results = json.loads((out / "all_results.json").read_text())
        assert results["mixed_precision"] == expected
        assert "emulated" in results["mixed_precision_reason"]
        assert f"mixed precision: {expected} (" in result.stderr  # the choice and the reason, in the log
        warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: --mixed_precision bf16")]
        assert len(warnings) == (requested == "bf16"), result.stderr[-2000:]
        if warnings:
            assert "x slower than float32" in warnings[0]


BUDGET_MINUTES = 0.1  # 6 s: a few hundred steps of the tiny model


def budgeted_args(dataset_dir, out, *extra):
    return base_args(dataset_dir, out, "--num_train_epochs=auto", f"--max_train_minutes={BUDGET_MINUTES}", "--warmup_ratio=0.1", *extra)


def test_a_budgeted_run_ends_its_schedule_within_the_budget(dataset_dir, tmp_path, env):
    out = tmp_path / "run"
    result = train(budgeted_args(dataset_dir, out, "--checkpointing_steps=null"), env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "schedule fitted to 0.1 min" in result.stderr
    results = json.loads((out / "all_results.json").read_text())
    schedule = results["schedule"]
    assert results["schedule_fitted_to_time"] and schedule["fitted"] and schedule["refitted"]
    assert schedule["refits"] == run_train.REFIT_EPOCHS == 2  # after epochs 1 and 2
    # It is the run's own speed that sized it: many epochs of the 6-step epoch, not a default.
    assert results["max_train_steps"] == schedule["max_train_steps"] > 30
    budget = 60 * BUDGET_MINUTES
    seconds_per_step = results["train_seconds"] / results["steps"]
    # At the speed the first epoch ran at, the re-fitted schedule fits the budget (the fit aims at
    # 95% of it and re-fits only past 2%). The speed after the re-fit is the machine's business: a
    # loaded CI machine ran 16 ms steps 40% slower than its first epoch, and the safety stop is
    # what bounds that case.
    assert results["max_train_steps"] * schedule["epoch_seconds_per_step"] <= budget, results
    # The safety stop ends the run on the first step past 110% of the budget, whatever the load.
    assert results["train_seconds"] <= 1.1 * budget + 2 * seconds_per_step, results
    assert results["train_seconds"] >= 0.5 * budget, results  # and it used the budget
    last = [entry for entry in json.loads((out / "training_log.json").read_text()) if "learning_rate" in entry][-1]
    assert last["step"] == results["steps"]
    if results["stopped_by_time_limit"]:  # the machine slowed down: the schedule was nearly done
        assert results["steps"] >= 0.8 * results["max_train_steps"], results
    else:  # the schedule ran to its end, where the cosine has decayed (peak 3e-3 in base_args)
        assert results["steps"] == results["max_train_steps"]
        assert last["learning_rate"] <= 0.05 * 3e-3, last


class _Progress:
    total = 0

    def refresh(self):
        pass


def test_a_slow_first_epoch_is_given_back_by_the_second_refit():
    """The first re-fit shortens the schedule after a slow first epoch; the second, from the
    second epoch's own speed, lengthens it again, so the run still ends at the budget. A
    warmup-and-cosine schedule re-made mid-run goes on from the current step."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_cfg = {"lr_scheduler_type": "cosine", "warmup_ratio": 0.05}

    class Wrapped:  # the attribute Accelerate's prepared scheduler has
        scheduler = run_train.make_scheduler(optimizer, train_cfg, 1000, 1)

    class Accelerator:
        num_processes = 1
        device = torch.device("cpu")

        def reduce(self, tensor, reduction):
            return tensor

    loop = run_train.Loop(Accelerator(), model, [optimizer], [Wrapped()], None, {}, None, None, None, None, None, steps_per_epoch=100)
    loop.progress = _Progress()
    budget = 1000.0  # seconds; the first fit: 1 s a step, 950 steps (95% of the budget)
    state = run_train.TrainerState(step=100, train_seconds=150.0, schedule={"fitted": True, "max_train_steps": 950, "refits": 0, "refitted": False})
    run_train.refit_schedule(loop, state, train_cfg, budget, 150.0, 100, lambda message: None)  # 1.5 s a step
    assert state.schedule["max_train_steps"] == 100 + int((950 - 150) / 1.5) == 633
    assert state.schedule["refits"] == 1 and not state.schedule["refitted"]
    state.step, state.train_seconds = 200, 250.0
    run_train.refit_schedule(loop, state, train_cfg, budget, 100.0, 100, lambda message: None)  # 1.0 s a step
    assert state.schedule["max_train_steps"] == 200 + 700 == 900
    assert state.schedule["refits"] == 2 and state.schedule["refitted"]
    assert loop.progress.total == 900
    scheduler = loop.schedulers[0].scheduler
    expected = run_train.make_scheduler(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1), train_cfg, 900, 1, 200)
    assert scheduler.get_last_lr() == pytest.approx(expected.get_last_lr())
    assert 0 < scheduler.get_last_lr()[0] < 0.1


def test_killing_a_budgeted_run_and_resuming_it_gives_the_same_weights(dataset_dir, tmp_path, env):
    """A copy of an early checkpoint (after the re-fits at the ends of epochs 1 and 2) resumed without
    a break, and the run itself killed later and resumed from its latest checkpoint, end on
    the same step with identical weights: the fitted length travels in the checkpoints."""
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    args = ["--checkpointing_steps=epoch", "--checkpoints_total_limit=null"]
    process = subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "run_train.py"), *budgeted_args(dataset_dir, killed, *args)],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    try:
        while not (killed / "checkpoints" / "step_36").exists():  # 6 steps an epoch: epoch 6
            assert process.poll() is None, "the run finished before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared in time"
            time.sleep(0.005)
        time.sleep(0.3)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "all_results.json").exists()
    saved = json.loads((killed / "checkpoints/step_12/trainer_state.json").read_text())["schedule"]
    assert saved["fitted"] and saved["refitted"]

    (reference / "checkpoints").mkdir(parents=True)
    shutil.copytree(killed / "checkpoints/step_12", reference / "checkpoints/step_12")
    # The length comes from the checkpoint, not from a new fit; a roomier time limit keeps the
    # safety stop (110% of the budget) from cutting a resumed run on a busy machine.
    for out in (killed, reference):
        result = train(budgeted_args(dataset_dir, out, *args, "--resume_from_checkpoint=latest", "--max_train_minutes=1"), env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "resuming from" in result.stderr and "schedule fitted" not in result.stderr
    a, b = (json.loads((out / "all_results.json").read_text()) for out in (killed, reference))
    assert not a["stopped_by_time_limit"] and not b["stopped_by_time_limit"]
    assert a["steps"] == b["steps"] == a["max_train_steps"] == saved["max_train_steps"] > 36
    assert_same_weights(weights(killed / f"checkpoints/step_{a['steps']}"), weights(reference / f"checkpoints/step_{b['steps']}"))


def test_a_fixed_number_of_epochs_still_trains_exactly_that_many(dataset_dir, tmp_path, env):
    out = tmp_path / "run"
    result = train(base_args(dataset_dir, out, "--num_train_epochs=2", "--max_train_minutes=5"), env)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["steps"] == 12 and not results["schedule_fitted_to_time"] and not results["stopped_by_time_limit"]
