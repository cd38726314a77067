"""Validation accuracy against training seconds, one line per run, from the
`training_log.json` files that run_train.py writes (its per-epoch evaluations carry the
training time so far, evaluation excluded):

    python scripts/plot_time_to_accuracy.py "fast, 50 epochs=outputs/a/training_log.json" \
        outputs/b/training_log.json --target 0.94 --output docs/gpu_time_to_accuracy.png

A run given as LABEL=PATH is labelled LABEL, else by its folder's name. Prints, for each
run, the first evaluation at or above --target (or that none reached it).
"""

import argparse
import json
from pathlib import Path


def curve(path) -> tuple[list[float], list[float]]:
    history = json.loads(Path(path).read_text())
    evaluations = [entry for entry in history if "eval_accuracy" in entry]
    if not evaluations:
        raise SystemExit(f"error: {path} has no evaluations (eval_accuracy entries)")
    return [e["train_seconds"] for e in evaluations], [e["eval_accuracy"] for e in evaluations]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="training_log.json files, each optionally as LABEL=PATH")
    parser.add_argument("--target", type=float, default=0.94, help="accuracy drawn as a line and looked up in each run")
    parser.add_argument("--title", default="Validation accuracy against training time")
    parser.add_argument("--output", default="time_to_accuracy.png")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run in args.runs:
        label, _, path = run.rpartition("=")
        label = label or Path(path).parent.name
        seconds, accuracy = curve(path)
        ax.plot(seconds, [100 * a for a in accuracy], marker=".", markersize=3, linewidth=1.2, label=label)
        hit = next(((s, a) for s, a in zip(seconds, accuracy) if a >= args.target), None)
        print(f"{label}: " + (f"{100 * hit[1]:.2f}% at {hit[0]:.1f} s" if hit else
                              f"never reached {100 * args.target:.0f}%; best {100 * max(accuracy):.2f}%, last at {seconds[-1]:.1f} s"))
    ax.axhline(100 * args.target, color="grey", linestyle="--", linewidth=1)
    ax.text(ax.get_xlim()[0], 100 * args.target + 0.3, f" target {100 * args.target:.0f}%", color="grey", fontsize=8)
    ax.set_xlabel("training time (s), evaluations excluded")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_ylim(40, 100)
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
