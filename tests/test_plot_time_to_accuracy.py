"""scripts/plot_time_to_accuracy.py: one line per training log, and the first evaluation
that reached the target named for each run."""

import json
import subprocess
import sys

from tests.conftest import PROJECT_ROOT


def test_plot_names_when_each_run_first_reached_the_target(tmp_path):
    fast = tmp_path / "fast" / "training_log.json"
    slow = tmp_path / "slow" / "training_log.json"
    for path, accuracies in ((fast, [0.5, 0.93, 0.945, 0.95]), (slow, [0.4, 0.8, 0.9])):
        path.parent.mkdir()
        history = [{"step": 10, "train_loss": 2.0, "learning_rate": 0.1}]  # loss entries are skipped
        history += [{"step": 10 * i, "epoch": i, "train_seconds": 12.5 * i, "eval_accuracy": a} for i, a in enumerate(accuracies, 1)]
        path.write_text(json.dumps(history))
    output = tmp_path / "curve.png"
    result = subprocess.run(
        [sys.executable, "scripts/plot_time_to_accuracy.py", f"quick run={fast}", str(slow), "--target", "0.94",
         "--output", str(output)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "quick run: 94.50% at 37.5 s" in result.stdout
    assert "slow: never reached 94%; best 90.00%, last at 37.5 s" in result.stdout
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_log_without_evaluations_is_a_clear_error(tmp_path):
    log = tmp_path / "training_log.json"
    log.write_text(json.dumps([{"step": 10, "train_loss": 2.0}]))
    result = subprocess.run([sys.executable, "scripts/plot_time_to_accuracy.py", str(log), "--output", str(tmp_path / "x.png")],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "has no evaluations" in result.stderr
    assert not (tmp_path / "x.png").exists()
