"""What this machine is and what it runs natively: its name for results and cards, and the
precision `mixed_precision: auto` picks (bf16 where the hardware runs it natively, float32
elsewhere)."""

import copy
import itertools
import os
import platform
import time
from pathlib import Path

import torch


def cpuinfo_field(name: str) -> str | None:
    """The first `name : value` line's value in /proc/cpuinfo (Linux), or None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == name:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_vector_extension() -> str:
    """The widest matrix or vector extension the CPU has, which decides its speed in each
    precision: AMX, AVX-512 BF16 (both run bf16 natively), AVX-512 or AVX2 (bf16 emulated)."""
    flags = (cpuinfo_field("flags") or "").split()
    for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2")):
        if flag in flags:
            return name
    return torch.backends.cpu.get_cpu_capability()


def description(num_processes: int = 1) -> str:
    """The hardware a run trained on, in words."""
    if torch.cuda.is_available():
        return f"{num_processes} x {torch.cuda.get_device_name(0)}"
    return f"{num_processes} process(es) on CPU: {cpu_name()} ({cpu_vector_extension()}), {os.cpu_count()} cores"


def bf16_matmul_speedup(size: int = 256, repeats: int = 3) -> float:
    """How many times as fast a size x size bfloat16 matrix product runs as a float32 one on
    this CPU: about 2-4 where bf16 is native (AVX-512 BF16, AMX), about 0.002-0.01 where it is
    emulated (AVX2 only). Timing is the honest test: a capability flag says what the CPU has,
    not what PyTorch's kernels make of it. Costs well under a second either way."""

    def seconds(dtype, limit=None):
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        a @ b  # warm-up: the first call also generates (JIT-compiles) the kernel
        start = time.perf_counter()
        a @ b  # already the measurement, when it is far too slow
        best = time.perf_counter() - start
        if limit is not None and best > limit:
            return best
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        return best

    float32 = seconds(torch.float32)
    return float32 / seconds(torch.bfloat16, limit=50 * float32)


def choose_mixed_precision(requested: str, device: torch.device, bf16_speedup=None) -> tuple[str, str]:
    """Accelerate's mixed_precision ("bf16" or "no") for `requested` (auto, bf16 or no), and
    why, in words. `auto` takes bf16 where the device runs it natively: a CUDA GPU of compute
    capability 8.0 or more (A100, H100; not a T4 or V100, which only emulate it), or a CPU
    whose bf16 matrix products are at least as fast as float32's (timed: `bf16_speedup`,
    measured when None); float32 elsewhere."""
    if requested == "no":
        return "no", "as set"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16", (f"{name} runs bf16 natively" if requested == "auto" else "as set")
        emulated = f"{name} has no native bf16 (compute capability below 8.0)"
        return ("bf16", f"as set, although {emulated}") if requested == "bf16" else ("no", f"float32: {emulated}")
    if device.type != "cpu":
        return ("bf16", "as set") if requested == "bf16" else ("no", f"float32 on {device.type}")
    speedup = bf16_matmul_speedup() if bf16_speedup is None else bf16_speedup
    capability = torch.backends.cpu.get_cpu_capability()
    if speedup >= 1.0:
        return "bf16", (f"bf16 matrix products run {speedup:.1f}x as fast as float32 on this CPU ({capability}): native"
                        if requested == "auto" else "as set")
    emulated = f"bf16 is emulated on this CPU ({capability}): its matrix products run {1 / speedup:.0f}x slower than float32"
    return ("bf16", f"as set, although {emulated}") if requested == "bf16" else ("no", f"float32: {emulated}")


def resolve_mixed_precision(requested: str) -> tuple[str, str]:
    """choose_mixed_precision for the device this process trains on, decided by the
    main process, so that every process of a run agrees."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, parse_flag_from_env

    # The state is shared: it must be made as the Accelerator would make it.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    choice = list(choose_mixed_precision(requested, state.device)) if state.is_main_process else [None, None]
    if state.num_processes > 1:
        broadcast_object_list(choice)
    return choice[0], choice[1]


def use_every_core(device: torch.device, num_processes: int, log=print) -> None:
    """Give a CPU process its share of the physical cores when `accelerate launch` left it one.

    Without `--cpu` (or `use_cpu` in its config), `accelerate launch` sets OMP_NUM_THREADS=1, as
    it should for a process that feeds a GPU; on a machine without one the training then runs on
    a single core. Accelerate's own rule for CPU training (physical cores divided among its
    processes) is applied instead, and logged."""
    import psutil

    launched_without_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("false", "0", "no")
    threads = max((psutil.cpu_count(logical=False) or 1) // num_processes, 1)
    if device.type != "cpu" or not launched_without_cpu or threads <= torch.get_num_threads():
        return
    torch.set_num_threads(threads)
    log(f"{threads} threads per process: accelerate launch set OMP_NUM_THREADS=1, which leaves a CPU run on one core")


def seconds_per_training_step(step, dataloader, model, optimizers, device, warmup=3, timed=10) -> tuple[float, float]:
    """Seconds per call of `step(batch)` (a whole training step) on batches of `dataloader`,
    timed over `timed` steps after `warmup` (first-call costs: allocation, autotuning), and the
    seconds the measurement took. Its effects are undone: the model's weights and buffers, the
    optimisers' state and the global RNG are restored, so what follows runs as if it never had."""
    saved_model = copy.deepcopy(model.state_dict())
    saved_optimizers = [copy.deepcopy(optimizer.state_dict()) for optimizer in optimizers]
    cuda = [device] if device.type == "cuda" else []

    def clock():  # the time once queued GPU work is done
        for gpu in cuda:
            torch.cuda.synchronize(gpu)
        return time.perf_counter()

    start = timed_start = time.perf_counter()
    with torch.random.fork_rng(devices=cuda):
        batches = itertools.chain.from_iterable(itertools.repeat(dataloader))
        for done, batch in enumerate(itertools.islice(batches, warmup + timed)):
            step(batch)
            if done + 1 == warmup:
                timed_start = clock()
        seconds = (clock() - timed_start) / timed
    model.load_state_dict(saved_model)
    for optimizer, saved in zip(optimizers, saved_optimizers):
        optimizer.load_state_dict(saved)
        optimizer.zero_grad(set_to_none=True)
    return seconds, time.perf_counter() - start
