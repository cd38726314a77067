"""Plot validation accuracy and training loss of one or more runs against training minutes.

Reads the `training_log.json` that run_train.py writes into each output folder:

    python scripts/plot_curves.py outputs/run-a outputs/run-b --labels "AdamW" "SGD" --output curves.png
    python scripts/plot_curves.py outputs/gpu-run --seconds --target 0.94   # time to 94%

With `--target`, the target is drawn as a line and each run's first evaluation at or
above it is printed (or that the run never reached it).
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_log(run_dir) -> tuple[list[dict], list[dict]]:
    """(evaluations, training-loss records) from a run folder's training_log.json."""
    path = Path(run_dir) / "training_log.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run_train.py output folder?")
    records = json.loads(path.read_text())
    evaluations = [r for r in records if "eval_accuracy" in r and "train_seconds" in r]
    if not evaluations:
        raise ValueError(f"{path} has no per-epoch evaluations yet")
    return evaluations, [r for r in records if "train_loss" in r]


def time_to_target(run_dir, target: float) -> str:
    """When a run's validation accuracy first reached `target`, in words."""
    evaluations, _ = read_log(run_dir)
    hit = next((r for r in evaluations if r["eval_accuracy"] >= target), None)
    if hit is None:
        best = max(r["eval_accuracy"] for r in evaluations)
        return f"never reached {100 * target:g}%: best {100 * best:.2f}%, last evaluation at {evaluations[-1]['train_seconds']:.1f} s"
    return f"{100 * hit['eval_accuracy']:.2f}% at {hit['train_seconds']:.1f} s (epoch {hit['epoch']:g})"


def plot_curves(run_dirs, labels=None, seconds=False, target=None, title=None):
    labels = labels or [Path(d).name for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    unit = "seconds" if seconds else "minutes"
    figure, (accuracy_axis, loss_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run_dir, label in zip(run_dirs, labels):
        evaluations, losses = read_log(run_dir)
        times = [r["train_seconds"] / (1 if seconds else 60) for r in evaluations]  # in `unit`
        accuracy = [100 * r["eval_accuracy"] for r in evaluations]
        (line,) = accuracy_axis.plot(times, accuracy, marker="o", markersize=3, label=f"{label}: {max(accuracy):.2f}%")
        # Training-loss records carry steps, not seconds: place them by the epoch clock.
        epochs = [r["epoch"] for r in evaluations]
        if losses:
            loss_times = np.interp([r["epoch"] for r in losses], [0.0, *epochs], [0.0, *times])
            loss_axis.plot(loss_times, [r["train_loss"] for r in losses], color=line.get_color(), linewidth=1, label=label)
    if target is not None:
        accuracy_axis.axhline(100 * target, color="grey", linestyle="--", linewidth=1)
    accuracy_axis.set(xlabel=f"training {unit}", ylabel="validation accuracy (%)", title="Validation accuracy after each epoch")
    loss_axis.set(xlabel=f"training {unit}", ylabel="training loss", title="Training loss (logged steps)")
    if title:
        figure.suptitle(title)
    for axis in (accuracy_axis, loss_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run_train.py output folders")
    parser.add_argument("--labels", nargs="+", help="one legend label per run (default: folder names)")
    parser.add_argument("--output", default="curves.png", help="PNG file to write")
    parser.add_argument("--seconds", action="store_true", help="training seconds on the x axis instead of minutes")
    parser.add_argument("--target", type=float, help="an accuracy (e.g. 0.94) to draw and to report each run's time to")
    parser.add_argument("--title", help="a title over both plots")
    args = parser.parse_args(argv)
    try:
        figure = plot_curves(args.runs, args.labels, args.seconds, args.target, args.title)
        if args.target is not None:
            for run, label in zip(args.runs, args.labels or [Path(d).name for d in args.runs]):
                print(f"{label}: {time_to_target(run, args.target)}")
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    figure.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
