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
from types import SimpleNamespace

import pytest
import torch

import hardware
import run_train
from optimization import make_scheduler
from tests.conftest import PROJECT_ROOT
from tests.test_training import assert_same_weights, base_args, train, weights
from training_settings import ScheduleSettings

# On an x86 CPU with native bf16 these cap oneDNN and ATen at AVX2, where bf16 is emulated,
# as on an AVX2-only host (where they change nothing).
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


@pytest.mark.parametrize(
    "requested, speedup, expected",
    [("auto", 0.004, "no"), ("auto", 3.0, "bf16"), ("bf16", 0.004, "bf16"), ("no", 3.0, "no"), ("bf16", 3.0, "bf16")],
)
def test_auto_takes_bf16_on_a_cpu_only_where_it_is_native(requested, speedup, expected):
    choice, reason = hardware.choose_mixed_precision(requested, torch.device("cpu"), bf16_speedup=speedup)
    assert choice == expected
    if speedup < 1 and requested in ("auto", "bf16"):
        assert "emulated" in reason and "250x slower" in reason  # the measured slowdown, named
    if requested == "auto" and speedup > 1:
        assert "native" in reason


@pytest.mark.parametrize("name, major, expected", [("NVIDIA A100", 8, "bf16"), ("NVIDIA H100", 9, "bf16"),
                                                   ("Tesla T4", 7, "no"), ("Tesla V100", 7, "no")])
def test_auto_on_a_cuda_gpu_takes_bf16_only_where_it_is_native_not_emulated(monkeypatch, name, major, expected):
    """A T4 or V100 runs bf16 only by emulation, which torch.cuda.is_bf16_supported() counts
    as support unless asked not to: the GPU's own compute capability decides."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=major))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)  # emulation works everywhere
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: name)
    choice, reason = hardware.choose_mixed_precision("auto", torch.device("cuda"))
    assert choice == expected and name in reason
    assert hardware.choose_mixed_precision("bf16", torch.device("cuda"))[0] == "bf16"  # as set
    assert hardware.choose_mixed_precision("no", torch.device("cuda")) == ("no", "as set")


def test_the_timed_matrix_product_tells_native_from_emulated_bf16():
    """On this machine's own CPU: the measurement and the flags agree. A CPU with AVX-512
    BF16 or AMX runs bf16 natively; one without emulates it (far slower than float32)."""
    speedup = hardware.bf16_matmul_speedup()
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if platform.machine() in ("x86_64", "AMD64") and flags:
        native = "avx512_bf16" in flags or "amx_bf16" in flags
        assert (speedup >= 1.0) == native, speedup


def test_a_cpu_process_that_accelerate_launch_left_on_one_thread_gets_its_share_of_the_cores(monkeypatch):
    """`accelerate launch` without --cpu sets OMP_NUM_THREADS=1; on a CPU-only machine the run
    takes the physical cores divided among its processes instead. A run launched with --cpu or
    by plain python, or one on a GPU, keeps the threads it was given."""
    import psutil

    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 4)
    before = torch.get_num_threads()
    try:
        for launched, device, processes, expected in [("False", "cpu", 1, 4), ("False", "cpu", 2, 2), ("True", "cpu", 1, 1),
                                                      (None, "cpu", 1, 1), ("False", "cuda", 1, 1)]:
            if launched is None:
                monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
            else:
                monkeypatch.setenv("ACCELERATE_USE_CPU", launched)
            torch.set_num_threads(1)
            notes = []
            hardware.use_every_core(torch.device(device), processes, notes.append)
            assert torch.get_num_threads() == expected, (launched, device, processes)
            assert notes == ([f"{expected} threads per process: accelerate launch set OMP_NUM_THREADS=1, which leaves a CPU run "
                              "on one core"] if expected > 1 else [])
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("flags, expected", [("fpu avx2 avx512f avx512_bf16 amx_bf16", "AMX"), ("avx2 avx512f avx512_bf16", "AVX-512 BF16"),
                                              ("avx2 avx512f", "AVX-512"), ("sse4_2 avx2 fma", "AVX2")])
def test_the_hardware_a_card_names_says_which_vector_extension_set_its_speed(monkeypatch, tmp_path, flags, expected):
    """bf16 is native on AMX and AVX-512 BF16 and emulated below them: the card says which."""
    (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n")
    monkeypatch.setattr(hardware, "Path", lambda _: tmp_path / "cpuinfo")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hardware.cpu_vector_extension() == expected
    assert f"Some CPU ({expected})" in hardware.description()


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


BUDGET_MINUTES = 0.15  # 9 s: a few hundred steps of the tiny model


def budgeted_args(dataset_dir, out, *extra):
    return base_args(dataset_dir, out, "--num_train_epochs=auto", f"--max_train_minutes={BUDGET_MINUTES}", "--warmup_ratio=0.1", *extra)


def test_a_budgeted_run_ends_its_schedule_within_the_budget(dataset_dir, tmp_path, env):
    out = tmp_path / "run"
    result = train(budgeted_args(dataset_dir, out, "--checkpointing_steps=null"), env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"schedule fitted to {BUDGET_MINUTES:g} min" in result.stderr
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


def test_a_slow_first_epoch_is_given_back_by_the_second_refit():
    """The first re-fit shortens the schedule after a slow first epoch; the second, from the
    second epoch's own speed, lengthens it again, so the run still ends at the budget. A
    warmup-and-cosine schedule re-made mid-run goes on from the current step."""
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    accelerator = SimpleNamespace(num_processes=1, device=torch.device("cpu"), reduce=lambda tensor, reduction: tensor)
    loop = SimpleNamespace(accelerator=accelerator, optimizers=[optimizer], log=lambda message: None,
                           schedulers=[SimpleNamespace(scheduler=make_scheduler(optimizer, 0.05, 1000))],
                           progress=SimpleNamespace(total=0, refresh=lambda: None))
    schedule = ScheduleSettings(num_train_epochs="auto", max_train_steps=None, max_train_minutes=1000 / 60, warmup_ratio=0.05)
    # The first fit: 1 s a step, so 950 steps (95% of a 1,000 s budget).
    state = run_train.TrainerState(step=100, train_seconds=150.0, schedule={"fitted": True, "max_train_steps": 950, "refits": 0, "refitted": False})
    run_train.refit_schedule(loop, state, schedule, 150.0, 100)  # 1.5 s a step
    assert state.schedule["max_train_steps"] == 100 + int((950 - 150) / 1.5) == 633
    assert state.schedule["refits"] == 1 and not state.schedule["refitted"]
    state.step, state.train_seconds = 200, 250.0
    run_train.refit_schedule(loop, state, schedule, 100.0, 100)  # 1.0 s a step
    assert state.schedule["max_train_steps"] == 200 + 700 == 900
    assert state.schedule["refits"] == 2 and state.schedule["refitted"] and loop.progress.total == 900
    expected = make_scheduler(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1), 0.05, 900, 1, 200)
    assert loop.schedulers[0].scheduler.get_last_lr() == pytest.approx(expected.get_last_lr())
    assert 0 < expected.get_last_lr()[0] < 0.1


def test_killing_a_budgeted_run_and_resuming_it_gives_the_same_weights(dataset_dir, tmp_path, env):
    """A copy of an early checkpoint (after the re-fits at the ends of epochs 1 and 2) resumed without
    a break, and the run itself killed later and resumed from its latest checkpoint, end on
    the same step with identical weights: the fitted length travels in the checkpoints."""
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    args = ["--checkpointing_steps=epoch"]
    process = subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "run_train.py"), *budgeted_args(dataset_dir, killed, *args)],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    early = killed / "checkpoints" / "step_12"  # epoch 2 (6 steps an epoch), after both re-fits
    try:
        while not (early / "trainer_state.json").exists():
            assert process.poll() is None and time.monotonic() < deadline, "no checkpoint appeared in time"
            time.sleep(0.002)
        (reference / "checkpoints").mkdir(parents=True)  # copied before the run deletes it (two newest are kept)
        shutil.copytree(early, reference / "checkpoints/step_12")
        while not (killed / "checkpoints" / "step_36").exists():
            assert process.poll() is None, "the run finished before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared in time"
            time.sleep(0.005)
        time.sleep(0.3)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "all_results.json").exists()
    saved = json.loads((reference / "checkpoints/step_12/trainer_state.json").read_text())["schedule"]
    assert saved["fitted"] and saved["refitted"]

    # The length comes from the checkpoint, not from a new fit; a roomier time limit keeps the
    # safety stop (110% of the budget) from cutting a resumed run on a busy machine.
    for out in (killed, reference):
        result = train(budgeted_args(dataset_dir, out, *args, "--resume_from_checkpoint=latest", "--max_train_minutes=1"), env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "resuming from" in result.stderr and "schedule fitted" not in result.stderr
    a, b = (json.loads((out / "all_results.json").read_text()) for out in (killed, reference))
    assert not a["stopped_by_time_limit"] and not b["stopped_by_time_limit"]
    assert a["steps"] == b["steps"] == a["max_train_steps"] == saved["max_train_steps"] > 36
    assert_same_weights(weights(killed), weights(reference))
    command = next(line for line in (killed / "README.md").read_text().splitlines() if line.startswith("- Command:"))
    assert command.endswith("--max_train_minutes=1` (stopped and continued with `--resume_from_checkpoint latest`)"), command


def test_a_fixed_number_of_epochs_still_trains_exactly_that_many(dataset_dir, tmp_path, env):
    out = tmp_path / "run"
    result = train(base_args(dataset_dir, out, "--num_train_epochs=2", "--max_train_minutes=5"), env)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["steps"] == 12 and not results["schedule_fitted_to_time"] and not results["stopped_by_time_limit"]
