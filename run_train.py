"""Train the hybrid ViT on CIFAR-10 with Accelerate, on a CPU, one GPU or many.

    accelerate launch run_train.py                            # the default recipe: 20 minutes on any machine
    python run_train.py --config configs/backbone_only.yaml   # the control: the backbone without a transformer
    python run_train.py --help                                # every setting, its meaning and its default

Settings come from default.yaml; `--config FILE` layers a file of overrides on top and any
`--key value` overrides one setting (training_settings.py). A bad setting stops the run before
anything is written. The output folder ends up a Hub model folder holding the model as the
last step left it, with a model card, all_results.json, train_config.yaml, training_log.json
and checkpoints/step_N folders from which `--resume_from_checkpoint latest` continues exactly.

`train` reads top to bottom in stages, as transformers' no_trainer examples do: the accelerator,
the data, the model, the optimisers, prepare and the schedule, resume, the epochs, and finish.
"""

import itertools
import json
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

import cifar10_data
import hardware
import hub_folder
from configuration_hybrid_vit import HybridViTConfig
from errors import UserError, command
from evaluation import accuracy, predict
from modeling_hybrid_vit import HybridViTForImageClassification, classification_loss, save_model_and_processor
from optimization import make_optimizers, make_scheduler
from sync_batchnorm import synchronise_batchnorm
from training_settings import DataSettings, ScheduleSettings, Settings, TrainingSettings, load_settings

CHECKPOINTS_KEPT = 2  # the newest complete ones; older ones are deleted
WHITENING_IMAGES = 5000  # training images the whitening layer is fitted to
# A schedule fitted to max_train_minutes is sized to this fraction of the budget (later epochs ran 2-7%
# slower than the first on a CPU), re-fitted after each of the first REFIT_EPOCHS epochs from that epoch's
# speed (a slow first epoch would cut the run short), and stopped if it slows past FITTED_TIME_LIMIT times.
FIT_FRACTION, REFIT_EPOCHS, FITTED_TIME_LIMIT = 0.95, 2, 1.1


@dataclass
class TrainerState:
    """What a checkpoint's trainer_state.json holds besides Accelerate's own state."""

    step: int = 0
    train_seconds: float = 0.0
    history: list = field(default_factory=list)
    num_skipped_images: int = 0
    schedule: dict = field(default_factory=dict)  # its length in steps, and whether it was fitted to the time
    segments: list = field(default_factory=list)  # each stretch between resumes: its hardware, precision, steps, seconds


@dataclass
class Loop:
    """The prepared objects the epoch loop works with."""

    accelerator: object
    model: object
    optimizers: list  # the backbone's (SGD) and the transformer's (AdamW)
    train_dataloader: object
    eval_dataloaders: dict
    train_dataset: object
    collator: object
    log: object
    schedulers: list = field(default_factory=list)  # one per optimiser
    progress: object = None
    run_images: int = 0  # images and seconds trained by this process, for its speed
    run_seconds: float = 0.0
    time_up: bool = False

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_dataloader)


# -------------------------------------------------------------------------- checkpoints


def resume(loop: Loop, resume_path, saved_state, plan: dict, facts: dict, probe_seconds: float, num_skipped_images: int):
    """The checkpoint's state (with Accelerate's: weights, optimisers, random states) or a fresh one, plus this stretch's segment."""
    state = TrainerState(train_seconds=probe_seconds, num_skipped_images=num_skipped_images, schedule=plan)
    if resume_path is not None:
        loop.log(f"resuming from {resume_path}")
        loop.accelerator.load_state(str(resume_path))
        state = TrainerState(**{**{key: saved_state[key] for key in asdict(state) if key in saved_state}, "schedule": plan})
    state.segments.append({"hardware": facts["hardware"], "mixed_precision": facts["mixed_precision"],
                           "first_step": state.step, "last_step": state.step, "train_seconds": 0.0})
    return state


def list_checkpoints(output_dir) -> tuple[list[Path], list[Path]]:
    """Complete step_N folders (their trainer_state.json, written last, is there) by step; and incomplete ones."""
    folder = Path(output_dir) / "checkpoints"
    found = [path for path in folder.iterdir() if re.fullmatch(r"step_\d+", path.name)] if folder.is_dir() else []
    complete = sorted((p for p in found if (p / "trainer_state.json").is_file()), key=lambda p: int(p.name[5:]))
    return complete, [p for p in found if p not in complete]


def resolve_resume_path(resume, output_dir, log) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from (a folder, the latest complete one, or none), and its trainer_state.json."""
    path = Path(resume) if resume not in (None, "latest") else None
    if path is not None and not (path / "trainer_state.json").is_file():
        raise UserError(f"--resume_from_checkpoint {resume} is not a complete checkpoint (no trainer_state.json)")
    if resume == "latest":
        complete, incomplete = list_checkpoints(output_dir)
        for folder in incomplete:
            log(f"ignoring incomplete checkpoint {folder} (cut short when a run stopped)")
        if not complete:
            log(f"no complete checkpoint in {Path(output_dir) / 'checkpoints'}; starting from scratch")
        path = complete[-1] if complete else None
    return path, json.loads((path / "trainer_state.json").read_text()) if path else None


def save_checkpoint(loop: Loop, state: TrainerState, output_dir):
    """accelerator.save_state into step_N, then trainer_state.json, whose presence marks the
    folder complete; only the newest CHECKPOINTS_KEPT complete ones are kept."""
    accelerator, folder = loop.accelerator, Path(output_dir) / "checkpoints" / f"step_{state.step}"
    if accelerator.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(folder), safe_serialization=True)
    if accelerator.is_main_process:
        (folder / "trainer_state.tmp").write_text(json.dumps(asdict(state), indent=2))
        os.replace(folder / "trainer_state.tmp", folder / "trainer_state.json")
        for old in list_checkpoints(output_dir)[0][:-CHECKPOINTS_KEPT]:
            shutil.rmtree(old, ignore_errors=True)
        loop.log(f"saved checkpoint {folder}")
    accelerator.wait_for_everyone()


# ------------------------------------------------------------------ 1. the accelerator


def make_accelerator(training: TrainingSettings):
    """The Accelerator, in a precision the hardware runs natively (mixed_precision auto), a
    logger that writes once, above the progress bar, and the facts the results record."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import is_tensorboard_available
    from tqdm.auto import tqdm

    report_to = training.report_to
    if report_to == "tensorboard" and not is_tensorboard_available():
        print("tensorboard is not installed; metrics go to training_log.json only", file=sys.stderr)
        report_to = "none"
    precision, reason = hardware.resolve_mixed_precision(training.mixed_precision)
    accelerator = Accelerator(
        mixed_precision=precision,
        log_with=None if report_to == "none" else report_to,
        project_dir=training.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: time the convolution algorithms once

    def log(message):
        if accelerator.is_main_process:
            tqdm.write(message, file=sys.stderr)

    if reason.startswith("as set, although"):
        log(f"warning: --mixed_precision bf16: {reason.removeprefix('as set, although ')}; auto would train in float32")
    log(f"mixed precision: {precision} ({reason})")
    hardware.use_every_core(accelerator.device, accelerator.num_processes, log)
    facts = {"mixed_precision": precision, "mixed_precision_reason": reason,
             "hardware": hardware.description(accelerator.num_processes), "sync_batchnorm": accelerator.num_processes > 1}
    return accelerator, log, report_to, facts


# ------------------------------------------------------------------------- 2. the data


@dataclass
class Data:
    label_names: list
    sizes: dict  # images in each split
    train_dataloader: object
    eval_dataloaders: dict
    train_dataset: object
    collator: object
    whitening_images: torch.Tensor  # training images as the model sees them, unaugmented
    num_skipped_images: int


def build_data(data: DataSettings, image_size: int, seed: int, accelerator) -> Data:
    """The splits decoded once onto the training device; the training loader (augmented,
    mixed, shuffled by a seedable sampler, whole batches only) and one evaluation loader per
    held-out split."""
    from torch.utils.data import DataLoader

    with accelerator.main_process_first():
        splits, image_column, label_column = cifar10_data.load_splits(
            data.dataset_name, data.train_val_split, seed, data.max_train_samples, data.max_eval_samples
        )
    label_names = splits["train"].features[label_column].names
    datasets, skipped = cifar10_data.build_datasets(
        splits, image_column, label_column, image_size, data.auto_augment, data.skip_bad_images, seed, accelerator.device
    )
    collator = cifar10_data.MixCollator(len(label_names), data.mixup_alpha, data.cutmix_alpha, seed)
    train = DataLoader(datasets["train"], batch_size=data.per_device_train_batch_size, shuffle=True, drop_last=True,
                       collate_fn=collator)
    if len(train) < accelerator.num_processes:
        raise UserError(f"the training split has {len(splits['train'])} images, fewer than one batch "
                        f"(--per_device_train_batch_size {data.per_device_train_batch_size}) for each process")
    evals = {name: cifar10_data.eval_dataloader(datasets[name], data.per_device_eval_batch_size)
             for name in ("validation", "test") if name in datasets}
    whitening = cifar10_data.first_images(datasets["train"], WHITENING_IMAGES)
    return Data(label_names, {name: len(split) for name, split in splits.items()}, train, evals, datasets["train"],
                collator, whitening, skipped)


# ------------------------------------------------------------------------ 3. the model


def build_model(config: HybridViTConfig, whitening_images: torch.Tensor, accelerator, log):
    """A freshly initialised model (seeded), its whitening layer fitted to training images,
    its BatchNorm synchronised across processes when there are several, channels last."""
    model = HybridViTForImageClassification(config)
    if config.backbone_whitening_size:  # on resume, the checkpoint's (identical) weights replace these
        model.fit_whitening(whitening_images)
        log(f"whitening layer fitted to {len(whitening_images)} training images")
    if accelerator.num_processes > 1:
        model = synchronise_batchnorm(model, accelerator.device.type)
        log(f"BatchNorm statistics synchronised over the {accelerator.num_processes} processes' batches")
    return model.to(memory_format=torch.channels_last)


# --------------------------------------------------------------- 5. the schedule's length


def plan_schedule(loop: Loop, schedule: ScheduleSettings, saved_state, label_smoothing: float) -> tuple[dict, float]:
    """The schedule's length in steps, and the seconds spent measuring it: max_train_steps, or
    num_train_epochs, or (num_train_epochs auto) as many steps as fit into max_train_minutes
    at this run's measured speed. A fitted length travels in every checkpoint, so a resumed
    run keeps it; a fixed one is the command's."""
    if schedule.max_train_steps is not None or schedule.num_train_epochs != "auto":
        steps = schedule.max_train_steps or max(1, int(schedule.num_train_epochs * loop.steps_per_epoch))
        return {"fitted": False, "max_train_steps": steps}, 0.0
    if saved_state is not None:
        return saved_state["schedule"], 0.0

    def step(batch):
        forward_backward(loop, batch, label_smoothing)
        step_optimizers(loop.optimizers)

    loop.model.train()
    seconds_per_step, probe_seconds = hardware.seconds_per_training_step(
        step, loop.train_dataloader, loop.accelerator.unwrap_model(loop.model), loop.optimizers, loop.accelerator.device
    )
    seconds_per_step = loop.accelerator.reduce(torch.tensor(seconds_per_step, device=loop.accelerator.device), "mean").item()
    budget = 60 * schedule.max_train_minutes
    total = max(1, int((FIT_FRACTION * budget - probe_seconds) / seconds_per_step))
    loop.log(f"schedule fitted to {schedule.max_train_minutes:g} min: {seconds_per_step * 1000:.1f} ms a step over 10 "
             f"steps, so {total} steps ({total / loop.steps_per_epoch:.1f} epochs); re-fitted after epochs 1 and 2")
    return {"fitted": True, "max_train_steps": total, "first_fit_steps": total, "refits": 0, "refitted": False}, probe_seconds


def refit_schedule(loop: Loop, state: TrainerState, schedule: ScheduleSettings, epoch_seconds: float, epoch_steps: int):
    """After each of the first REFIT_EPOCHS epochs: the steps that fit into what is left of the
    budget at the speed of the epoch just run. The schedule changes only if that is more than
    2% off; its warmup and decay then stretch or shrink from the current step on."""
    accelerator, plan = loop.accelerator, state.schedule
    measured = accelerator.reduce(torch.tensor([epoch_seconds / epoch_steps, state.train_seconds], device=accelerator.device), "mean")
    seconds_per_step, elapsed = measured.tolist()
    left = FIT_FRACTION * 60 * schedule.max_train_minutes - elapsed
    total = state.step + max(1, int(left / seconds_per_step)) if left > 0 else state.step
    plan.update(refits=plan["refits"] + 1, refitted=plan["refits"] + 1 >= REFIT_EPOCHS, epoch_seconds_per_step=seconds_per_step)
    if abs(total - plan["max_train_steps"]) > 0.02 * plan["max_train_steps"]:
        loop.log(f"schedule re-fitted: {seconds_per_step * 1000:.1f} ms a step in epoch {plan['refits']}, so {total} "
                 f"steps in all, not {plan['max_train_steps']}")
        plan["max_train_steps"] = total
        for optimizer, scheduler in zip(loop.optimizers, loop.schedulers):
            scheduler.scheduler = make_scheduler(optimizer, schedule.warmup_ratio, total, accelerator.num_processes, state.step)
        loop.progress.total = total
        loop.progress.refresh()


# ------------------------------------------------------------------ 7. train and evaluate


def forward_backward(loop: Loop, batch, label_smoothing: float) -> torch.Tensor:
    """The cross-entropy of a batch with its (mixed, smoothed) labels, and its gradients."""
    logits = loop.model(pixel_values=batch["pixel_values"].contiguous(memory_format=torch.channels_last)).logits
    loss = classification_loss(logits, batch["labels"], label_smoothing)
    loop.accelerator.backward(loss)
    return loss


def step_optimizers(optimizers, schedulers=()):
    for optimizer in optimizers:
        optimizer.step()
    for scheduler in schedulers:
        scheduler.step()
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)


def stop_checks(loop: Loop, state: TrainerState, loss, time_limit, elapsed, output_dir) -> bool:
    """Before an update: a non-finite loss stops the run without applying it; past the time
    limit, this is the last step. Every process stops on the same step."""
    flags = torch.tensor([float(not torch.isfinite(loss.detach())), float(time_limit is not None and elapsed >= time_limit)],
                         device=loop.accelerator.device)
    flags = loop.accelerator.reduce(flags, reduction="sum")
    if flags[0] > 0:
        last = list_checkpoints(output_dir)[0]
        raise UserError(f"the loss became {loss.item()} at step {state.step + 1}; stopped without updating. Intact: the "
                        f"last checkpoint ({last[-1] if last else 'none'}). Try a lower --learning_rate or "
                        "--mixed_precision no.", exit_code=1)
    return bool(flags[1] > 0)


def train_one_epoch(loop: Loop, state: TrainerState, epoch: int, settings: Settings, time_limit):
    """One pass over the training batches, from where a resumed run stopped: each step's
    update, its log line and, mid-epoch, its checkpoint; then the time limit."""
    accelerator, training = loop.accelerator, settings.training
    loop.train_dataloader.set_epoch(epoch)
    loop.train_dataset.epoch = loop.collator.epoch = epoch
    skip = state.step - epoch * loop.steps_per_epoch
    batches = accelerator.skip_first_batches(loop.train_dataloader, skip) if skip else loop.train_dataloader
    total, every = state.schedule["max_train_steps"], training.checkpointing_steps
    loop.model.train()
    tick = time.perf_counter()
    for index, batch in enumerate(batches, start=skip):
        # Any dropout draws from a generator seeded by the step, not from a global RNG that
        # loaders and evaluations also consume: a resumed run repeats the uninterrupted one.
        torch.manual_seed(cifar10_data.sample_seed(training.seed, epoch, index, accelerator.process_index))
        loss = forward_backward(loop, batch, settings.data.label_smoothing)
        elapsed = state.train_seconds + time.perf_counter() - tick
        loop.time_up = stop_checks(loop, state, loss, time_limit, elapsed, training.output_dir)
        step_optimizers(loop.optimizers, loop.schedulers)
        now = time.perf_counter()
        state.step += 1
        state.train_seconds += now - tick
        loop.run_seconds += now - tick
        loop.run_images += len(batch["labels"]) * accelerator.num_processes
        state.segments[-1].update(last_step=state.step, train_seconds=loop.run_seconds)
        loop.progress.update(1)
        last_of_epoch = index + 1 == loop.steps_per_epoch or state.step >= total or loop.time_up
        if state.step % training.logging_steps == 0 or state.step == total:
            log_step(loop, state, loss)
        if isinstance(every, int) and state.step % every == 0 and not last_of_epoch:  # else after the evaluation
            save_checkpoint(loop, state, training.output_dir)
        if last_of_epoch:
            break
        tick = time.perf_counter()


def log_step(loop: Loop, state: TrainerState, loss):
    """The loss and both optimisers' learning rates: to the history, the tracker, the bar."""
    rates = {"learning_rate": loop.schedulers[0].get_last_lr()[0], "transformer_learning_rate": loop.schedulers[1].get_last_lr()[0]}
    loss_value = loop.accelerator.reduce(loss.detach(), "mean").item()
    loop.progress.set_postfix(loss=f"{loss_value:.3f}", lr=f"{rates['learning_rate']:.2e}",
                              img_s=f"{loop.run_images / max(loop.run_seconds, 1e-9):.0f}")
    state.history.append({"step": state.step, "epoch": state.step / loop.steps_per_epoch, "train_loss": loss_value, **rates})
    loop.accelerator.log({"train/loss": loss_value, **{f"train/{key}": value for key, value in rates.items()}}, step=state.step)


def end_of_epoch(loop: Loop, state: TrainerState, training: TrainingSettings):
    """Validation accuracy and loss into the history and the log; then the checkpoint."""
    logits, labels = predict(loop.model, loop.eval_dataloaders["validation"], accelerator=loop.accelerator)
    entry = {"step": state.step, "epoch": state.step / loop.steps_per_epoch, "train_seconds": state.train_seconds,
             "eval_accuracy": accuracy(logits, labels), "eval_loss": torch.nn.functional.cross_entropy(logits, labels).item()}
    state.history.append(entry)
    loop.accelerator.log({"eval/accuracy": entry["eval_accuracy"], "eval/loss": entry["eval_loss"]}, step=state.step)
    loop.log(f"epoch {entry['epoch']:.2f}: validation accuracy {entry['eval_accuracy']:.4f}, loss {entry['eval_loss']:.4f}")
    every = training.checkpointing_steps
    if every == "epoch" or (isinstance(every, int) and (state.step % every == 0 or loop.time_up)):
        save_checkpoint(loop, state, training.output_dir)


# -------------------------------------------------------------------------------- 8. finish


def score(loop: Loop) -> dict:
    """Accuracy, plain and with flip TTA, on the validation split, and on test where there is one."""
    results = {"test_accuracy": None}
    for split, loader in loop.eval_dataloaders.items():
        prefix = "eval" if split == "validation" else "test"
        logits, labels = predict(loop.model, loader, accelerator=loop.accelerator, desc=f"scoring on {split}")
        flipped, _ = predict(loop.model, loader, flip=True, accelerator=loop.accelerator)
        results.update({f"{prefix}_accuracy": accuracy(logits, labels), f"{prefix}_accuracy_flip_tta": accuracy(flipped, labels),
                        f"{prefix}_loss": torch.nn.functional.cross_entropy(logits, labels).item(), f"{prefix}_samples": len(labels)})
    return results


def finish(loop: Loop, state: TrainerState, settings: Settings, facts: dict, command_line: str) -> dict:
    """Score the model as the last step left it; write it as a Hub folder with its results,
    settings, log and card; push if asked."""
    accelerator, training = loop.accelerator, settings.training
    results = {
        **score(loop), "epochs": state.step / loop.steps_per_epoch, "steps": state.step, "train_seconds": state.train_seconds,
        "train_samples_per_second": loop.run_images / max(loop.run_seconds, 1e-9), "stopped_by_time_limit": loop.time_up,
        "num_skipped_images": state.num_skipped_images, "max_train_minutes": settings.schedule.max_train_minutes,
        "schedule_fitted_to_time": state.schedule["fitted"], "max_train_steps": state.schedule["max_train_steps"],
        "schedule": state.schedule, **facts, "segments": state.segments,
    }
    accelerator.end_training()
    if accelerator.is_main_process:
        model, out = accelerator.unwrap_model(loop.model), Path(training.output_dir)
        save_model_and_processor(model, out)
        public = hub_folder.public_settings(settings.to_dict())
        (out / "all_results.json").write_text(json.dumps(results, indent=2))
        (out / "train_config.yaml").write_text(yaml.safe_dump(public, sort_keys=False))
        (out / "training_log.json").write_text(json.dumps(state.history, indent=2))
        label_names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        hub_folder.write_model_card(out, settings.to_dict(), results, command_line, label_names)
        test = f", test accuracy {results['test_accuracy']:.4f}" if results["test_accuracy"] is not None else ""
        loop.log(f"validation accuracy {results['eval_accuracy']:.4f} ({results['eval_accuracy_flip_tta']:.4f} with flip "
                 f"TTA){test}; {results['train_seconds'] / 60:.1f} min, {results['train_samples_per_second']:.0f} images/s; "
                 f"saved to {out}")
        if training.push_to_hub:
            hub_folder.push_to_hub(out, training.hub_model_id)
    return results


def train_epochs(loop: Loop, state: TrainerState, settings: Settings, time_limit):
    """Epochs until the schedule ends or time is up, each ending with a validation score and a
    checkpoint; a schedule fitted to the time is re-fitted after each of the first epochs."""
    for epoch in itertools.count(state.step // loop.steps_per_epoch):
        plan = state.schedule
        if state.step >= plan["max_train_steps"] or loop.time_up:
            return
        seconds, steps = state.train_seconds, state.step
        train_one_epoch(loop, state, epoch, settings, time_limit)
        if plan["fitted"] and not plan["refitted"] and not loop.time_up and state.step < plan["max_train_steps"]:
            refit_schedule(loop, state, settings.schedule, state.train_seconds - seconds, max(state.step - steps, 1))
        end_of_epoch(loop, state, settings.training)


def train(settings: Settings, command_line: str) -> dict:
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    training, schedule = settings.training, settings.schedule

    # 1. The accelerator, in a precision this hardware runs natively; every seed set.
    accelerator, log, report_to, facts = make_accelerator(training)
    set_seed(training.seed)

    # 2. The data, decoded once onto the training device.
    config = HybridViTConfig(**asdict(settings.model))
    data = build_data(settings.data, config.image_size, training.seed, accelerator)
    config.id2label = dict(enumerate(data.label_names))
    config.label2id = {name: i for i, name in enumerate(data.label_names)}

    # 3. The model. The output folder is checked before any training.
    model = build_model(config, data.whitening_images, accelerator, log)
    facts["num_parameters"] = model.num_parameters()
    resume_path, saved_state = resolve_resume_path(training.resume_from_checkpoint, training.output_dir, log)
    if accelerator.is_main_process:
        hub_folder.check_writable(training.output_dir)
    accelerator.wait_for_everyone()

    # 4. The optimisers: SGD for the backbone, AdamW for the transformer.
    optimizers = make_optimizers(model, settings.optimizer)

    # 5. Prepare; the schedule, fixed or fitted to the time budget from the measured speed.
    model, train_dataloader, *optimizers = accelerator.prepare(model, data.train_dataloader, *optimizers)
    evals = {name: accelerator.prepare(loader) for name, loader in data.eval_dataloaders.items()}
    loop = Loop(accelerator, model, optimizers, train_dataloader, evals, data.train_dataset, data.collator, log)
    plan, probe_seconds = plan_schedule(loop, schedule, saved_state, settings.data.label_smoothing)
    loop.schedulers = [accelerator.prepare(make_scheduler(o, schedule.warmup_ratio, plan["max_train_steps"], accelerator.num_processes))
                       for o in optimizers]
    minutes = schedule.max_train_minutes
    time_limit = None if minutes is None else 60 * minutes * (FITTED_TIME_LIMIT if plan["fitted"] else 1.0)

    # 6. Resume, exactly, from a checkpoint.
    state = resume(loop, resume_path, saved_state, plan, facts, probe_seconds, data.num_skipped_images)
    if report_to != "none":
        accelerator.init_trackers("tensorboard", config={k: str(v) for s in settings.to_dict().values() for k, v in s.items()})
    log(f"{', '.join(f'{n} {name}' for name, n in data.sizes.items())} images; {facts['num_parameters']:,} parameters; "
        f"{plan['max_train_steps']} steps of {settings.data.per_device_train_batch_size * accelerator.num_processes} images")

    # 7. Train, an epoch at a time.
    loop.progress = tqdm(total=plan["max_train_steps"], initial=state.step, disable=not accelerator.is_local_main_process, desc="train")
    try:
        train_epochs(loop, state, settings, time_limit)
    finally:  # leave the bar finished, so that an error message is the last line
        loop.progress.close()

    # 8. Finish: score the model, write the folder.
    return finish(loop, state, settings, facts, command_line)


@command
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    train(load_settings(argv), command_line=shlex.join(["python", "run_train.py", *argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
