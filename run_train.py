"""Train the hybrid ViT on CIFAR-10 with Accelerate.

    accelerate launch run_train.py --config default.yaml        # one GPU, many, or the CPU
    python run_train.py --config configs/cpu.yaml --dataset_name ../shared/data/cifar10

Settings come from default.yaml; `--config FILE` layers a file of overrides on top and
any `--key value` overrides one setting. Unknown keys and bad values stop the run before
anything is written. The output folder ends up a complete Hub model folder (the best
model by validation accuracy) plus a model card, all_results.json, train_config.yaml,
training_log.json and checkpoints/step_N folders for exact resumption.
"""

import itertools
import json
import math
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

DEFAULT_CONFIG = Path(__file__).resolve().with_name("default.yaml")
SECTIONS = ("model", "data", "training")
CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
# Numeric settings that also take the word `auto` (num_train_epochs: fitted to max_train_minutes).
AUTO_SETTINGS = ("num_train_epochs",)
# A schedule fitted to max_train_minutes ends at the budget; the run is stopped regardless
# only if the machine then slows down this much (the last steps' learning rate is near 0).
FITTED_TIME_LIMIT_FACTOR = 1.1
INCOMPLETE_SUFFIX = ".incomplete"


class SettingsError(ValueError):
    """A bad command line or config file; the message is one line for the user."""


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the message says what is intact."""


# --------------------------------------------------------------------------- settings


def read_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"config file not found: {path}")
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise SettingsError(f"cannot parse {path}: {str(error).splitlines()[0]}") from error
    if not isinstance(content, dict) or not all(isinstance(v, dict) for v in content.values()):
        raise SettingsError(f"{path} must map sections ({', '.join(SECTIONS)}) to settings")
    return content


def coerce(key: str, value, default):
    """Convert `value` (parsed YAML, or a command-line string) to the type of `default`;
    `validate` then checks the range."""
    if value is None:
        return None
    if key in AUTO_SETTINGS and isinstance(value, str) and value.lower() == "auto":
        return "auto"
    if default is None:  # free-typed setting (e.g. max_train_samples: null): read a number if it is one
        for kind in (int, float):
            try:
                return kind(value) if isinstance(value, str) else value
            except ValueError:
                continue
        return value
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, bool):
            return value
        raise SettingsError(f"--{key} expects true or false, got {value!r}")
    if isinstance(default, (int, float)):
        kind = float if key in AUTO_SETTINGS else type(default)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return kind(float(value)) if kind is float else int(value)
            except ValueError:
                pass
        raise SettingsError(f"--{key} expects {'a number' if kind is float else 'an integer'}, got {value!r}")
    if isinstance(default, list):
        if isinstance(value, str):
            value = [item for item in value.replace("[", "").replace("]", "").split(",") if item.strip()]
        if isinstance(value, list):
            return [coerce(key, item, default[0]) for item in value] if default else value
        raise SettingsError(f"--{key} expects a list like 64,128, got {value!r}")
    return value  # strings, and settings like checkpointing_steps that also take an integer


def parse_command_line(argv) -> list[tuple[str, str]]:
    """`--key value`, `--key=value` and bare `--flag` (true) as (key, text) pairs."""
    pairs, index = [], 0
    while index < len(argv):
        token = argv[index]
        if not token.startswith("--") or token == "--":
            raise SettingsError(f"unexpected argument {token!r}; settings are given as --key value")
        key, equals, text = token[2:].partition("=")
        if not equals:
            if index + 1 < len(argv) and not argv[index + 1].startswith("--"):
                text, index = argv[index + 1], index + 1
            else:
                text = "true"
        pairs.append((key.replace("-", "_"), text))
        index += 1
    return pairs


def load_settings(argv=None, default_path=DEFAULT_CONFIG) -> dict:
    """default.yaml, then each --config file, then --key value overrides, validated."""
    defaults = read_yaml(default_path)
    settings = {section: dict(defaults.get(section, {})) for section in SECTIONS}
    section_of = {key: section for section in SECTIONS for key in settings[section]}
    pairs = parse_command_line(sys.argv[1:] if argv is None else argv)

    for key, text in pairs:
        if key != "config":
            continue
        for section, values in read_yaml(text).items():
            if section not in SECTIONS:
                raise SettingsError(f"{text}: unknown section {section!r} (expected {', '.join(SECTIONS)})")
            for name, value in values.items():
                if name not in settings[section]:
                    raise SettingsError(f"{text}: unknown setting {section}.{name} (not in {default_path.name})")
                settings[section][name] = coerce(name, value, defaults[section][name])

    for key, text in pairs:
        if key == "config":
            continue
        if key not in section_of:
            raise SettingsError(f"unknown setting --{key} (not in {default_path.name})")
        section = section_of[key]
        value = None if text.lower() == "null" else text
        settings[section][key] = coerce(key, value, defaults[section][key])
    validate(settings)
    return settings


def _check(condition: bool, key: str, expectation: str, value):
    if not condition:
        raise SettingsError(f"--{key} must be {expectation}, got {value!r}")


def validate(settings: dict):
    from transformers import SchedulerType

    from cifar10_data import AUTO_AUGMENT_CHOICES
    from configuration_hybrid_vit import HybridViTConfig

    data, train = settings["data"], settings["training"]
    attention = settings["model"]["attn_implementation"]
    _check(attention in ("sdpa", "eager"), "attn_implementation", "sdpa or eager", attention)

    def positive_int_or_none(key, section):
        value = section[key]
        _check(value is None or (isinstance(value, int) and value > 0), key, "a positive integer or null", value)

    _check(isinstance(data["dataset_name"], str) and data["dataset_name"], "dataset_name", "a Hub id or a folder", data["dataset_name"])
    from run_folder import is_local_path

    hub_id = data["dataset_hub_id"]
    _check(hub_id is None or (isinstance(hub_id, str) and not is_local_path(hub_id)), "dataset_hub_id", "a Hub id like owner/name, or null", hub_id)
    _check(0 < data["train_val_split"] < 1, "train_val_split", "in (0, 1)", data["train_val_split"])
    positive_int_or_none("max_train_samples", data)
    positive_int_or_none("max_eval_samples", data)
    _check(data["auto_augment"] in AUTO_AUGMENT_CHOICES, "auto_augment", f"one of {AUTO_AUGMENT_CHOICES}", data["auto_augment"])
    _check(data["random_crop_padding"] >= 0, "random_crop_padding", ">= 0", data["random_crop_padding"])
    size = settings["model"]["image_size"]
    _check(isinstance(data["cutout_size"], int) and 0 <= data["cutout_size"] <= size, "cutout_size", f"an integer in [0, {size}]", data["cutout_size"])
    for key in ("mixup_alpha", "cutmix_alpha"):
        _check(data[key] >= 0, key, ">= 0", data[key])
    for key in ("mix_prob", "mix_switch_prob"):
        _check(0 <= data[key] <= 1, key, "in [0, 1]", data[key])
    _check(0 <= data["label_smoothing"] < 1, "label_smoothing", "in [0, 1)", data["label_smoothing"])
    # reflect padding needs a shift below the image size
    _check(isinstance(data["tta_shift"], int) and 0 <= data["tta_shift"] < size, "tta_shift", f"an integer in [0, {size})", data["tta_shift"])
    _check(data["dataloader_num_workers"] >= 0, "dataloader_num_workers", ">= 0", data["dataloader_num_workers"])

    _check(isinstance(train["output_dir"], str) and train["output_dir"], "output_dir", "a folder", train["output_dir"])
    epochs = train["num_train_epochs"]
    _check(epochs == "auto" or epochs > 0, "num_train_epochs", "> 0 or auto", epochs)
    positive_int_or_none("max_train_steps", train)
    _check(train["max_train_minutes"] is None or float(train["max_train_minutes"]) > 0, "max_train_minutes", "> 0 or null", train["max_train_minutes"])
    if epochs == "auto":
        _check(train["max_train_minutes"] is not None, "num_train_epochs", "a number unless --max_train_minutes is set (auto fits the schedule to that time)", epochs)
        _check(train["max_train_steps"] is None, "max_train_steps", "null with --num_train_epochs auto (the schedule is fitted to --max_train_minutes)", train["max_train_steps"])
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "logging_steps"):
        _check(isinstance(train[key], int) and train[key] > 0, key, "a positive integer", train[key])
    _check(train["learning_rate"] > 0, "learning_rate", "> 0", train["learning_rate"])
    _check(train["weight_decay"] >= 0, "weight_decay", ">= 0", train["weight_decay"])
    _check(train["optimizer"] in ("adamw", "sgd"), "optimizer", "adamw or sgd", train["optimizer"])
    for key in ("adam_beta1", "adam_beta2", "sgd_momentum", "warmup_ratio"):
        _check(0 <= train[key] < 1, key, "in [0, 1)", train[key])
    _check(train["max_grad_norm"] >= 0, "max_grad_norm", ">= 0", train["max_grad_norm"])
    init = train["model_name_or_path"]
    _check(init is None or (isinstance(init, str) and init), "model_name_or_path", "a saved model folder, a Hub id or null", init)
    teacher = train["teacher_model"]
    _check(teacher is None or (isinstance(teacher, str) and teacher), "teacher_model", "a saved model folder, a Hub id or null", teacher)
    _check(0 <= train["distillation_alpha"] <= 1, "distillation_alpha", "in [0, 1]", train["distillation_alpha"])
    _check(train["distillation_temperature"] > 0, "distillation_temperature", "> 0", train["distillation_temperature"])
    shift = train["teacher_tta_shift"]
    _check(isinstance(shift, int) and 0 <= shift < size, "teacher_tta_shift", f"an integer in [0, {size})", shift)
    _check(shift == 0 or train["teacher_flip_tta"], "teacher_tta_shift", "0 when --teacher_flip_tta is false (shifts are views of flip TTA)", shift)
    ema = train["ema_decay"]
    _check(ema is None or (isinstance(ema, (int, float)) and 0 < ema < 1), "ema_decay", "in (0, 1) or null", ema)
    schedulers = [s.value for s in SchedulerType]
    _check(train["lr_scheduler_type"] in schedulers, "lr_scheduler_type", f"one of {schedulers}", train["lr_scheduler_type"])
    _check(train["mixed_precision"] in MIXED_PRECISION_CHOICES, "mixed_precision", "auto, no, fp16 or bf16", train["mixed_precision"])
    sync = train["sync_batchnorm"]
    if isinstance(sync, str) and sync.lower() in ("true", "false"):
        sync = train["sync_batchnorm"] = sync.lower() == "true"
    _check(sync == "auto" or isinstance(sync, bool), "sync_batchnorm", "auto, true or false", sync)
    steps = train["checkpointing_steps"]
    if isinstance(steps, str) and steps.isdigit():
        steps = train["checkpointing_steps"] = int(steps)
    _check(steps is None or steps == "epoch" or (isinstance(steps, int) and steps > 0), "checkpointing_steps", "a positive integer, epoch or null", steps)
    positive_int_or_none("checkpoints_total_limit", train)
    _check(train["report_to"] in ("tensorboard", "none"), "report_to", "tensorboard or none", train["report_to"])
    _check(not train["push_to_hub"] or bool(train["hub_model_id"]), "hub_model_id", "set when --push_to_hub is true", train["hub_model_id"])
    try:
        HybridViTConfig(**settings["model"])
    except (ValueError, TypeError) as error:
        raise SettingsError(f"invalid model setting: {error}") from None


# ------------------------------------------------------------------------ checkpoints


def list_checkpoints(output_dir) -> tuple[list[Path], list[Path]]:
    """Complete checkpoints sorted by step, and incomplete ones (cut short by a crash)."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return [], []
    complete, incomplete = [], []
    for path in folder.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and (path / "trainer_state.json").is_file():
            complete.append(path)
        elif path.name.startswith("step_"):
            incomplete.append(path)
    complete.sort(key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))
    return complete, incomplete


def resolve_resume_path(resume, output_dir, log) -> Path | None:
    if resume is None:
        return None
    if resume != "latest":
        path = Path(resume)
        if not (path / "trainer_state.json").is_file():
            raise SettingsError(f"--resume_from_checkpoint {resume} is not a complete checkpoint (no trainer_state.json)")
        return path
    complete, incomplete = list_checkpoints(output_dir)
    for path in incomplete:
        log(f"ignoring incomplete checkpoint {path} (cut short when a run stopped)")
    if not complete:
        log(f"no complete checkpoint in {Path(output_dir) / 'checkpoints'}; starting from scratch")
        return None
    return complete[-1]


def save_checkpoint(accelerator, output_dir, step, state, limit, log, ema=None):
    """accelerator.save_state into step_N.incomplete, then rename: a folder named step_N
    is always complete, so `latest` can never pick a half-written one. The weight average,
    if any, goes beside it as safetensors."""
    folder = Path(output_dir) / "checkpoints"
    final, staging = folder / f"step_{step}", folder / f"step_{step}{INCOMPLETE_SUFFIX}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging), safe_serialization=True)
    if accelerator.is_main_process:
        (staging / "trainer_state.json").write_text(json.dumps(state, indent=2))
        if ema is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(staging / EMA_FILE))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        complete, _ = list_checkpoints(output_dir)
        for old in complete[: -limit] if limit else []:
            shutil.rmtree(old, ignore_errors=True)
        log(f"saved checkpoint {final}")
    accelerator.wait_for_everyone()


EMA_FILE = "ema.safetensors"


def save_best_model(model, output_dir):
    """Write the Hub folder into a staging folder, then move each file into place."""
    from modeling_hybrid_vit import save_model_and_processor

    staging = Path(output_dir) / f".best{INCOMPLETE_SUFFIX}"
    shutil.rmtree(staging, ignore_errors=True)
    save_model_and_processor(model, staging)
    for path in sorted(staging.iterdir(), key=lambda p: p.name == "model.safetensors"):
        os.replace(path, Path(output_dir) / path.name)
    staging.rmdir()


def check_output_dir_writable(output_dir):
    """Fail now, not after an hour of training."""
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise SettingsError(f"output folder {output_dir} is not writable: {error.strerror or error}") from None


# ----------------------------------------------------------------------------- train


def hardware_description(accelerator) -> str:
    if torch.cuda.is_available():
        return f"{accelerator.num_processes} x {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{accelerator.num_processes} process(es) on CPU: {cpu}, {os.cpu_count()} cores"


# ------------------------------------------------------------------ precision


MIXED_PRECISION_CHOICES = ("auto", "no", "fp16", "bf16")


def bf16_matmul_speedup(size: int = 256, repeats: int = 3) -> float:
    """How many times as fast a size x size bfloat16 matrix product runs as a float32 one
    on this CPU: about 2-4 where bf16 is native (AVX-512 BF16, AMX), about 0.002-0.01 where
    it is emulated (AVX2 only). Timing is the honest test: a capability flag says what the
    CPU has, not what PyTorch's kernels make of it. Costs well under a second either way."""
    def seconds(dtype, limit=None):
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        start = time.perf_counter()
        a @ b  # warm-up; also the measurement when it is already far too slow
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
    """Accelerate's mixed_precision (no | fp16 | bf16) for `requested`, and why, in words.

    `auto` takes bf16 where the device runs it natively (a CUDA GPU that supports it, a CPU
    whose bf16 matrix products are at least as fast as float32's), fp16 on a CUDA GPU
    without bf16, and float32 otherwise. An explicit choice is kept; `bf16_speedup`
    (measured when None) is only looked at on the CPU."""
    if device.type == "cuda":
        if requested != "auto":
            return requested, "as set"
        if torch.cuda.is_bf16_supported():
            return "bf16", f"{torch.cuda.get_device_name(device)} runs bf16 natively"
        return "fp16", f"{torch.cuda.get_device_name(device)} has no bf16: fp16 with loss scaling"
    if device.type != "cpu" or requested in ("no", "fp16"):
        return ("no" if requested == "auto" else requested), ("as set" if requested != "auto" else f"float32 on {device.type}")
    speedup = bf16_matmul_speedup() if bf16_speedup is None else bf16_speedup
    capability = torch.backends.cpu.get_cpu_capability()
    if speedup >= 1.0:
        return "bf16", f"bf16 matrix products run {speedup:.1f}x as fast as float32 on this CPU ({capability}): native"
    emulated = f"bf16 is emulated on this CPU ({capability}): its matrix products run {1 / speedup:.0f}x slower than float32"
    if requested == "bf16":
        return "bf16", f"as set, although {emulated}"
    return "no", f"float32: {emulated}"


def parameter_groups(model, weight_decay):
    """Optimiser groups: no weight decay on norms, biases, position embeddings or the CLS token."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        exempt = parameter.ndim <= 1 or name.endswith(("position_embeddings", "cls_token"))
        (no_decay if exempt else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, train_cfg) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay), or SGD with Nesterov momentum as airbench trains its
    CNN (weight decay added to the gradient, so it wants values like 5e-4, not 0.05)."""
    groups = parameter_groups(model, train_cfg["weight_decay"])
    if train_cfg["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=train_cfg["learning_rate"], momentum=train_cfg["sgd_momentum"], nesterov=True)
    return torch.optim.AdamW(groups, lr=train_cfg["learning_rate"], betas=(train_cfg["adam_beta1"], train_cfg["adam_beta2"]))


# ------------------------------------------------------------ many processes


class AllReduceBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are the whole batch's across processes.

    torch.nn.SyncBatchNorm does this on GPUs only (it refuses CPU tensors), so this class
    is written here for process groups on the CPU (gloo); on CUDA, SyncBatchNorm is used.
    Each process's per-channel sums are summed with torch.distributed.nn's differentiable
    all_reduce, so the backward pass is the whole batch's too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        C, xf = x.shape[1], x.float()
        local = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), xf.new_tensor([x.numel() / C])])
        total = all_reduce(local)  # (2C + 1,): sums over every process's images
        count = total[-1]
        mean = total[:C] / count
        var = total[C : 2 * C] / count - mean * mean  # biased: what the batch is normalised with
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * count / (count - 1), momentum)  # unbiased, as BatchNorm keeps
        shape = (1, C, 1, 1)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def synchronise_batchnorm(model: torch.nn.Module, device_type: str) -> torch.nn.Module:
    """Every BatchNorm2d made to normalise with the statistics of all processes' images:
    torch.nn.SyncBatchNorm on CUDA, AllReduceBatchNorm2d elsewhere. Parameters and buffers
    are kept (the same tensors), so the state dict and the saved model are unchanged."""
    if device_type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.BatchNorm2d:
                synced = AllReduceBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
                synced.weight, synced.bias = child.weight, child.bias
                synced.running_mean, synced.running_var = child.running_mean, child.running_var
                synced.num_batches_tracked = child.num_batches_tracked
                synced.train(child.training)
                setattr(parent, name, synced)
    return model


# ------------------------------------------------------------------- schedule


def make_scheduler(optimizer, train_cfg, total_steps: int, num_processes: int, completed_steps: int = 0):
    """transformers' get_scheduler over `total_steps` optimisation steps, standing at
    `completed_steps`: a schedule re-fitted mid-run goes on from where the run is. Steps
    count once per process, Accelerate's convention for a prepared scheduler (as in the
    transformers no_trainer examples)."""
    from transformers import get_scheduler

    scheduler = get_scheduler(
        train_cfg["lr_scheduler_type"],
        optimizer=optimizer,
        num_warmup_steps=round(train_cfg["warmup_ratio"] * total_steps) * num_processes,
        num_training_steps=total_steps * num_processes,
    )
    if completed_steps:
        scheduler.last_epoch = completed_steps * num_processes - 1
        scheduler.step()  # sets each group's learning rate for step `completed_steps`
    return scheduler


def steps_that_fit(seconds_left: float, seconds_per_step: float) -> int:
    return max(1, int(seconds_left / max(seconds_per_step, 1e-9)))


def measure_seconds_per_step(training_step, model, optimizer, dataloader, accelerator, warmup=3, timed=10) -> tuple[float, float]:
    """Seconds per optimisation step of this run's own training step on its own batches,
    timed over `timed` steps after `warmup` (first-call costs: allocation, autotuning,
    compilation), and the seconds the whole probe took. The probe's updates are undone
    (weights, BatchNorm statistics, optimiser and loss-scaler state are restored, and the
    global RNG is left as it was), so the run that follows is the run a fixed schedule of
    the same length would train: only the step count depends on the clock."""
    import copy

    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    saved_model = copy.deepcopy(unwrapped.state_dict())
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    scaler = getattr(accelerator, "scaler", None)
    saved_scaler = copy.deepcopy(scaler.state_dict()) if scaler is not None else None

    def sync():
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize(accelerator.device)

    cuda = [accelerator.device] if accelerator.device.type == "cuda" else []
    start = time.perf_counter()
    with torch.random.fork_rng(devices=cuda):
        done, timed_start = 0, None
        while done < warmup + timed:
            for batch in dataloader:
                training_step(batch)
                done += 1
                if done == warmup:
                    sync()
                    timed_start = time.perf_counter()
                if done == warmup + timed:
                    break
        sync()
        seconds_per_step = (time.perf_counter() - timed_start) / timed * accelerator.gradient_accumulation_steps
    unwrapped.load_state_dict(saved_model)
    optimizer.load_state_dict(saved_optimizer)
    optimizer.zero_grad(set_to_none=True)
    if saved_scaler is not None:
        scaler.load_state_dict(saved_scaler)
    return seconds_per_step, time.perf_counter() - start


def model_logits(model, pixel_values, flip_tta=False, tta_shift=0) -> torch.Tensor:
    """A model's float32 logits for a batch; with `flip_tta`, averaged with those of the
    mirror images (and with `tta_shift`, of both shifted; `cifar10_data.tta_views`)."""
    from cifar10_data import tta_views

    if not flip_tta:
        return model(pixel_values=pixel_values).logits.float()
    return sum(weight * model(pixel_values=view).logits.float() for view, weight in tta_views(pixel_values, tta_shift))


def evaluate(model, dataloader, accelerator, flip_tta=False, tta_shift=0) -> dict:
    """Validation loss and accuracy; gather_for_metrics drops the samples that
    distributed sampling duplicates, so each image counts exactly once. With `flip_tta`,
    the logits of each image and its mirror image are averaged; with `tta_shift` too,
    those of both shifted by that many pixels (weights from `cifar10_data.tta_views`)."""
    import torch.nn.functional as F

    model.eval()
    correct = total = 0
    loss_sum = 0.0
    # autocast for a model that prepare() did not wrap (the weight average) too
    with torch.no_grad(), accelerator.autocast():
        for batch in dataloader:
            logits = model_logits(model, batch["pixel_values"], flip_tta, tta_shift)
            losses = F.cross_entropy(logits, batch["labels"], reduction="none")
            predictions, labels, losses = accelerator.gather_for_metrics(
                (logits.argmax(-1), batch["labels"], losses)
            )
            correct += (predictions == labels).sum().item()
            total += labels.numel()
            loss_sum += losses.sum().item()
    model.train()
    return {"accuracy": correct / max(total, 1), "loss": loss_sum / max(total, 1), "samples": total}


# Settings of the model section that change how a model trains or runs, not its weights:
# they still apply when the weights (and the architecture) come from --model_name_or_path.
RUNTIME_MODEL_SETTINGS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate")


def load_saved_config(name_or_path, key):
    """The config.json of a saved model folder or Hub id, or one clear line naming --key."""
    from configuration_hybrid_vit import HybridViTConfig

    if not Path(name_or_path).is_dir() and (name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1):
        raise SettingsError(f"--{key} {name_or_path}: no such folder (nor a Hub id like owner/name)")
    try:
        return HybridViTConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SettingsError(f"--{key} {name_or_path}: {first_line}") from None


def load_teacher(name_or_path, settings, label_names, image_size, log):
    """A trained model to distil from: frozen, in eval mode (BatchNorm uses its running
    statistics), float32 weights run under the run's autocast. It must predict the same
    classes, in the same order, from images of the student's size."""
    from modeling_hybrid_vit import HybridViTForImageClassification

    config = load_saved_config(name_or_path, "teacher_model")
    teacher_labels = [config.id2label[i] for i in range(config.num_labels)]
    if teacher_labels != list(label_names):
        raise SettingsError(
            f"--teacher_model {name_or_path} predicts {teacher_labels}, but the dataset's classes are {list(label_names)}"
        )
    if config.image_size != image_size:
        raise SettingsError(
            f"--teacher_model {name_or_path} takes {config.image_size}x{config.image_size} images; this run trains on "
            f"{image_size}x{image_size}"
        )
    teacher = HybridViTForImageClassification.from_pretrained(
        name_or_path, config=config, attn_implementation=settings["model"]["attn_implementation"], dtype=torch.float32
    )
    teacher.eval().requires_grad_(False)
    train = settings["training"]
    log(
        f"distilling from {name_or_path}: loss = {1 - train['distillation_alpha']:g} x cross-entropy with the labels + "
        f"{train['distillation_alpha']:g} x T^2 KL(teacher || student) at T = {train['distillation_temperature']:g}"
        + (", the teacher's logits averaged over each image and its mirror image" if train["teacher_flip_tta"] else "")
        + (f", both also shifted by {train['teacher_tta_shift']} pixels" if train["teacher_tta_shift"] else "")
    )
    return teacher


def teacher_logits(teacher, pixel_values, accelerator, flip_tta, tta_shift=0) -> torch.Tensor:
    """The teacher's float32 logits for the student's (augmented, mixed) batch, with the
    test-time augmentation `evaluate` scores a model with, under the run's autocast."""
    with torch.no_grad(), accelerator.autocast():
        return model_logits(teacher, pixel_values, flip_tta, tta_shift)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Hinton et al.'s soft-target term: KL(teacher || student) between the two softmax
    distributions at `temperature`, averaged over the batch and scaled by T^2 so that its
    gradients keep their size as T changes."""
    import torch.nn.functional as F

    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits.float() / t, dim=-1),
        F.log_softmax(teacher_logits.float() / t, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)


def load_initial_model(name_or_path, settings, label_names, log):
    """The model to fine-tune: weights and architecture from a saved folder or a Hub id.

    As in transformers' examples, a dataset with other classes gets a new classification
    head (``ignore_mismatched_sizes``). The whitening layer keeps its fitted weights.
    """
    from modeling_hybrid_vit import HybridViTForImageClassification

    config = load_saved_config(name_or_path, "model_name_or_path")
    # validate() checked these against the model section's image size; the images are this model's size
    size, data = config.image_size, settings["data"]
    if data["cutout_size"] > size or data["tta_shift"] >= size:
        raise SettingsError(
            f"--model_name_or_path {name_or_path} takes {size}x{size} images, so cutout_size must be at most {size} "
            f"and tta_shift below {size}; got {data['cutout_size']} and {data['tta_shift']}"
        )
    for key in RUNTIME_MODEL_SETTINGS:
        setattr(config, key, settings["model"][key])
    new_head = [config.id2label[i] for i in range(config.num_labels)] != list(label_names)
    if new_head:
        config.id2label = dict(enumerate(label_names))
        config.label2id = {name: i for i, name in enumerate(label_names)}
    model = HybridViTForImageClassification.from_pretrained(
        name_or_path,
        config=config,
        attn_implementation=settings["model"]["attn_implementation"],
        ignore_mismatched_sizes=new_head,
        dtype=torch.float32,
    )
    log(
        f"starting from the weights of {name_or_path}: its architecture is used, and of the model "
        f"settings only {', '.join(RUNTIME_MODEL_SETTINGS)} and attn_implementation apply"
        + (f"; new classification head for {len(label_names)} classes" if new_head else "")
    )
    # A folder saved by run_train.py says which images it was trained on. Different split
    # settings mean this run's validation images may have been training images there.
    saved = Path(name_or_path) / "train_config.yaml"
    if saved.is_file():
        from run_folder import public_settings

        # Saved settings hold public names (the dataset's Hub id, not a local path): compare those.
        before, now = yaml.safe_load(saved.read_text()), public_settings(settings)
        keys = [("data", "dataset_name"), ("data", "train_val_split"), ("data", "max_train_samples"), ("training", "seed")]
        changed = [key for section, key in keys if before.get(section, {}).get(key) != now[section][key]]
        if changed:
            log(
                f"warning: {name_or_path} was trained with other {', '.join(changed)}; its training images may "
                "include this run's validation images, so validation accuracy may be optimistic"
            )
    return model


def resolve_mixed_precision(requested: str) -> tuple[str, str]:
    """choose_mixed_precision for the device this process will train on, decided by the
    main process, so that every process of a run agrees."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, parse_flag_from_env

    # The process's device, before the Accelerator exists. The state is shared: it must be
    # made as the Accelerator would make it (which also reads ACCELERATE_USE_CPU).
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    choice = [None, None]
    if state.is_main_process:
        choice = list(choose_mixed_precision(requested, state.device))
    if state.num_processes > 1:
        broadcast_object_list(choice)
    return choice[0], choice[1]


def train(settings: dict, command: str) -> dict:
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import is_tensorboard_available, set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    import cifar10_data
    import run_folder
    from configuration_hybrid_vit import HybridViTConfig
    from modeling_hybrid_vit import HybridViTForImageClassification, classification_loss

    data, train_cfg = settings["data"], settings["training"]
    output_dir = train_cfg["output_dir"]
    report_to = train_cfg["report_to"]
    if report_to == "tensorboard" and not is_tensorboard_available():
        print("tensorboard is not installed; metrics go to training_log.json only", file=sys.stderr)
        report_to = "none"
    precision, precision_reason = resolve_mixed_precision(train_cfg["mixed_precision"])
    try:
        accelerator = Accelerator(
            mixed_precision=precision,
            gradient_accumulation_steps=train_cfg["gradient_accumulation_steps"],
            log_with=None if report_to == "none" else report_to,
            project_dir=output_dir,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
            dynamo_backend="inductor" if train_cfg["torch_compile"] else "no",
        )
    except ValueError as error:
        raise SettingsError(f"--mixed_precision {train_cfg['mixed_precision']}: {error}") from None

    if accelerator.device.type == "cuda":
        # Fixed shapes (drop_last): let cuDNN time its convolution algorithms once and keep
        # the fastest. Exact resume is promised on the CPU only (see the README).
        torch.backends.cudnn.benchmark = True

    def log(message):
        if accelerator.is_main_process:
            tqdm.write(message, file=sys.stderr)

    if precision_reason.startswith("as set, although"):
        log(f"warning: --mixed_precision bf16: {precision_reason.removeprefix('as set, although ')}; "
            "--mixed_precision auto would train in float32")
    log(f"mixed precision: {precision} ({precision_reason})")

    seed = train_cfg["seed"]
    set_seed(seed)
    with accelerator.main_process_first():
        splits, image_column, label_column = cifar10_data.load_splits(
            data["dataset_name"],
            data["train_val_split"],
            seed,
            data["max_train_samples"],
            data["max_eval_samples"],
        )
    label_names = splits["train"].features[label_column].names
    if train_cfg["model_name_or_path"] is not None:
        model = load_initial_model(train_cfg["model_name_or_path"], settings, label_names, log)
        config = model.config
    else:
        config = HybridViTConfig(
            **settings["model"],
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
        )
        model = HybridViTForImageClassification(config)
        if config.backbone_whitening_size:
            # From training images only; on resume the checkpoint's (identical) weights replace it.
            sample = cifar10_data.normalized_images(splits["train"], image_column, label_column, config.image_size, 5000)
            model.fit_whitening(sample)
            log(f"whitening layer fitted to {len(sample)} training images")
    teacher = None
    if train_cfg["teacher_model"] is not None:
        teacher = load_teacher(train_cfg["teacher_model"], settings, label_names, config.image_size, log)
    resume_path = resolve_resume_path(train_cfg["resume_from_checkpoint"], output_dir, log)
    if accelerator.is_main_process:
        check_output_dir_writable(output_dir)
    accelerator.wait_for_everyone()

    sync = train_cfg["sync_batchnorm"]
    sync = accelerator.num_processes > 1 if sync == "auto" else sync
    if sync:
        model = synchronise_batchnorm(model, accelerator.device.type)
        log(f"BatchNorm statistics synchronised over the {accelerator.num_processes} processes' batches")
    num_parameters = model.num_parameters()
    memory_format = torch.channels_last if train_cfg["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if teacher is not None:
        teacher = teacher.to(accelerator.device, memory_format=memory_format)

    datasets, train_augmentation, skipped_at_decode = cifar10_data.build_datasets(
        splits,
        image_column,
        label_column,
        image_size=config.image_size,
        seed=seed,
        decode_once=data["decode_once"],
        device=accelerator.device,
        auto_augment=data["auto_augment"],
        random_crop_padding=data["random_crop_padding"],
        horizontal_flip=data["horizontal_flip"],
        skip_bad_images=data["skip_bad_images"],
        cutout_size=data["cutout_size"],
    )
    train_collator = cifar10_data.MixCollator(
        len(label_names), data["mixup_alpha"], data["cutmix_alpha"], data["mix_prob"], data["mix_switch_prob"], seed=seed
    )
    eval_collator = cifar10_data.MixCollator(len(label_names))
    # Decoded tensors may live on the GPU, which worker processes cannot share.
    workers = 0 if data["decode_once"] else data["dataloader_num_workers"]
    train_dataloader = DataLoader(
        datasets["train"],
        batch_size=train_cfg["per_device_train_batch_size"],
        shuffle=True,
        drop_last=True,
        collate_fn=train_collator,
        num_workers=workers,
    )
    eval_dataloaders = {
        name: DataLoader(
            datasets[name],
            batch_size=train_cfg["per_device_eval_batch_size"],
            collate_fn=eval_collator,
            num_workers=workers,
        )
        for name in ("validation", "test")
        if name in datasets
    }
    if len(train_dataloader) == 0:
        raise SettingsError(
            f"the training split has {len(splits['train'])} images, fewer than one batch "
            f"(--per_device_train_batch_size {train_cfg['per_device_train_batch_size']})"
        )

    optimizer = make_optimizer(model, train_cfg)
    ema = None
    if train_cfg["ema_decay"] is not None:
        # A copy of the model (BatchNorm statistics too) that trails the trained weights;
        # it is what gets evaluated and saved. Made before prepare, so it is a plain module.
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(
            model, device=accelerator.device, multi_avg_fn=get_ema_multi_avg_fn(train_cfg["ema_decay"]), use_buffers=True
        )
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    eval_dataloaders = {name: accelerator.prepare(loader) for name, loader in eval_dataloaders.items()}

    accumulation = train_cfg["gradient_accumulation_steps"]
    steps_per_epoch = math.ceil(len(train_dataloader) / accumulation)
    budget = None if train_cfg["max_train_minutes"] is None else 60 * float(train_cfg["max_train_minutes"])
    saved_state = json.loads((resume_path / "trainer_state.json").read_text()) if resume_path is not None else None

    def compute_loss(batch):
        pixel_values = batch["pixel_values"].contiguous(memory_format=memory_format)
        logits = model(pixel_values=pixel_values).logits
        loss = classification_loss(logits, batch["labels"], data["label_smoothing"])
        if teacher is not None:
            alpha = train_cfg["distillation_alpha"]
            soft = distillation_loss(
                logits,
                teacher_logits(teacher, pixel_values, accelerator, train_cfg["teacher_flip_tta"], train_cfg["teacher_tta_shift"]),
                train_cfg["distillation_temperature"],
            )
            loss = (1 - alpha) * loss + alpha * soft
        return loss

    def probe_step(batch):
        loss = compute_loss({key: value for key, value in batch.items() if key != "num_skipped"})
        accelerator.backward(loss)
        if train_cfg["max_grad_norm"] > 0:
            accelerator.clip_grad_norm_(model.parameters(), train_cfg["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # The schedule's length: fixed by num_train_epochs or max_train_steps, or (num_train_epochs
    # auto) fitted to max_train_minutes from this run's measured speed, re-fitted once after
    # the first epoch. A fitted length is saved in every checkpoint, so resume stays exact.
    probe_seconds = 0.0
    if train_cfg["num_train_epochs"] != "auto":
        schedule = {"fitted": False, "max_train_steps": train_cfg["max_train_steps"] or int(train_cfg["num_train_epochs"] * steps_per_epoch)}
    elif saved_state is not None and "schedule" in saved_state:
        schedule = saved_state["schedule"]
    else:
        seconds_per_step, probe_seconds = measure_seconds_per_step(probe_step, model, optimizer, train_dataloader, accelerator)
        seconds_per_step = accelerator.reduce(torch.tensor(seconds_per_step, device=accelerator.device), "mean").item()
        total = steps_that_fit(budget - probe_seconds, seconds_per_step)
        schedule = {"fitted": True, "max_train_steps": total, "first_fit_steps": total, "seconds_per_step": seconds_per_step, "refitted": False}
        log(
            f"schedule fitted to {budget / 60:g} min: {seconds_per_step * 1000:.1f} ms a step measured over 10 steps, so "
            f"{total} steps ({total / steps_per_epoch:.1f} epochs); re-fitted after the first epoch"
        )
    max_train_steps = schedule["max_train_steps"]
    # A fixed schedule stops at the time limit; a fitted one ends there by itself, and is
    # stopped only if the machine slows down by more than FITTED_TIME_LIMIT_FACTOR.
    max_seconds = None if budget is None else budget * (FITTED_TIME_LIMIT_FACTOR if schedule["fitted"] else 1.0)
    scheduler = accelerator.prepare(make_scheduler(optimizer, train_cfg, max_train_steps, accelerator.num_processes))

    completed_steps, train_seconds, best_accuracy, history, skipped = 0, probe_seconds, -1.0, [], skipped_at_decode
    if resume_path is not None:
        log(f"resuming from {resume_path}")
        accelerator.load_state(str(resume_path))
        state = saved_state
        completed_steps, train_seconds = state["step"], state["train_seconds"]
        best_accuracy, history, skipped = state["best_eval_accuracy"], state["history"], state["num_skipped_images"]
        if ema is not None:
            if not (resume_path / EMA_FILE).is_file():
                raise SettingsError(f"{resume_path} has no {EMA_FILE}: it was saved by a run without --ema_decay")
            from safetensors.torch import load_file

            ema.load_state_dict(load_file(str(resume_path / EMA_FILE), device=str(accelerator.device)))
    if report_to != "none":
        flat = {k: str(v) if isinstance(v, list) or v is None else v for s in settings.values() for k, v in s.items()}
        accelerator.init_trackers("tensorboard", config=flat)

    def trainer_state():
        return {
            "step": completed_steps,
            "train_seconds": train_seconds,
            "best_eval_accuracy": best_accuracy,
            "history": history,
            "num_skipped_images": skipped,
            "schedule": schedule,
        }

    def refit_schedule(epoch_seconds, epoch_steps):
        """After the first epoch: the steps that fit into what is left of the budget at the
        speed the epoch ran at. The schedule changes only if the first estimate was off by
        more than 2%; its warmup and decay then stretch or shrink from the current step on."""
        nonlocal max_train_steps
        measured = accelerator.reduce(torch.tensor([epoch_seconds / epoch_steps, train_seconds], device=accelerator.device), "mean")
        seconds_per_step, elapsed = measured.tolist()
        total = completed_steps + steps_that_fit(budget - elapsed, seconds_per_step) if elapsed < budget else completed_steps
        schedule.update(refitted=True, epoch_seconds_per_step=seconds_per_step)
        if abs(total - max_train_steps) > 0.02 * max_train_steps:
            log(f"schedule re-fitted: {seconds_per_step * 1000:.1f} ms a step in the first epoch, so {total} steps in all, not {max_train_steps}")
            max_train_steps = schedule["max_train_steps"] = total
            scheduler.scheduler = make_scheduler(optimizer, train_cfg, total, accelerator.num_processes, completed_steps)
            progress.total = total
            progress.refresh()

    batch_images = train_cfg["per_device_train_batch_size"] * accelerator.num_processes
    checkpointing = train_cfg["checkpointing_steps"]
    limit = train_cfg["checkpoints_total_limit"]
    log(
        f"{len(splits['train'])} training images, {len(splits['validation'])} validation"
        + (f", {len(splits['test'])} test" if "test" in splits else "")
        + f"; {num_parameters:,} parameters; {max_train_steps} steps of {batch_images * accumulation} images"
    )
    eval_model = model if ema is None else ema.module
    progress = tqdm(
        total=max_train_steps, initial=completed_steps, disable=not accelerator.is_local_main_process, desc="train"
    )
    try:
        time_up = False
        run_images, run_seconds = 0, 0.0
        for epoch in itertools.count(completed_steps // steps_per_epoch):
            if completed_steps >= max_train_steps or time_up:
                break
            epoch_start_seconds, epoch_start_steps = train_seconds, completed_steps
            train_dataloader.set_epoch(epoch)
            train_augmentation.epoch = train_collator.epoch = epoch
            skip = (completed_steps - epoch * steps_per_epoch) * accumulation
            batches = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
            model.train()
            tick = time.perf_counter()
            for micro_step, batch in enumerate(batches, start=skip):
                skipped_here = int(batch.pop("num_skipped"))
                # Dropout and stochastic depth draw from a generator seeded by the step, not
                # from a global RNG that DataLoader iterators and evaluations also consume:
                # that is what lets a resumed run repeat the uninterrupted one exactly.
                torch.manual_seed(cifar10_data.sample_seed(seed, epoch, micro_step, accelerator.process_index))
                with accelerator.accumulate(model):
                    loss = compute_loss(batch)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        elapsed = train_seconds + time.perf_counter() - tick
                        flags = torch.tensor(
                            [float(not torch.isfinite(loss.detach())), float(max_seconds is not None and elapsed >= max_seconds)],
                            device=accelerator.device,
                        )
                        if accelerator.num_processes > 1:  # every process must stop on the same step
                            flags = accelerator.reduce(flags, reduction="sum")
                        if flags[0] > 0:
                            last = list_checkpoints(output_dir)[0]
                            raise TrainingError(
                                f"the loss became {loss.item()} at step {completed_steps + 1}; stopped without updating. "
                                f"Intact: the last checkpoint ({last[-1] if last else 'none'}) and the best model in "
                                f"{output_dir} ({'none yet' if best_accuracy < 0 else f'accuracy {best_accuracy:.4f}'}). "
                                "Try a lower --learning_rate or --mixed_precision no."
                            )
                        time_up = bool(flags[1] > 0)
                        if train_cfg["max_grad_norm"] > 0:
                            accelerator.clip_grad_norm_(model.parameters(), train_cfg["max_grad_norm"])
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                skipped += skipped_here
                if not accelerator.sync_gradients:
                    continue
                completed_steps += 1
                if ema is not None:
                    ema.update_parameters(accelerator.unwrap_model(model, keep_torch_compile=False))
                now = time.perf_counter()
                train_seconds += now - tick
                run_seconds += now - tick
                run_images += batch_images * accumulation
                progress.update(1)
                if completed_steps % train_cfg["logging_steps"] == 0 or completed_steps == max_train_steps:
                    lr = scheduler.get_last_lr()[0]
                    loss_value = accelerator.reduce(loss.detach(), "mean").item()
                    progress.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", img_s=f"{run_images / max(run_seconds, 1e-9):.0f}")
                    history.append({"step": completed_steps, "epoch": completed_steps / steps_per_epoch, "train_loss": loss_value, "learning_rate": lr})
                    accelerator.log({"train/loss": loss_value, "train/learning_rate": lr}, step=completed_steps)
                if isinstance(checkpointing, int) and completed_steps % checkpointing == 0:
                    save_checkpoint(accelerator, output_dir, completed_steps, trainer_state(), limit, log, ema)
                tick = time.perf_counter()
                if completed_steps >= max_train_steps or time_up:
                    break

            if schedule["fitted"] and not schedule["refitted"] and not time_up and completed_steps < max_train_steps:
                refit_schedule(train_seconds - epoch_start_seconds, max(completed_steps - epoch_start_steps, 1))
            metrics = evaluate(eval_model, eval_dataloaders["validation"], accelerator)
            entry = {"step": completed_steps, "epoch": completed_steps / steps_per_epoch, "train_seconds": train_seconds}
            entry.update({f"eval_{k}": v for k, v in metrics.items()})
            history.append(entry)
            accelerator.log({"eval/accuracy": metrics["accuracy"], "eval/loss": metrics["loss"]}, step=completed_steps)
            log(f"epoch {entry['epoch']:.2f}: validation accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}")
            if metrics["accuracy"] > best_accuracy:
                best_accuracy = metrics["accuracy"]
                if accelerator.is_main_process:
                    save_best_model(accelerator.unwrap_model(eval_model, keep_torch_compile=False), output_dir)
                accelerator.wait_for_everyone()
            if checkpointing == "epoch" or (time_up and checkpointing is not None):
                save_checkpoint(accelerator, output_dir, completed_steps, trainer_state(), limit, log, ema)
    finally:  # leave the bar finished, so an error message is the last line
        progress.close()

    # The folder holds the best model: evaluate that one, once, on test.
    from safetensors.torch import load_file

    unwrapped = accelerator.unwrap_model(eval_model, keep_torch_compile=False)
    best_file = Path(output_dir) / "model.safetensors"
    if best_file.is_file():
        unwrapped.load_state_dict(load_file(best_file))
    elif accelerator.is_main_process:  # resumed at the very end, before any evaluation was saved
        save_best_model(unwrapped, output_dir)
    best = evaluate(eval_model, eval_dataloaders["validation"], accelerator)
    best_tta = evaluate(eval_model, eval_dataloaders["validation"], accelerator, flip_tta=True)
    shift = data["tta_shift"]
    best_shift_tta = evaluate(eval_model, eval_dataloaders["validation"], accelerator, flip_tta=True, tta_shift=shift) if shift else None
    results = {
        "eval_accuracy": best["accuracy"],
        "eval_accuracy_flip_tta": best_tta["accuracy"],
        "eval_accuracy_flip_shift_tta": best_shift_tta["accuracy"] if shift else None,
        "tta_shift": shift,
        "eval_loss": best["loss"],
        "eval_samples": best["samples"],
        "test_accuracy": None,
        "epochs": completed_steps / steps_per_epoch,
        "steps": completed_steps,
        "train_seconds": train_seconds,
        "train_samples_per_second": run_images / max(run_seconds, 1e-9),
        "stopped_by_time_limit": time_up,
        "max_train_minutes": train_cfg["max_train_minutes"],
        "schedule_fitted_to_time": schedule["fitted"],
        "max_train_steps": max_train_steps,
        "schedule": schedule,
        "sync_batchnorm": sync,
        "mixed_precision": precision,
        "mixed_precision_reason": precision_reason,
        "num_skipped_images": skipped,
        "num_parameters": num_parameters,
        "hardware": hardware_description(accelerator),
    }
    if "test" in eval_dataloaders:
        test = evaluate(eval_model, eval_dataloaders["test"], accelerator)
        results.update(test_accuracy=test["accuracy"], test_loss=test["loss"], test_samples=test["samples"])
    accelerator.end_training()
    if accelerator.is_main_process:
        out = Path(output_dir)
        (out / "all_results.json").write_text(json.dumps(results, indent=2))
        (out / "train_config.yaml").write_text(yaml.safe_dump(run_folder.public_settings(settings), sort_keys=False))
        (out / "training_log.json").write_text(json.dumps(history, indent=2))
        run_folder.write_model_card(output_dir, settings, results, command, label_names)
        log(
            f"validation accuracy {results['eval_accuracy']:.4f} ({results['eval_accuracy_flip_tta']:.4f} with flip TTA"
            + (f", {results['eval_accuracy_flip_shift_tta']:.4f} with flip and shift" if shift else "")
            + ")"
            + (f", test accuracy {results['test_accuracy']:.4f}" if results["test_accuracy"] is not None else "")
            + f"; {results['train_seconds'] / 60:.1f} min, {results['train_samples_per_second']:.0f} images/s; saved to {output_dir}"
        )
        if train_cfg["push_to_hub"]:
            run_folder.push_to_hub(output_dir, train_cfg["hub_model_id"])
    return results


def one_line(error: Exception) -> str:
    """The user's message, also when a DataLoader worker re-raised it with its traceback."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(error).__name__
    return re.sub(r"^[\w.]*(DataError|SettingsError|TrainingError): ", "", lines[-1])


def main(argv=None) -> int:
    from cifar10_data import DataError

    argv = sys.argv[1:] if argv is None else argv
    try:
        settings = load_settings(argv)
        train(settings, command="python run_train.py " + " ".join(argv))
    except (SettingsError, DataError, TrainingError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1 if isinstance(error, TrainingError) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
