"""Train the hybrid ViT on CIFAR-10 with Accelerate.

    accelerate launch run_train.py --config default.yaml        # one GPU, many, or the CPU
    python run_train.py --config configs/cpu.yaml --dataset_name ../shared/data/cifar10
    python run_train.py --help                                  # every setting, its meaning and default

Settings come from default.yaml; `--config FILE` layers a file of overrides on top and
any `--key value` overrides one setting (training_settings.py). Unknown keys and bad
values stop the run before anything is written. The output folder ends up a complete Hub
model folder (the best model by validation accuracy) plus a model card, all_results.json,
train_config.yaml, training_log.json and checkpoints/step_N folders for exact resumption.

`train` reads top to bottom in stages, as transformers' no_trainer examples do: the
accelerator, the data, the model, the optimiser, prepare, the schedule, resume, then
`train_one_epoch` and `evaluate` each epoch, and `finish` (save, card, results).
"""

import functools
import itertools
import json
import math
import os
import platform
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from run_folder import UserError
from training_settings import load_settings  # noqa: F401 (run_train.load_settings: what benchmark.py and the tests call)

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
INCOMPLETE_SUFFIX = ".incomplete"
EMA_FILE = "ema.safetensors"
# A schedule fitted to max_train_minutes ends at the budget; the run is stopped regardless
# only if the machine then slows down this much (the last steps' learning rate is near 0).
FITTED_TIME_LIMIT_FACTOR = 1.1
# A fitted schedule is sized to this fraction of the budget: on the CPU, later epochs ran
# 2-7% slower than the first one that the fit measures (docs/schedule.md).
FIT_FRACTION = 0.95
# A fitted schedule is re-fitted after each of this many first epochs, each time from the
# speed of the epoch just run: a first epoch that ran slow (warming caches, another job on
# the cores) would otherwise cut the whole run short (docs/schedule.md).
REFIT_EPOCHS = 2
# Settings of the model section that change how a model trains or runs, not its weights:
# they still apply when the weights (and the architecture) come from --model_name_or_path.
RUNTIME_MODEL_SETTINGS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate")


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
            raise UserError(f"--resume_from_checkpoint {resume} is not a complete checkpoint (no trainer_state.json)")
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
        raise UserError(f"output folder {output_dir} is not writable: {error.strerror or error}") from None


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


# ------------------------------------------------------------------------- precision


def bf16_matmul_speedup(size: int = 256, repeats: int = 3) -> float:
    """How many times as fast a size x size bfloat16 matrix product runs as a float32 one
    on this CPU: about 2-4 where bf16 is native (AVX-512 BF16, AMX), about 0.002-0.01 where
    it is emulated (AVX2 only). Timing is the honest test: a capability flag says what the
    CPU has, not what PyTorch's kernels make of it. Costs well under a second either way."""
    def seconds(dtype, limit=None):
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        a @ b  # warm-up: the first call also generates (JIT-compiles) the kernel
        start = time.perf_counter()
        a @ b  # the measurement already, when it is far too slow
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


# -------------------------------------------------------------------- many processes


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


# -------------------------------------------------------------------------- optimiser


def parameter_groups(named_parameters, weight_decay):
    """Optimiser groups: no weight decay on norms, biases, position embeddings or the CLS token."""
    decay, no_decay = [], []
    for name, parameter in named_parameters:
        if not parameter.requires_grad:
            continue
        exempt = parameter.ndim <= 1 or name.endswith(("position_embeddings", "cls_token"))
        (no_decay if exempt else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def backbone_modules(model) -> list:
    """The backbone part of model_parts: the whitening layer (if any) and the convolutional stages."""
    base = getattr(model, model.base_model_prefix, model)
    return [module for module in (base.embeddings.whitening, base.embeddings.backbone) if module is not None]


def model_parts(model) -> dict:
    """The model's parameters by part: "backbone" (the whitening layer's bias, the
    convolutions and their BatchNorms: scale-invariant, the part SGD trains well) and
    "transformer" (the token projection, CLS token, position embeddings, blocks, final norm
    and head), as (name, parameter) lists."""
    in_backbone = {id(p) for module in backbone_modules(model) for p in module.parameters()}
    parts = {"backbone": [], "transformer": []}
    for name, parameter in model.named_parameters():
        parts["backbone" if id(parameter) in in_backbone else "transformer"].append((name, parameter))
    return parts


def build_optimizer(kind, named_parameters, learning_rate, weight_decay, train_cfg) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay), or SGD with Nesterov momentum as airbench trains its
    CNN (weight decay added to the gradient, so it wants values like 5e-4, not 0.05)."""
    groups = parameter_groups(named_parameters, weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=learning_rate, momentum=train_cfg["sgd_momentum"], nesterov=True)
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(train_cfg["adam_beta1"], train_cfg["adam_beta2"]))


def freeze_backbone(model, log) -> None:
    """--freeze_backbone: the backbone gets no gradient (so no optimiser moves it, and no
    backward pass runs through it); `set_train_mode` keeps its BatchNorm in eval mode."""
    for module in backbone_modules(model):
        module.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"backbone frozen (weights and BatchNorm statistics): {trainable:,} of {model.num_parameters():,} parameters train")


def set_train_mode(model, train_cfg) -> None:
    """model.train(), except that a frozen backbone stays in eval mode: its BatchNorm layers
    normalise with their running statistics and do not update them."""
    model.train()
    if train_cfg.get("freeze_backbone"):
        for module in backbone_modules(getattr(model, "module", model)):
            module.eval()


def make_optimizers(model, train_cfg) -> list[torch.optim.Optimizer]:
    """One optimiser for the whole model (optimizer, learning_rate, weight_decay), or, with
    transformer_optimizer set, one for each part: the backbone with the first three
    settings, the transformer with transformer_optimizer, transformer_learning_rate and
    transformer_weight_decay. Each gets its own scheduler of the same shape."""
    if train_cfg.get("transformer_optimizer") is None:
        return [build_optimizer(train_cfg["optimizer"], model.named_parameters(), train_cfg["learning_rate"], train_cfg["weight_decay"], train_cfg)]
    parts = model_parts(model)
    return [
        build_optimizer(train_cfg["optimizer"], parts["backbone"], train_cfg["learning_rate"], train_cfg["weight_decay"], train_cfg),
        build_optimizer(train_cfg["transformer_optimizer"], parts["transformer"], train_cfg["transformer_learning_rate"],
                        train_cfg["transformer_weight_decay"], train_cfg),
    ]


def step_optimizers(optimizers, schedulers=()):
    """One update by every optimiser (each trains its own parameters, so the order does not
    matter), one step of each scheduler, then the gradients cleared."""
    for optimizer in optimizers:
        optimizer.step()
    for scheduler in schedulers:
        scheduler.step()
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)


def make_ema(model, train_cfg, device):
    """A copy of the model (BatchNorm statistics too) that trails the trained weights; it is
    what gets evaluated and saved. Made before prepare, so it is a plain module."""
    if train_cfg["ema_decay"] is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, device=device, multi_avg_fn=get_ema_multi_avg_fn(train_cfg["ema_decay"]), use_buffers=True)


# --------------------------------------------------------------------------- schedule


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


def measure_seconds_per_step(training_step, model, optimizers, dataloader, accelerator, warmup=3, timed=10) -> tuple[float, float]:
    """Seconds per optimisation step of this run's own training step on its own batches,
    timed over `timed` steps after `warmup` (first-call costs: allocation, autotuning,
    compilation), and the seconds the whole probe took. The probe's updates are undone
    (weights, BatchNorm statistics, optimiser and loss-scaler state are restored, and the
    global RNG is left as it was), so the run that follows is the run a fixed schedule of
    the same length would train: only the step count depends on the clock."""
    import copy

    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    saved_model = copy.deepcopy(unwrapped.state_dict())
    saved_optimizers = [copy.deepcopy(optimizer.state_dict()) for optimizer in optimizers]
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
    for optimizer, saved in zip(optimizers, saved_optimizers):
        optimizer.load_state_dict(saved)
        optimizer.zero_grad(set_to_none=True)
    if saved_scaler is not None:
        scaler.load_state_dict(saved_scaler)
    return seconds_per_step, time.perf_counter() - start


# ------------------------------------------------------------------------- evaluation


def evaluate(model, dataloader, accelerator, flip_tta=False, tta_shift=0) -> dict:
    """Validation loss and accuracy; gather_for_metrics drops the samples that
    distributed sampling duplicates, so each image counts exactly once. With `flip_tta`,
    the logits of each image's test-time views are averaged (`cifar10_data.tta_logits`)."""
    import torch.nn.functional as F

    from cifar10_data import tta_logits

    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    # autocast for a model that prepare() did not wrap (the weight average) too
    with torch.no_grad(), accelerator.autocast():
        for batch in dataloader:
            logits = tta_logits(model, batch["pixel_values"], flip_tta, tta_shift)
            losses = F.cross_entropy(logits, batch["labels"], reduction="none")
            predictions, labels, losses = accelerator.gather_for_metrics(
                (logits.argmax(-1), batch["labels"], losses)
            )
            correct += (predictions == labels).sum().item()
            total += labels.numel()
            loss_sum += losses.sum().item()
    for module, training in modes:  # as it was (a frozen backbone stays in eval mode)
        module.train(training)
    return {"accuracy": correct / max(total, 1), "loss": loss_sum / max(total, 1), "samples": total}


# ------------------------------------------------------------- models: new, fine-tuned, teacher


def load_saved_config(name_or_path, key):
    """The config.json of a saved model folder or Hub id, or one clear line naming --key."""
    from configuration_hybrid_vit import HybridViTConfig
    from run_folder import is_local_path

    if is_local_path(name_or_path) and not Path(name_or_path).expanduser().is_dir():
        raise UserError(f"--{key} {name_or_path}: no such folder (nor a Hub id like owner/name)")
    try:
        return HybridViTConfig.from_pretrained(os.path.expanduser(name_or_path))
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"--{key} {name_or_path}: {first_line}") from None


def new_model(model_settings, label_names, whitening_images, log):
    """A freshly initialised model of the model section's architecture; its whitening
    layer, if any, fitted to `whitening_images()` (training images only)."""
    from configuration_hybrid_vit import HybridViTConfig
    from modeling_hybrid_vit import HybridViTForImageClassification

    config = HybridViTConfig(
        **model_settings, id2label=dict(enumerate(label_names)), label2id={name: i for i, name in enumerate(label_names)}
    )
    model = HybridViTForImageClassification(config)
    if config.backbone_whitening_size:
        # On resume, the checkpoint's (identical) weights replace these.
        sample = whitening_images()
        model.fit_whitening(sample)
        log(f"whitening layer fitted to {len(sample)} training images")
    return model


def load_initial_model(name_or_path, model_settings, label_names, log):
    """The model to fine-tune: weights and architecture from a saved folder or a Hub id.

    As in transformers' examples, a dataset with other classes gets a new classification
    head (``ignore_mismatched_sizes``). The whitening layer keeps its fitted weights.
    """
    from modeling_hybrid_vit import HybridViTForImageClassification

    config = load_saved_config(name_or_path, "model_name_or_path")
    config.logit_temperature = 1.0  # train on the raw logits; a calibration is fitted afresh after training
    for key in RUNTIME_MODEL_SETTINGS:
        setattr(config, key, model_settings[key])
    new_head = [config.id2label[i] for i in range(config.num_labels)] != list(label_names)
    if new_head:
        config.id2label = dict(enumerate(label_names))
        config.label2id = {name: i for i, name in enumerate(label_names)}
    model = HybridViTForImageClassification.from_pretrained(
        os.path.expanduser(name_or_path),
        config=config,
        attn_implementation=model_settings["attn_implementation"],
        ignore_mismatched_sizes=new_head,
        dtype=torch.float32,
    )
    log(
        f"starting from the weights of {name_or_path}: its architecture is used, and of the model "
        f"settings only {', '.join(RUNTIME_MODEL_SETTINGS)} and attn_implementation apply"
        + (f"; new classification head for {len(label_names)} classes" if new_head else "")
    )
    return model


def warn_if_split_differs(name_or_path, settings, log):
    """A folder saved by run_train.py says which images it was trained on. Different split
    settings mean this run's validation images may have been training images there."""
    from run_folder import public_settings, train_settings

    before = train_settings(name_or_path)
    if not before:
        return
    now = public_settings(settings)  # saved settings hold public names (a Hub id, not a local path)
    keys = [("data", "dataset_name"), ("data", "train_val_split"), ("data", "max_train_samples"), ("training", "seed")]
    changed = [key for section, key in keys if before.get(section, {}).get(key) != now[section][key]]
    if changed:
        log(
            f"warning: {name_or_path} was trained with other {', '.join(changed)}; its training images may "
            "include this run's validation images, so validation accuracy may be optimistic"
        )


def load_teacher(name_or_path, train_cfg, attn_implementation, label_names, image_size, log):
    """A trained model to distil from: frozen, in eval mode (BatchNorm uses its running
    statistics), float32 weights run under the run's autocast. It must predict the same
    classes, in the same order, from images of the student's size."""
    from modeling_hybrid_vit import HybridViTForImageClassification

    config = load_saved_config(name_or_path, "teacher_model")
    config.logit_temperature = 1.0  # distil from the logits it was trained to give
    teacher_labels = [config.id2label[i] for i in range(config.num_labels)]
    if teacher_labels != list(label_names):
        raise UserError(f"--teacher_model {name_or_path} predicts {teacher_labels}, but the dataset's classes are {list(label_names)}")
    if config.image_size != image_size:
        raise UserError(
            f"--teacher_model {name_or_path} takes {config.image_size}x{config.image_size} images; this run trains on "
            f"{image_size}x{image_size}"
        )
    teacher = HybridViTForImageClassification.from_pretrained(
        os.path.expanduser(name_or_path), config=config, attn_implementation=attn_implementation, dtype=torch.float32
    )
    teacher.eval().requires_grad_(False)
    alpha = train_cfg["distillation_alpha"]
    log(
        f"distilling from {name_or_path}: loss = {1 - alpha:g} x cross-entropy with the labels + "
        f"{alpha:g} x T^2 KL(teacher || student) at T = {train_cfg['distillation_temperature']:g}"
        + (", the teacher's logits averaged over each image and its mirror image" if train_cfg["teacher_flip_tta"] else "")
        + (f", both also shifted by {train_cfg['teacher_tta_shift']} pixels" if train_cfg["teacher_tta_shift"] else "")
    )
    return teacher


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


# ------------------------------------------------------------------------------ stages


@dataclass
class TrainerState:
    """What a checkpoint's trainer_state.json holds besides Accelerate's own state."""

    step: int = 0
    train_seconds: float = 0.0
    best_eval_accuracy: float = -1.0
    history: list = field(default_factory=list)
    num_skipped_images: int = 0
    schedule: dict = field(default_factory=dict)  # the schedule's length, and whether it was fitted to the time


@dataclass
class Loop:
    """The prepared objects the epoch loop works with."""

    accelerator: object
    model: object
    optimizers: list  # one, or the backbone's and the transformer's (transformer_optimizer)
    schedulers: list  # one per optimiser
    train_dataloader: object
    eval_dataloaders: dict
    train_augmentation: object
    train_collator: object
    ema: object
    teacher: object
    memory_format: object
    steps_per_epoch: int
    progress: object = None
    skipped_at_decode: int = 0
    run_images: int = 0
    run_seconds: float = 0.0
    time_up: bool = False

    @property
    def eval_model(self):
        return self.model if self.ema is None else self.ema.module


def make_accelerator(train_cfg):
    """The Accelerator, in the precision the hardware runs natively (mixed_precision auto),
    and a logger that writes once, above the progress bar."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import is_tensorboard_available
    from tqdm.auto import tqdm

    report_to = train_cfg["report_to"]
    if report_to == "tensorboard" and not is_tensorboard_available():
        print("tensorboard is not installed; metrics go to training_log.json only", file=sys.stderr)
        report_to = "none"
    precision, reason = resolve_mixed_precision(train_cfg["mixed_precision"])
    try:
        accelerator = Accelerator(
            mixed_precision=precision,
            gradient_accumulation_steps=train_cfg["gradient_accumulation_steps"],
            log_with=None if report_to == "none" else report_to,
            project_dir=train_cfg["output_dir"],
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
            dynamo_backend="inductor" if train_cfg["torch_compile"] else "no",
        )
    except ValueError as error:
        raise UserError(f"--mixed_precision {train_cfg['mixed_precision']}: {error}") from None
    if accelerator.device.type == "cuda":
        # Fixed shapes (drop_last): let cuDNN time its convolution algorithms once and keep
        # the fastest. Exact resume is promised on the CPU only (see the README).
        torch.backends.cudnn.benchmark = True

    def log(message):
        if accelerator.is_main_process:
            tqdm.write(message, file=sys.stderr)

    if reason.startswith("as set, although"):
        log(f"warning: --mixed_precision bf16: {reason.removeprefix('as set, although ')}; --mixed_precision auto would train in float32")
    log(f"mixed precision: {precision} ({reason})")
    return accelerator, log, report_to, {"mixed_precision": precision, "mixed_precision_reason": reason}


def load_data(data, seed, accelerator):
    """The train, validation and (where the dataset has one) test splits."""
    import cifar10_data

    with accelerator.main_process_first():
        splits, image_column, label_column = cifar10_data.load_splits(
            data["dataset_name"], data["train_val_split"], seed, data["max_train_samples"], data["max_eval_samples"]
        )
    return splits, image_column, label_column


def build_model(settings, splits, image_column, label_column, log):
    """A new model, or the one --model_name_or_path names; the data settings are checked
    against the images it takes."""
    import cifar10_data

    train_cfg, data = settings["training"], settings["data"]
    label_names = splits["train"].features[label_column].names
    name = train_cfg["model_name_or_path"]
    if name is None:
        size = settings["model"]["image_size"]
        model = new_model(
            settings["model"], label_names,
            lambda: cifar10_data.normalized_images(splits["train"], image_column, label_column, size, 5000), log,
        )
        return model
    model = load_initial_model(name, settings["model"], label_names, log)
    size = model.config.image_size  # training_settings checked these against the model section's size
    if data["cutout_size"] > size or data["tta_shift"] >= size:
        raise UserError(
            f"--model_name_or_path {name} takes {size}x{size} images, so cutout_size must be at most {size} "
            f"and tta_shift below {size}; got {data['cutout_size']} and {data['tta_shift']}"
        )
    warn_if_split_differs(name, settings, log)
    return model


def build_dataloaders(data, train_cfg, splits, image_column, label_column, image_size, device):
    """The training loader (augmented, mixed, shuffled by a seedable sampler, whole batches
    only) and one evaluation loader per held-out split."""
    from torch.utils.data import DataLoader

    import cifar10_data

    seed = train_cfg["seed"]
    datasets, train_augmentation, skipped = cifar10_data.build_datasets(
        splits, image_column, label_column, data, image_size=image_size, seed=seed, device=device
    )
    num_labels = splits["train"].features[label_column].num_classes
    train_collator = cifar10_data.mix_collator(data, num_labels, seed=seed)
    eval_collator = cifar10_data.MixCollator(num_labels)
    workers = 0 if data["decode_once"] else data["dataloader_num_workers"]  # decoded tensors may live on the GPU
    train_dataloader = DataLoader(
        datasets["train"], batch_size=train_cfg["per_device_train_batch_size"], shuffle=True, drop_last=True,
        collate_fn=train_collator, num_workers=workers,
    )
    if len(train_dataloader) == 0:
        raise UserError(
            f"the training split has {len(splits['train'])} images, fewer than one batch "
            f"(--per_device_train_batch_size {train_cfg['per_device_train_batch_size']})"
        )
    eval_dataloaders = {
        name: DataLoader(datasets[name], batch_size=train_cfg["per_device_eval_batch_size"], collate_fn=eval_collator, num_workers=workers)
        for name in ("validation", "test")
        if name in datasets
    }
    return train_dataloader, eval_dataloaders, train_augmentation, train_collator, skipped


def fit_schedule(loop: Loop, train_cfg, budget, saved_state, probe_step, log) -> tuple[dict, float]:
    """The schedule's length, and the seconds spent measuring it: fixed by num_train_epochs
    or max_train_steps, or (num_train_epochs auto) fitted to max_train_minutes from this
    run's measured speed, to be re-fitted after each of the first REFIT_EPOCHS epochs. A
    fitted length is saved in every checkpoint, so a resumed run keeps it."""
    if train_cfg["num_train_epochs"] != "auto":
        steps = train_cfg["max_train_steps"] or int(train_cfg["num_train_epochs"] * loop.steps_per_epoch)
        return {"fitted": False, "max_train_steps": steps}, 0.0
    if saved_state is not None and "schedule" in saved_state:
        return saved_state["schedule"], 0.0
    accelerator = loop.accelerator
    set_train_mode(loop.model, train_cfg)  # time the steps the loop will take (a loaded model comes in eval mode)
    seconds_per_step, probe_seconds = measure_seconds_per_step(probe_step, loop.model, loop.optimizers, loop.train_dataloader, accelerator)
    seconds_per_step = accelerator.reduce(torch.tensor(seconds_per_step, device=accelerator.device), "mean").item()
    total = steps_that_fit(FIT_FRACTION * budget - probe_seconds, seconds_per_step)
    log(
        f"schedule fitted to {budget / 60:g} min: {seconds_per_step * 1000:.1f} ms a step measured over 10 steps, so "
        f"{total} steps ({total / loop.steps_per_epoch:.1f} epochs); re-fitted after each of the first {REFIT_EPOCHS} epochs"
    )
    schedule = {"fitted": True, "max_train_steps": total, "first_fit_steps": total, "seconds_per_step": seconds_per_step, "refits": 0, "refitted": False}
    return schedule, probe_seconds


def refit_schedule(loop: Loop, state: TrainerState, train_cfg, budget, epoch_seconds, epoch_steps, log):
    """After each of the first REFIT_EPOCHS epochs: the steps that fit into what is left of
    the budget at the speed the epoch just run went at. The schedule changes only if the
    estimate was off by more than 2%; its warmup and decay then stretch or shrink from the
    current step on. `refitted` is set once the last re-fit is done."""
    accelerator, schedule = loop.accelerator, state.schedule
    measured = accelerator.reduce(torch.tensor([epoch_seconds / epoch_steps, state.train_seconds], device=accelerator.device), "mean")
    seconds_per_step, elapsed = measured.tolist()
    left = FIT_FRACTION * budget - elapsed
    total = state.step + steps_that_fit(left, seconds_per_step) if left > 0 else state.step
    refits = schedule.get("refits", 0) + 1
    schedule.update(refits=refits, refitted=refits >= REFIT_EPOCHS, epoch_seconds_per_step=seconds_per_step)
    if abs(total - schedule["max_train_steps"]) > 0.02 * schedule["max_train_steps"]:
        log(f"schedule re-fitted: {seconds_per_step * 1000:.1f} ms a step in epoch {refits}, so {total} steps in all, not {schedule['max_train_steps']}")
        schedule["max_train_steps"] = total
        for optimizer, scheduler in zip(loop.optimizers, loop.schedulers):
            scheduler.scheduler = make_scheduler(optimizer, train_cfg, total, accelerator.num_processes, state.step)
        loop.progress.total = total
        loop.progress.refresh()


def resume(loop: Loop, resume_path, saved_state, log) -> TrainerState:
    log(f"resuming from {resume_path}")
    loop.accelerator.load_state(str(resume_path))
    state = TrainerState(**{key: saved_state[key] for key in asdict(TrainerState()) if key in saved_state})
    if loop.ema is not None:
        if not (resume_path / EMA_FILE).is_file():
            raise UserError(f"{resume_path} has no {EMA_FILE}: it was saved by a run without --ema_decay")
        from safetensors.torch import load_file

        loop.ema.load_state_dict(load_file(str(resume_path / EMA_FILE), device=str(loop.accelerator.device)))
    return state


def compute_loss(loop: Loop, batch, data, train_cfg):
    """The training loss of a batch: cross-entropy with the (mixed, smoothed) labels, and
    with a teacher, Hinton's soft-target term on its test-time-averaged logits."""
    from cifar10_data import tta_logits
    from modeling_hybrid_vit import classification_loss

    pixel_values = batch["pixel_values"].contiguous(memory_format=loop.memory_format)
    logits = loop.model(pixel_values=pixel_values).logits
    loss = classification_loss(logits, batch["labels"], data["label_smoothing"])
    if loop.teacher is not None:
        with torch.no_grad(), loop.accelerator.autocast():
            targets = tta_logits(loop.teacher, pixel_values, train_cfg["teacher_flip_tta"], train_cfg["teacher_tta_shift"])
        alpha = train_cfg["distillation_alpha"]
        loss = (1 - alpha) * loss + alpha * distillation_loss(logits, targets, train_cfg["distillation_temperature"])
    return loss


def probe_step(loop: Loop, batch, data, train_cfg):
    """A full training step for measure_seconds_per_step, whose effects it undoes."""
    loss = compute_loss(loop, {key: value for key, value in batch.items() if key != "num_skipped"}, data, train_cfg)
    loop.accelerator.backward(loss)
    if train_cfg["max_grad_norm"] > 0:
        loop.accelerator.clip_grad_norm_(loop.model.parameters(), train_cfg["max_grad_norm"])
    step_optimizers(loop.optimizers)


def stop_checks(loop: Loop, state: TrainerState, loss, max_seconds, elapsed, output_dir):
    """Before an update: a non-finite loss stops the run without applying it; past the time
    limit, this is the last step. Every process stops on the same step."""
    accelerator = loop.accelerator
    flags = torch.tensor(
        [float(not torch.isfinite(loss.detach())), float(max_seconds is not None and elapsed >= max_seconds)],
        device=accelerator.device,
    )
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    if flags[0] > 0:
        last = list_checkpoints(output_dir)[0]
        raise UserError(
            f"the loss became {loss.item()} at step {state.step + 1}; stopped without updating. "
            f"Intact: the last checkpoint ({last[-1] if last else 'none'}) and the best model in "
            f"{output_dir} ({'none yet' if state.best_eval_accuracy < 0 else f'accuracy {state.best_eval_accuracy:.4f}'}). "
            "Try a lower --learning_rate or --mixed_precision no.",
            exit_code=1,
        )
    return bool(flags[1] > 0)


def train_one_epoch(loop: Loop, state: TrainerState, epoch: int, data, train_cfg, max_seconds, log):
    """One pass over the training batches (from where a resumed run stopped), with
    logging, step checkpoints and the time limit."""
    import cifar10_data

    accelerator, seed = loop.accelerator, train_cfg["seed"]
    accumulation = train_cfg["gradient_accumulation_steps"]
    batch_images = train_cfg["per_device_train_batch_size"] * accelerator.num_processes * accumulation
    loop.train_dataloader.set_epoch(epoch)
    loop.train_augmentation.epoch = loop.train_collator.epoch = epoch
    skip = (state.step - epoch * loop.steps_per_epoch) * accumulation
    batches = accelerator.skip_first_batches(loop.train_dataloader, skip) if skip else loop.train_dataloader
    total = state.schedule["max_train_steps"]
    set_train_mode(loop.model, train_cfg)
    tick = time.perf_counter()
    for micro_step, batch in enumerate(batches, start=skip):
        skipped_here = int(batch.pop("num_skipped"))
        # Dropout and stochastic depth draw from a generator seeded by the step, not from a
        # global RNG that DataLoader iterators and evaluations also consume: that is what
        # lets a resumed run repeat the uninterrupted one exactly.
        torch.manual_seed(cifar10_data.sample_seed(seed, epoch, micro_step, accelerator.process_index))
        with accelerator.accumulate(loop.model):
            loss = compute_loss(loop, batch, data, train_cfg)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                elapsed = state.train_seconds + time.perf_counter() - tick
                loop.time_up = stop_checks(loop, state, loss, max_seconds, elapsed, train_cfg["output_dir"])
                if train_cfg["max_grad_norm"] > 0:
                    accelerator.clip_grad_norm_(loop.model.parameters(), train_cfg["max_grad_norm"])
            step_optimizers(loop.optimizers, loop.schedulers)
        state.num_skipped_images += skipped_here
        if not accelerator.sync_gradients:
            continue
        state.step += 1
        if loop.ema is not None:
            loop.ema.update_parameters(accelerator.unwrap_model(loop.model, keep_torch_compile=False))
        now = time.perf_counter()
        state.train_seconds += now - tick
        loop.run_seconds += now - tick
        loop.run_images += batch_images
        loop.progress.update(1)
        if state.step % train_cfg["logging_steps"] == 0 or state.step == total:
            log_step(loop, state, loss)
        if isinstance(train_cfg["checkpointing_steps"], int) and state.step % train_cfg["checkpointing_steps"] == 0:
            save_checkpoint(accelerator, train_cfg["output_dir"], state.step, asdict(state), train_cfg["checkpoints_total_limit"], log, loop.ema)
        tick = time.perf_counter()
        if state.step >= total or loop.time_up:
            break


def log_step(loop: Loop, state: TrainerState, loss):
    """The loss and learning rate (with two optimisers, the backbone's and the transformer's)."""
    rates = {"learning_rate": loop.schedulers[0].get_last_lr()[0]}
    if len(loop.schedulers) > 1:
        rates["transformer_learning_rate"] = loop.schedulers[1].get_last_lr()[0]
    loss_value = loop.accelerator.reduce(loss.detach(), "mean").item()
    speed = loop.run_images / max(loop.run_seconds, 1e-9)
    loop.progress.set_postfix(loss=f"{loss_value:.3f}", lr=f"{rates['learning_rate']:.2e}", img_s=f"{speed:.0f}")
    epoch = state.step / loop.steps_per_epoch
    state.history.append({"step": state.step, "epoch": epoch, "train_loss": loss_value, **rates})
    loop.accelerator.log({"train/loss": loss_value, **{f"train/{key}": value for key, value in rates.items()}}, step=state.step)


def end_of_epoch(loop: Loop, state: TrainerState, train_cfg, log):
    """Validation accuracy; the best model so far saved as the output folder's Hub model."""
    accelerator = loop.accelerator
    metrics = evaluate(loop.eval_model, loop.eval_dataloaders["validation"], accelerator)
    entry = {"step": state.step, "epoch": state.step / loop.steps_per_epoch, "train_seconds": state.train_seconds}
    entry.update({f"eval_{k}": v for k, v in metrics.items()})
    state.history.append(entry)
    accelerator.log({"eval/accuracy": metrics["accuracy"], "eval/loss": metrics["loss"]}, step=state.step)
    log(f"epoch {entry['epoch']:.2f}: validation accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}")
    if metrics["accuracy"] > state.best_eval_accuracy:
        state.best_eval_accuracy = metrics["accuracy"]
        if accelerator.is_main_process:
            save_best_model(accelerator.unwrap_model(loop.eval_model, keep_torch_compile=False), train_cfg["output_dir"])
        accelerator.wait_for_everyone()
    checkpointing = train_cfg["checkpointing_steps"]
    if checkpointing == "epoch" or (loop.time_up and checkpointing is not None):
        save_checkpoint(accelerator, train_cfg["output_dir"], state.step, asdict(state), train_cfg["checkpoints_total_limit"], log, loop.ema)


def finish(loop: Loop, state: TrainerState, settings, facts: dict, command: str, log) -> dict:
    """Score the saved best model once on validation (with and without test-time
    augmentation) and on test where there is one; write the results, the settings, the
    log and the model card; push if asked."""
    import run_folder

    data, train_cfg = settings["data"], settings["training"]
    accelerator, output_dir = loop.accelerator, train_cfg["output_dir"]
    from safetensors.torch import load_file

    unwrapped = accelerator.unwrap_model(loop.eval_model, keep_torch_compile=False)
    best_file = Path(output_dir) / "model.safetensors"
    if best_file.is_file():
        unwrapped.load_state_dict(load_file(best_file))
    elif accelerator.is_main_process:  # resumed at the very end, before any evaluation was saved
        save_best_model(unwrapped, output_dir)
    validation, shift = loop.eval_dataloaders["validation"], data["tta_shift"]
    best = evaluate(loop.eval_model, validation, accelerator)
    best_tta = evaluate(loop.eval_model, validation, accelerator, flip_tta=True)
    best_shift_tta = evaluate(loop.eval_model, validation, accelerator, flip_tta=True, tta_shift=shift) if shift else None
    results = {
        "eval_accuracy": best["accuracy"],
        "eval_accuracy_flip_tta": best_tta["accuracy"],
        "eval_accuracy_flip_shift_tta": best_shift_tta["accuracy"] if shift else None,
        "tta_shift": shift,
        "eval_loss": best["loss"],
        "eval_samples": best["samples"],
        "test_accuracy": None,
        "epochs": state.step / loop.steps_per_epoch,
        "steps": state.step,
        "train_seconds": state.train_seconds,
        "train_samples_per_second": loop.run_images / max(loop.run_seconds, 1e-9),
        "stopped_by_time_limit": loop.time_up,
        "num_skipped_images": state.num_skipped_images,
        "max_train_minutes": train_cfg["max_train_minutes"],
        "schedule_fitted_to_time": state.schedule["fitted"],
        "max_train_steps": state.schedule["max_train_steps"],
        "schedule": state.schedule,
        **facts,
    }
    if "test" in loop.eval_dataloaders:
        test = evaluate(loop.eval_model, loop.eval_dataloaders["test"], accelerator)
        results.update(test_accuracy=test["accuracy"], test_loss=test["loss"], test_samples=test["samples"])
    accelerator.end_training()
    if accelerator.is_main_process:
        out = Path(output_dir)
        (out / "all_results.json").write_text(json.dumps(results, indent=2))
        (out / "train_config.yaml").write_text(yaml.safe_dump(run_folder.public_settings(settings), sort_keys=False))
        (out / "training_log.json").write_text(json.dumps(state.history, indent=2))
        label_names = [unwrapped.config.id2label[i] for i in range(unwrapped.config.num_labels)]
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


def build_models(settings, splits, image_column, label_column, accelerator, facts, log):
    """The model to train (with BatchNorm synchronised across processes) and the teacher, if
    any, in the run's memory format."""
    train_cfg = settings["training"]
    model = build_model(settings, splits, image_column, label_column, log)
    label_names, image_size = splits["train"].features[label_column].names, model.config.image_size
    teacher = None
    if train_cfg["teacher_model"] is not None:
        teacher = load_teacher(train_cfg["teacher_model"], train_cfg, settings["model"]["attn_implementation"], label_names, image_size, log)
    sync = accelerator.num_processes > 1 if train_cfg["sync_batchnorm"] == "auto" else train_cfg["sync_batchnorm"]
    if sync:
        model = synchronise_batchnorm(model, accelerator.device.type)
        log(f"BatchNorm statistics synchronised over the {accelerator.num_processes} processes' batches")
    if train_cfg["freeze_backbone"]:
        freeze_backbone(model, log)
    facts.update(sync_batchnorm=sync, num_parameters=model.num_parameters(), hardware=hardware_description(accelerator))
    memory_format = torch.channels_last if train_cfg["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if teacher is not None:
        teacher = teacher.to(accelerator.device, memory_format=memory_format)
    return model, teacher, memory_format


def prepare_loop(settings, model, teacher, memory_format, splits, image_column, label_column, accelerator) -> Loop:
    """The data loaders, the optimiser and a weight average, prepared by Accelerate."""
    data, train_cfg = settings["data"], settings["training"]
    train_dataloader, eval_dataloaders, augmentation, collator, skipped = build_dataloaders(
        data, train_cfg, splits, image_column, label_column, model.config.image_size, accelerator.device
    )
    optimizers = make_optimizers(model, train_cfg)
    ema = make_ema(model, train_cfg, accelerator.device)
    model, train_dataloader, *optimizers = accelerator.prepare(model, train_dataloader, *optimizers)
    eval_dataloaders = {name: accelerator.prepare(loader) for name, loader in eval_dataloaders.items()}
    steps_per_epoch = math.ceil(len(train_dataloader) / train_cfg["gradient_accumulation_steps"])
    loop = Loop(accelerator, model, optimizers, [], train_dataloader, eval_dataloaders, augmentation, collator, ema,
                teacher, memory_format, steps_per_epoch)
    loop.skipped_at_decode = skipped
    return loop


def train(settings: dict, command: str) -> dict:
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    data, train_cfg = settings["data"], settings["training"]
    output_dir = train_cfg["output_dir"]

    # 1. The accelerator, in a precision this hardware runs natively.
    accelerator, log, report_to, facts = make_accelerator(train_cfg)
    set_seed(train_cfg["seed"])

    # 2. The data, the model (new, or fine-tuned from a saved one) and a teacher.
    splits, image_column, label_column = load_data(data, train_cfg["seed"], accelerator)
    model, teacher, memory_format = build_models(settings, splits, image_column, label_column, accelerator, facts, log)
    resume_path = resolve_resume_path(train_cfg["resume_from_checkpoint"], output_dir, log)
    if accelerator.is_main_process:
        check_output_dir_writable(output_dir)
    accelerator.wait_for_everyone()

    # 3. The loaders, the optimiser (and a weight average), prepared.
    loop = prepare_loop(settings, model, teacher, memory_format, splits, image_column, label_column, accelerator)

    # 4. The schedule: fixed, or fitted to the time budget from the measured speed.
    budget = None if train_cfg["max_train_minutes"] is None else 60 * float(train_cfg["max_train_minutes"])
    saved_state = json.loads((resume_path / "trainer_state.json").read_text()) if resume_path is not None else None

    probe = functools.partial(probe_step, loop, data=data, train_cfg=train_cfg)
    schedule, probe_seconds = fit_schedule(loop, train_cfg, budget, saved_state, probe, log)
    # A fixed schedule stops at the time limit; a fitted one ends there by itself, and is
    # stopped only if the machine slows down by more than FITTED_TIME_LIMIT_FACTOR.
    max_seconds = None if budget is None else budget * (FITTED_TIME_LIMIT_FACTOR if schedule["fitted"] else 1.0)
    loop.schedulers = [
        accelerator.prepare(make_scheduler(optimizer, train_cfg, schedule["max_train_steps"], accelerator.num_processes))
        for optimizer in loop.optimizers
    ]

    # 5. Resume, exactly, from a checkpoint.
    state = TrainerState(train_seconds=probe_seconds, num_skipped_images=loop.skipped_at_decode, schedule=schedule)
    if resume_path is not None:
        state = resume(loop, resume_path, saved_state, log)
        state.schedule = schedule
    if report_to != "none":
        flat = {k: str(v) if isinstance(v, list) or v is None else v for s in settings.values() for k, v in s.items()}
        accelerator.init_trackers("tensorboard", config=flat)
    images = train_cfg["per_device_train_batch_size"] * accelerator.num_processes * train_cfg["gradient_accumulation_steps"]
    log(
        f"{len(splits['train'])} training images, {len(splits['validation'])} validation"
        + (f", {len(splits['test'])} test" if "test" in splits else "")
        + f"; {facts['num_parameters']:,} parameters; {schedule['max_train_steps']} steps of {images} images"
    )

    # 6. Train, an epoch at a time, each ending with a validation score.
    loop.progress = tqdm(total=schedule["max_train_steps"], initial=state.step, disable=not accelerator.is_local_main_process, desc="train")
    try:
        for epoch in itertools.count(state.step // loop.steps_per_epoch):
            if state.step >= schedule["max_train_steps"] or loop.time_up:
                break
            epoch_start = (state.train_seconds, state.step)
            train_one_epoch(loop, state, epoch, data, train_cfg, max_seconds, log)
            if schedule["fitted"] and not schedule["refitted"] and not loop.time_up and state.step < schedule["max_train_steps"]:
                refit_schedule(loop, state, train_cfg, budget, state.train_seconds - epoch_start[0], max(state.step - epoch_start[1], 1), log)
            end_of_epoch(loop, state, train_cfg, log)
    finally:  # leave the bar finished, so an error message is the last line
        loop.progress.close()

    # 7. Finish: score the best model, write the folder.
    return finish(loop, state, settings, facts, command, log)


def one_line(error: Exception) -> str:
    """The user's message, also when a DataLoader worker re-raised it with its traceback."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(error).__name__
    return re.sub(r"^[\w.]*UserError: ", "", lines[-1])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        settings = load_settings(argv)
        train(settings, command="python run_train.py " + " ".join(argv))
    except UserError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return getattr(error, "exit_code", 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
