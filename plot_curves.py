"""Plot validation accuracy and training loss of one or more runs against training time, from
the training_log.json that run_train.py writes into each output folder.

    python plot_curves.py outputs/run-a outputs/run-b --labels "with" "without" --output curves.png
    python plot_curves.py outputs/gpu-run --seconds --target 0.94     # and each run's time to 94%
    python plot_curves.py outputs/s0 outputs/s1 --labels recipe recipe --point "airbench94=17.9,89.88"
    python plot_curves.py m20/s0 m20/s1 m60/s0 --labels hybrid hybrid hybrid --final  # last accuracy vs time

Runs given the same label are seeds of one recipe: one colour, and their mean in the legend.
"""

import argparse
import sys

from errors import UserError, command
from training_curves import plot_final_accuracy, plot_runs, run_labels, time_to_target


def parse_point(text: str) -> tuple[str, float, float]:
    label, _, numbers = text.rpartition("=")
    try:
        time, accuracy = (float(number) for number in numbers.split(","))
    except ValueError:
        raise UserError(f"--point {text!r}: expected LABEL=TIME,ACCURACY, e.g. airbench94=17.9,89.88") from None
    return label, time, accuracy


@command
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run_train.py output folders")
    parser.add_argument("--labels", nargs="+", help="one legend label per run (default: folder names)")
    parser.add_argument("--output", default="curves.png", help="PNG file to write")
    parser.add_argument("--seconds", action="store_true", help="training seconds on the x axis instead of minutes")
    parser.add_argument("--target", type=float, help="an accuracy (e.g. 0.94) to draw and to report each run's time to")
    parser.add_argument("--title", help="a title over both plots")
    parser.add_argument("--point", action="append", default=[], metavar="LABEL=TIME,ACCURACY",
                        help="a result without a training log, drawn as a star: its time (in the axis' unit) and accuracy in %%")
    parser.add_argument("--final", action="store_true",
                        help="one point per run, its last accuracy against its minutes (log scale), a line through each label's budgets")
    args = parser.parse_args(argv)
    if args.final and args.seconds:
        raise UserError("--seconds is for the curves; --final draws minutes on a log axis")
    points = [parse_point(p) for p in args.point]
    if args.final:
        figure = plot_final_accuracy(args.runs, args.labels, points, args.title)
    else:
        figure = plot_runs(args.runs, args.labels, args.seconds, args.target, args.title, points)
    if args.target is not None:
        for run, label in zip(args.runs, run_labels(args.runs, args.labels)):
            print(f"{label}: {time_to_target(run, args.target)}")
    figure.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
