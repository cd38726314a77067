"""A training run's curves, from the training_log.json that run_train.py writes into its output
folder: validation accuracy and training loss of several runs against training time, and one
run's loss, accuracy and learning rates against its steps."""

import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from errors import UserError


def read_log(run_dir) -> tuple[list[dict], list[dict]]:
    """(evaluations, training-loss records) from a run folder's training_log.json."""
    path = Path(run_dir) / "training_log.json"
    if not path.is_file():
        raise UserError(f"{path} not found: is {run_dir} a run_train.py output folder?")
    records = json.loads(path.read_text())
    evaluations = [r for r in records if "eval_accuracy" in r and "train_seconds" in r]
    if not evaluations:
        raise UserError(f"{path} has no evaluation yet")
    return evaluations, [r for r in records if "train_loss" in r]


def time_to_target(run_dir, target: float) -> str:
    """When a run's validation accuracy first reached `target`, in words."""
    evaluations, _ = read_log(run_dir)
    hit = next((r for r in evaluations if r["eval_accuracy"] >= target), None)
    if hit is None:
        best = max(r["eval_accuracy"] for r in evaluations)
        return f"never reached {100 * target:g}%: best {100 * best:.2f}%, last evaluation at {evaluations[-1]['train_seconds']:.1f} s"
    return f"{100 * hit['eval_accuracy']:.2f}% at {hit['train_seconds']:.1f} s (epoch {hit['epoch']:g})"


def group_legend(label: str, finals: list[float]) -> str:
    """A legend entry: the last accuracy of one run, or the mean and spread of several."""
    if len(finals) == 1:
        return f"{label}: {finals[0]:.2f}%"
    return f"{label}: {np.mean(finals):.2f}% ± {np.std(finals, ddof=1):.2f} ({len(finals)} runs)"


def run_labels(run_dirs, labels=None) -> list[str]:
    """One legend label per run: the given ones, or the folders' names."""
    labels = labels or [Path(d).name for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise UserError(f"{len(labels)} labels for {len(run_dirs)} runs")
    return labels


def plot_runs(run_dirs, labels=None, seconds=False, target=None, title=None, points=()):
    """Validation accuracy after each epoch and the logged training loss of each run, against
    training time (minutes, or seconds). Runs given the same label (seeds of one recipe) share
    a colour and one legend entry with their last accuracies' mean and standard deviation.
    `points`: (label, time, accuracy in %) drawn as markers, for results without a log."""
    labels = run_labels(run_dirs, labels)
    unit = "seconds" if seconds else "minutes"
    figure = Figure(figsize=(11, 4.2))
    accuracy_axis, loss_axis = figure.subplots(1, 2)
    colours, finals, handles = {}, {}, {}
    for run_dir, label in zip(run_dirs, labels):
        evaluations, losses = read_log(run_dir)
        times = [r["train_seconds"] / (1 if seconds else 60) for r in evaluations]
        accuracy = [100 * r["eval_accuracy"] for r in evaluations]
        (line,) = accuracy_axis.plot(times, accuracy, marker="o", markersize=3, color=colours.get(label))
        colours.setdefault(label, line.get_color())
        handles.setdefault(label, line)
        finals.setdefault(label, []).append(accuracy[-1])
        if losses:  # loss records carry steps, not seconds: place them by the epoch clock
            loss_times = np.interp([r["epoch"] for r in losses], [0.0, *[r["epoch"] for r in evaluations]], [0.0, *times])
            loss_axis.plot(loss_times, [r["train_loss"] for r in losses], color=colours[label], linewidth=1)
    for label, time, value in points:
        handles[label] = accuracy_axis.plot([time], [value], marker="*", markersize=12, linestyle="none", color="black")[0]
        finals[label] = [value]
    if target is not None:
        accuracy_axis.axhline(100 * target, color="grey", linestyle="--", linewidth=1)
    accuracy_axis.set(xlabel=f"training {unit}", ylabel="validation accuracy (%)", title="Validation accuracy after each epoch")
    loss_axis.set(xlabel=f"training {unit}", ylabel="training loss", title="Training loss (logged steps)")
    accuracy_axis.legend(list(handles.values()), [group_legend(label, finals[label]) for label in handles], fontsize=8)
    loss_axis.legend([handles[label] for label in colours], list(colours), fontsize=8)
    if title:
        figure.suptitle(title)
    for axis in (accuracy_axis, loss_axis):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def budget_means(ends: list[tuple[float, float]], tolerance: float = 0.25) -> list[tuple[float, float]]:
    """(time, accuracy) of runs grouped into budgets (times within `tolerance` of the group's
    first), as each budget's mean time and mean accuracy, shortest first."""
    groups = []
    for time, accuracy in sorted(ends):
        if groups and time <= groups[-1][0][0] * (1 + tolerance):
            groups[-1].append((time, accuracy))
        else:
            groups.append([(time, accuracy)])
    return [(float(np.mean([t for t, _ in g])), float(np.mean([a for _, a in g]))) for g in groups]


def plot_final_accuracy(run_dirs, labels=None, points=(), title=None):
    """Each run's last validation accuracy against its training time, on a log time axis: one
    marker per run (seeds of a budget side by side), and a line through each label's budget
    means, so recipes compare at every length at once. `points` as in plot_runs."""
    labels = run_labels(run_dirs, labels)
    ends = {}
    for run_dir, label in zip(run_dirs, labels):
        last = read_log(run_dir)[0][-1]
        ends.setdefault(label, []).append((last["train_seconds"] / 60, 100 * last["eval_accuracy"]))
    figure = Figure(figsize=(7.5, 4.6))
    axis = figure.subplots()
    for label, runs in ends.items():
        means = budget_means(runs)
        (line,) = axis.plot(*zip(*means), marker="o", label=label)
        axis.plot(*zip(*runs), marker=".", linestyle="none", color=line.get_color(), alpha=0.6)
        for time, accuracy in means:
            axis.annotate(f"{accuracy:.2f}", (time, accuracy), textcoords="offset points", xytext=(4, -12), fontsize=8,
                          color=line.get_color())
    for label, time, value in points:
        axis.plot([time], [value], marker="*", markersize=12, linestyle="none", color="black", label=f"{label}: {value:.2f}%")
    axis.set(xscale="log", xlabel="training minutes (log scale)", ylabel="validation accuracy (%)",
             title=title or "Validation accuracy of each run's last model")
    times = [time for runs in ends.values() for time, _ in runs] + [time for _, time, _ in points]
    ticks = [t for t in (1, 2, 5, 10, 20, 30, 60, 120, 240, 480, 960, 1920) if min(times) / 1.6 <= t <= max(times) * 1.6]
    axis.set_xticks(ticks, [f"{t:g}" for t in ticks])
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def plot_training_log(run_dir):
    """One run: training and validation loss against steps, validation accuracy against
    epochs, both optimisers' learning rates against steps."""
    evaluations, losses = read_log(run_dir)
    figure = Figure(figsize=(14, 3.8))
    loss_axis, accuracy_axis, rate_axis = figure.subplots(1, 3)
    loss_axis.plot([r["step"] for r in losses], [r["train_loss"] for r in losses], label="train (batch)", alpha=0.7)
    loss_axis.plot([r["step"] for r in evaluations], [r["eval_loss"] for r in evaluations], "o-", label="validation")
    accuracy_axis.plot([r["epoch"] for r in evaluations], [r["eval_accuracy"] for r in evaluations], "o-", color="#1a7f37")
    for key, name in (("learning_rate", "backbone (SGD)"), ("transformer_learning_rate", "transformer (AdamW)")):
        rate_axis.plot([r["step"] for r in losses if key in r], [r[key] for r in losses if key in r], label=name)
    loss_axis.set(xlabel="step", ylabel="loss", title="Loss")
    accuracy_axis.set(xlabel="epoch", ylabel="accuracy", title=f"Validation accuracy (last {evaluations[-1]['eval_accuracy']:.1%})")
    rate_axis.set(xlabel="step", ylabel="learning rate", title="Learning rates", yscale="log")
    loss_axis.legend()
    rate_axis.legend()
    figure.tight_layout()
    return figure
