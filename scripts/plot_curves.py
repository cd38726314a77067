"""Plot validation accuracy and training loss of one or more runs against training minutes.

Reads the `training_log.json` that run_train.py writes into each output folder:

    python scripts/plot_curves.py outputs/run-a outputs/run-b --labels "AdamW" "SGD" --output curves.png
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


def plot_curves(run_dirs, labels=None):
    labels = labels or [Path(d).name for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    figure, (accuracy_axis, loss_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run_dir, label in zip(run_dirs, labels):
        evaluations, losses = read_log(run_dir)
        minutes = [r["train_seconds"] / 60 for r in evaluations]
        accuracy = [100 * r["eval_accuracy"] for r in evaluations]
        (line,) = accuracy_axis.plot(minutes, accuracy, marker="o", markersize=3, label=f"{label}: {max(accuracy):.2f}%")
        # Training-loss records carry steps, not seconds: place them by the epoch clock.
        epochs = [r["epoch"] for r in evaluations]
        if losses:
            loss_minutes = np.interp([r["epoch"] for r in losses], [0.0, *epochs], [0.0, *minutes])
            loss_axis.plot(loss_minutes, [r["train_loss"] for r in losses], color=line.get_color(), linewidth=1, label=label)
    accuracy_axis.set(xlabel="training minutes", ylabel="validation accuracy (%)", title="Validation accuracy after each epoch")
    loss_axis.set(xlabel="training minutes", ylabel="training loss", title="Training loss (logged steps)")
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
    args = parser.parse_args(argv)
    try:
        figure = plot_curves(args.runs, args.labels)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    figure.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
