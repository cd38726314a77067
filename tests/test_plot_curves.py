"""plot_curves.py and training_curves.py: learning curves of run folders against training time,
each run's time to a target accuracy, one run's log against its steps, and one clear error for
a folder that is not a run."""

import json
import subprocess
import sys

import pytest
from PIL import Image

import plot_curves
from tests.conftest import PROJECT_ROOT, make_image_dataset
from training_curves import plot_final_accuracy, plot_runs, plot_training_log, time_to_target


def fake_run(folder, accuracies, seconds_per_epoch):
    """A run folder whose training_log.json has a loss record half-way through each epoch and
    an evaluation at its end, as run_train.py writes them."""
    records = []
    for epoch, accuracy in enumerate(accuracies, start=1):
        records.append({"step": 10 * epoch - 5, "epoch": epoch - 0.5, "train_loss": 2.0 / epoch, "learning_rate": 0.1,
                        "transformer_learning_rate": 0.001})
        records.append({"step": 10 * epoch, "epoch": float(epoch), "train_seconds": seconds_per_epoch * epoch,
                        "eval_accuracy": accuracy, "eval_loss": 1.0})
    folder.mkdir()
    (folder / "training_log.json").write_text(json.dumps(records))
    return folder


def test_curves_are_drawn_against_training_minutes_with_the_last_accuracy_in_the_legend(tmp_path):
    """The project saves the last model, so the legend gives each run's last accuracy, not its best."""
    a = fake_run(tmp_path / "a", [0.5, 0.7, 0.65], seconds_per_epoch=60)
    b = fake_run(tmp_path / "b", [0.4, 0.8], seconds_per_epoch=120)
    figure = plot_runs([a, b], ["AdamW", "SGD"])
    accuracy_axis, loss_axis = figure.axes
    first, second = accuracy_axis.get_lines()
    assert list(first.get_xdata()) == [1.0, 2.0, 3.0] and list(second.get_xdata()) == [2.0, 4.0]
    assert list(second.get_ydata()) == [40.0, 80.0]
    assert accuracy_axis.get_xlabel() == "training minutes"
    assert [t.get_text() for t in accuracy_axis.get_legend().get_texts()] == ["AdamW: 65.00%", "SGD: 80.00%"]
    # Loss records logged mid-epoch sit half-way through that epoch's minutes.
    assert list(loss_axis.get_lines()[1].get_xdata()) == [1.0, 3.0]
    assert list(loss_axis.get_lines()[1].get_ydata()) == [2.0, 1.0]

    output = tmp_path / "curves.png"
    assert plot_curves.main([str(a), str(b), "--output", str(output)]) == 0
    assert Image.open(output).size[0] > 500


def test_a_folder_without_a_log_or_evaluation_or_a_wrong_label_count_is_one_clear_error(tmp_path, capsys):
    a = fake_run(tmp_path / "a", [0.5], seconds_per_epoch=60)
    output = tmp_path / "curves.png"
    assert plot_curves.main([str(a), str(tmp_path / "missing"), "--output", str(output)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'missing' / 'training_log.json'} not found")
    assert plot_curves.main([str(a), "--labels", "x", "y", "--output", str(output)]) == 2
    assert capsys.readouterr().err == "error: 2 labels for 1 runs\n"
    unevaluated = tmp_path / "unevaluated"
    unevaluated.mkdir()
    (unevaluated / "training_log.json").write_text(json.dumps([{"step": 5, "epoch": 0.5, "train_loss": 2.0}]))
    assert plot_curves.main([str(unevaluated), "--output", str(output)]) == 2
    assert "has no evaluation yet" in capsys.readouterr().err
    assert not output.exists()


def test_seconds_axis_and_time_to_target_are_reported_per_run(tmp_path, capsys):
    fast = fake_run(tmp_path / "fast", [0.5, 0.93, 0.945, 0.95], seconds_per_epoch=12.5)
    slow = fake_run(tmp_path / "slow", [0.4, 0.9, 0.8], seconds_per_epoch=12.5)
    figure = plot_runs([fast, slow], seconds=True, target=0.94)
    accuracy_axis = figure.axes[0]
    assert list(accuracy_axis.get_lines()[0].get_xdata()) == [12.5, 25.0, 37.5, 50.0]
    assert accuracy_axis.get_xlabel() == "training seconds"
    assert any(list(line.get_ydata()) == [94.0, 94.0] for line in accuracy_axis.get_lines())  # the target line

    output = tmp_path / "curve.png"
    assert plot_curves.main([str(fast), str(slow), "--seconds", "--target", "0.94", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "fast: 94.50% at 37.5 s (epoch 3)" in printed
    assert "slow: never reached 94%: best 90.00%, last evaluation at 37.5 s" in printed


# ------------------------------------------------------------------ a real run's log


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, env):
    """A two-epoch run_train.py folder (24 training images, batch 4: 6 steps an epoch), its
    loss logged every 2 steps."""
    root = tmp_path_factory.mktemp("curves")
    make_image_dataset(num_per_class=10, seed=0).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    out = root / "run"
    command = [sys.executable, str(PROJECT_ROOT / "run_train.py"), "--dataset_name", str(root / "data"),
               "--output_dir", str(out), "--train_val_split", "0.2", "--per_device_train_batch_size", "4",
               "--per_device_eval_batch_size", "8", "--max_train_steps", "12", "--logging_steps", "2",
               "--checkpointing_steps", "null", "--report_to", "none", "--mixed_precision", "no",
               "--backbone_hidden_sizes", "8,16", "--token_stages", "1", "--hidden_size", "16", "--num_hidden_layers", "1",
               "--class_attention_layers", "1", "--num_attention_heads", "2", "--intermediate_size", "32"]
    result = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_one_runs_log_shows_its_losses_accuracy_and_both_learning_rates_against_steps(trained_run):
    log = json.loads((trained_run / "training_log.json").read_text())
    losses = [r for r in log if "train_loss" in r]
    evaluations = [r for r in log if "eval_accuracy" in r]
    assert [r["step"] for r in losses] == [2, 4, 6, 8, 10, 12] and [r["step"] for r in evaluations] == [6, 12]
    figure = plot_training_log(trained_run)
    loss_axis, accuracy_axis, rate_axis = figure.axes
    train, validation = loss_axis.get_lines()
    assert list(train.get_xdata()) == [2, 4, 6, 8, 10, 12] and list(validation.get_xdata()) == [6, 12]
    assert list(accuracy_axis.get_lines()[0].get_ydata()) == [r["eval_accuracy"] for r in evaluations]
    assert accuracy_axis.get_title() == f"Validation accuracy (last {evaluations[-1]['eval_accuracy']:.1%})"
    backbone, transformer = rate_axis.get_lines()
    assert [t.get_text() for t in rate_axis.get_legend().get_texts()] == ["backbone (SGD)", "transformer (AdamW)"]
    assert list(backbone.get_ydata()) == [r["learning_rate"] for r in losses]
    assert list(transformer.get_ydata()) == [r["transformer_learning_rate"] for r in losses]
    assert max(backbone.get_ydata()) > max(transformer.get_ydata())  # default.yaml's 0.2 against 1e-3


def test_the_command_plots_a_run_that_run_train_wrote(trained_run, tmp_path, env):
    output = tmp_path / "curves.png"
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "plot_curves.py"), str(trained_run), "--seconds",
                             "--target", "0.01", "--output", str(output)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluations = [r for r in json.loads((trained_run / "training_log.json").read_text()) if "eval_accuracy" in r]
    hit = next((r for r in evaluations if r["eval_accuracy"] >= 0.01), None)
    expected = f"at {hit['train_seconds']:.1f} s (epoch {hit['epoch']:g})" if hit else "never reached 1%"
    assert f"run: {time_to_target(trained_run, 0.01)}" in result.stdout and expected in result.stdout
    assert Image.open(output).size[0] > 500
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "plot_curves.py"), str(tmp_path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_seeds_of_one_recipe_share_a_colour_and_a_mean_and_a_reference_result_is_a_point(tmp_path, capsys):
    runs = [fake_run(tmp_path / name, accuracies, 60) for name, accuracies in
            (("a0", [0.5, 0.80]), ("a1", [0.5, 0.84]), ("b0", [0.6, 0.70]))]
    figure = plot_runs(runs, ["recipe", "recipe", "control"], points=[("airbench94", 17.9, 89.88)])
    accuracy_axis = figure.axes[0]
    first, second, third, star = accuracy_axis.get_lines()
    assert first.get_color() == second.get_color() != third.get_color()
    assert (list(star.get_xdata()), list(star.get_ydata())) == ([17.9], [89.88])
    assert [t.get_text() for t in accuracy_axis.get_legend().get_texts()] == [
        "recipe: 82.00% ± 2.83 (2 runs)", "control: 70.00%", "airbench94: 89.88%"]
    output = tmp_path / "help.png"
    assert plot_curves.main([*map(str, runs), "--labels", "r", "r", "c", "--point", "airbench94=17.9,89.88", "--output", str(output)]) == 0
    assert output.is_file()
    assert plot_curves.main([str(runs[0]), "--point", "airbench94=fast", "--output", str(output)]) == 2
    assert "expected LABEL=TIME,ACCURACY" in capsys.readouterr().err


def test_final_mode_draws_each_run_once_and_joins_a_recipes_budget_means_on_a_log_axis(tmp_path):
    """The transformer question's figure: three seeds at 20 minutes, one at 60, per recipe."""
    runs, labels = [], []
    for recipe, offset in (("hybrid", 0.01), ("backbone", 0.0)):
        for name, accuracies, seconds in (("s0", [0.80, 0.86], 600), ("s1", [0.80, 0.88], 620), ("s2", [0.80, 0.87], 580),
                                          ("long", [0.85, 0.90, 0.91], 1200)):
            runs.append(fake_run(tmp_path / f"{recipe}-{name}", [a + offset for a in accuracies], seconds))
            labels.append(recipe)
    figure = plot_final_accuracy(runs, labels, points=[("airbench94", 17.5, 85.16)])
    (axis,) = figure.axes
    assert axis.get_xscale() == "log"
    assert [t.get_text() for t in axis.get_xticklabels()] == ["20", "30", "60"]  # minutes, as written
    mean_line, seeds, *_ = axis.get_lines()
    assert list(mean_line.get_xdata()) == pytest.approx([20.0, 60.0])  # the 20-minute seeds become one mean
    assert list(mean_line.get_ydata()) == pytest.approx([88.0, 92.0])
    assert len(seeds.get_xdata()) == 4
    assert [t.get_text() for t in axis.get_legend().get_texts()] == ["hybrid", "backbone", "airbench94: 85.16%"]
    output = tmp_path / "final.png"
    assert plot_curves.main([*map(str, runs), "--labels", *labels, "--final", "--output", str(output)]) == 0
    assert Image.open(output).size[0] > 500
    # --seconds belongs to the curves: with --final it is one clear error, and nothing is written.
    assert plot_curves.main([*map(str, runs), "--labels", *labels, "--final", "--seconds", "--output", str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists()
