"""Plot validation accuracy and training loss of one or more runs against training time, from
the training_log.json that run_train.py writes into each output folder.

    python plot_curves.py outputs/run-a outputs/run-b --labels "with" "without" --output curves.png
    python plot_curves.py outputs/gpu-run --seconds --target 0.94     # and each run's time to 94%
"""

import argparse
import sys
from pathlib import Path

from errors import command
from training_curves import plot_runs, time_to_target


@command
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run_train.py output folders")
    parser.add_argument("--labels", nargs="+", help="one legend label per run (default: folder names)")
    parser.add_argument("--output", default="curves.png", help="PNG file to write")
    parser.add_argument("--seconds", action="store_true", help="training seconds on the x axis instead of minutes")
    parser.add_argument("--target", type=float, help="an accuracy (e.g. 0.94) to draw and to report each run's time to")
    parser.add_argument("--title", help="a title over both plots")
    args = parser.parse_args(argv)
    figure = plot_runs(args.runs, args.labels, args.seconds, args.target, args.title)
    if args.target is not None:
        for run, label in zip(args.runs, args.labels or [Path(d).name for d in args.runs]):
            print(f"{label}: {time_to_target(run, args.target)}")
    figure.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
