"""scripts/plot_curves.py: learning curves of run folders, and clear errors for folders that are not runs."""

import importlib.util
import json

from PIL import Image

from tests.conftest import PROJECT_ROOT

spec = importlib.util.spec_from_file_location("plot_curves", PROJECT_ROOT / "scripts/plot_curves.py")
plot_curves = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_curves)


def fake_run(folder, accuracies, seconds_per_epoch):
    records = []
    for epoch, accuracy in enumerate(accuracies, start=1):
        records.append({"step": 10 * epoch - 5, "epoch": epoch - 0.5, "train_loss": 2.0 / epoch, "learning_rate": 0.1})
        records.append({"step": 10 * epoch, "epoch": float(epoch), "train_seconds": seconds_per_epoch * epoch,
                        "eval_accuracy": accuracy, "eval_loss": 1.0, "eval_samples": 100})
    folder.mkdir()
    (folder / "training_log.json").write_text(json.dumps(records))
    return folder


def test_curves_are_drawn_against_training_minutes_with_the_best_accuracy_in_the_legend(tmp_path):
    a = fake_run(tmp_path / "a", [0.5, 0.7, 0.65], seconds_per_epoch=60)
    b = fake_run(tmp_path / "b", [0.4, 0.8], seconds_per_epoch=120)
    figure = plot_curves.plot_curves([a, b], ["AdamW", "SGD"])
    accuracy_axis, loss_axis = figure.axes
    first, second = accuracy_axis.get_lines()
    assert list(first.get_xdata()) == [1.0, 2.0, 3.0] and list(second.get_xdata()) == [2.0, 4.0]
    assert list(second.get_ydata()) == [40.0, 80.0]
    assert [t.get_text() for t in accuracy_axis.get_legend().get_texts()] == ["AdamW: 70.00%", "SGD: 80.00%"]
    # Loss records logged mid-epoch sit half-way through that epoch's minutes.
    assert list(loss_axis.get_lines()[1].get_xdata()) == [1.0, 3.0]

    output = tmp_path / "curves.png"
    assert plot_curves.main([str(a), str(b), "--output", str(output)]) == 0
    assert Image.open(output).size[0] > 500


def test_a_folder_without_a_log_or_a_wrong_label_count_is_one_clear_error(tmp_path, capsys):
    a = fake_run(tmp_path / "a", [0.5], seconds_per_epoch=60)
    output = tmp_path / "curves.png"
    assert plot_curves.main([str(a), str(tmp_path / "missing"), "--output", str(output)]) == 2
    assert "missing/training_log.json not found" in capsys.readouterr().err
    assert plot_curves.main([str(a), "--labels", "x", "y", "--output", str(output)]) == 2
    assert "2 labels for 1 runs" in capsys.readouterr().err
    assert not output.exists()


def test_seconds_axis_and_time_to_target_are_reported_per_run(tmp_path, capsys):
    fast = fake_run(tmp_path / "fast", [0.5, 0.93, 0.945, 0.95], seconds_per_epoch=12.5)
    slow = fake_run(tmp_path / "slow", [0.4, 0.8, 0.9], seconds_per_epoch=12.5)
    figure = plot_curves.plot_curves([fast, slow], seconds=True, target=0.94)
    accuracy_axis = figure.axes[0]
    assert list(accuracy_axis.get_lines()[0].get_xdata()) == [12.5, 25.0, 37.5, 50.0]
    assert accuracy_axis.get_xlabel() == "training seconds"
    assert any(list(line.get_ydata()) == [94.0, 94.0] for line in accuracy_axis.get_lines())  # the target line

    output = tmp_path / "curve.png"
    assert plot_curves.main([str(fast), str(slow), "--seconds", "--target", "0.94", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "fast: 94.50% at 37.5 s (epoch 3)" in printed
    assert "slow: never reached 94%: best 90.00%, last evaluation at 37.5 s" in printed
