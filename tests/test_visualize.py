"""visualize.py and run_eval.py: the attention maths on hand-built matrices with known
answers, both command lines on a tiny saved model, and the analysis notebook end to end."""

import json
import math
import os
import subprocess
import sys
import tempfile

import nbformat
import pytest
import torch
from PIL import Image

import cifar10_data
import run_eval
import run_folder
import visualize
from configuration_hybrid_vit import HybridViTConfig
from modeling_hybrid_vit import HybridViTForImageClassification, save_model_and_processor
from tests.conftest import PROJECT_ROOT, TINY_MODEL, make_image_dataset

NOTEBOOK = PROJECT_ROOT / "notebooks" / "attention_analysis.ipynb"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path_factory.mktemp("hf_cache")),
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An untrained tiny model for the tiny dataset's 3 classes, with a short training log."""
    folder = tmp_path_factory.mktemp("tiny_model")
    names = [f"class_{i}" for i in range(3)]
    config = HybridViTConfig(**TINY_MODEL, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    torch.manual_seed(0)
    save_model_and_processor(HybridViTForImageClassification(config).eval(), folder)
    log = [{"step": s, "epoch": s / 4, "train_loss": 1.1 - 0.05 * s, "learning_rate": 1e-3} for s in range(1, 9)]
    log.insert(4, {"step": 4, "epoch": 1.0, "train_seconds": 1.0, "eval_accuracy": 0.4, "eval_loss": 1.0, "eval_samples": 3})
    log.append({"step": 8, "epoch": 2.0, "train_seconds": 2.0, "eval_accuracy": 0.6, "eval_loss": 0.9, "eval_samples": 3})
    (folder / "training_log.json").write_text(json.dumps(log))
    return folder


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    """Two parquet folders like the shared CIFAR-10 copy, 30 training images of 3 classes
    each: `with_test` also has a test split of 9, `train_only` has none."""
    with_test, train_only = tmp_path_factory.mktemp("with_test"), tmp_path_factory.mktemp("train_only")
    train = make_image_dataset(num_per_class=10, seed=0)
    for folder in (with_test, train_only):
        train.to_parquet(str(folder / "train-00000-of-00001.parquet"))
    make_image_dataset(num_per_class=3, seed=1).to_parquet(str(with_test / "test-00000-of-00001.parquet"))
    return with_test, train_only


def run_scripts(commands, env):
    """Run (script, args) command lines side by side, each in its own process from the
    project root, and return their CompletedProcess results in order. In parallel because
    each spends seconds importing torch and transformers; output goes to files, which,
    unlike pipes, cannot fill up and block a process while another is being waited for."""
    logs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in commands]
    processes = [
        subprocess.Popen([sys.executable, script, *map(str, args)], cwd=PROJECT_ROOT, env=env, stdout=out, stderr=err, text=True)
        for (script, args), (out, err) in zip(commands, logs)
    ]
    results = []
    for process, (out, err) in zip(processes, logs):
        process.wait(timeout=300)
        out.seek(0)
        err.seek(0)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out.read(), err.read()))
        out.close()
        err.close()
    return results


def softmax_attention(B, H, T, seed=0):
    return torch.randn(B, H, T, T, generator=torch.Generator().manual_seed(seed)).softmax(-1)


def assert_png(path):
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_SIGNATURE


# ------------------------------------------------------------------------ attention maths


def test_rollout_of_identity_attention_is_identity():
    eye = torch.eye(5).expand(2, 3, 5, 5)
    rollout = visualize.attention_rollout((eye, eye, eye))
    torch.testing.assert_close(rollout, torch.eye(5).expand(2, 5, 5))


def test_rollout_of_two_layers_matches_the_hand_computation():
    # Layer 1: heads [[1,0],[0,1]] and [[0,1],[0,1]] average to [[.5,.5],[0,1]];
    # + I and renormalised: [[.75,.25],[0,1]]. Layer 2: [[0,1],[1,0]] -> [[.5,.5],[.5,.5]].
    # Rollout = layer 2 @ layer 1 = [[.375,.625],[.375,.625]] (the other order gives all .5).
    layer1 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]])[None]
    layer2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).expand(1, 2, 2, 2)
    rollout = visualize.attention_rollout((layer1, layer2))
    torch.testing.assert_close(rollout, torch.tensor([[[0.375, 0.625], [0.375, 0.625]]]))


def test_rollout_rows_sum_to_one_and_the_map_is_the_cls_row():
    attentions = tuple(softmax_attention(3, 2, 10, seed) for seed in range(4))  # 3x3 grid + CLS
    rollout = visualize.attention_rollout(attentions)
    assert rollout.shape == (3, 10, 10)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(3, 10))
    maps = visualize.rollout_map(attentions)
    assert maps.shape == (3, 3, 3)
    torch.testing.assert_close(maps.amax(dim=(1, 2)), torch.ones(3))
    cls_row = rollout[:, 0, 1:]
    torch.testing.assert_close(maps, (cls_row / cls_row.amax(-1, keepdim=True)).reshape(3, 3, 3))


def test_cls_attention_is_the_cls_row_of_the_chosen_layer():
    attentions = (softmax_attention(2, 4, 17, 0), softmax_attention(2, 4, 17, 1))
    last = visualize.cls_attention(attentions)
    assert last.shape == (2, 4, 4, 4)
    torch.testing.assert_close(last[1, 2].flatten(), attentions[1][1, 2, 0, 1:])
    torch.testing.assert_close(visualize.cls_attention(attentions, layer=0)[0, 3].flatten(), attentions[0][0, 3, 0, 1:])


def neighbour_attention(g, shift, cls_mass=0.5):
    """(1, 1, T, T): every patch gives `cls_mass` to CLS and the rest to the patch `shift`
    (row, col) away, reflected back at the grid's edge so it stays one step away."""
    T = g * g + 1
    attention = torch.zeros(1, 1, T, T)
    attention[0, 0, 0] = 1.0 / T  # the CLS query: excluded from the distance
    for r in range(g):
        for c in range(g):
            dr, dc = shift
            tr = r + dr if 0 <= r + dr < g else r - dr
            tc = c + dc if 0 <= c + dc < g else c - dc
            attention[0, 0, 1 + r * g + c, 0] = cls_mass
            attention[0, 0, 1 + r * g + c, 1 + tr * g + tc] = 1.0 - cls_mass
    return attention


def test_mean_attention_distance_of_hand_built_patterns():
    patch_size = 4
    heads = torch.cat(
        [
            neighbour_attention(3, (0, 0)),  # each patch attends to itself: 0 pixels
            neighbour_attention(3, (0, 1)),  # right neighbour (left one in the last column): 4
            neighbour_attention(3, (1, 0)),  # the patch below: 4
            neighbour_attention(3, (1, 1)),  # diagonal: 4 * sqrt(2)
        ],
        dim=1,
    ).expand(2, -1, -1, -1)  # (B=2, heads=4, 10, 10)
    distance = visualize.mean_attention_distance(heads, patch_size)
    torch.testing.assert_close(distance, torch.tensor([0.0, 4.0, 4.0, 4 * math.sqrt(2)]))
    # Uniform attention over a 2x2 grid: from each patch, distances 0, p, p and p*sqrt(2).
    uniform = torch.full((1, 1, 5, 5), 0.2)
    torch.testing.assert_close(
        visualize.mean_attention_distance(uniform, patch_size), torch.tensor([(2 + math.sqrt(2)) * patch_size / 4])
    )
    assert visualize.attention_distances((heads, heads), patch_size).shape == (2, 4)


def test_cls_entropy_is_log_n_for_uniform_and_zero_for_one_patch():
    uniform = torch.full((2, 1, 10, 10), 0.1)
    one_patch = torch.zeros(2, 1, 10, 10)
    one_patch[..., 3] = 1.0
    entropy = visualize.cls_attention_entropy((uniform, one_patch))
    torch.testing.assert_close(entropy, torch.tensor([[math.log(9)], [0.0]]))


def test_overlay_is_an_rgb_float_image_the_size_of_the_input():
    image = Image.new("L", (40, 24), 128)
    heatmap = torch.zeros(4, 4)
    heatmap[0, 0] = 1.0
    blended = visualize.overlay(image, heatmap)
    assert blended.shape == (24, 40, 3) and blended.dtype.kind == "f"
    assert 0.0 <= blended.min() and blended.max() <= 1.0
    # The hot corner is coloured differently from the cold opposite one.
    assert abs(blended[0, 0] - blended[-1, -1]).sum() > 0.3


def test_a_flat_map_is_drawn_mid_colormap_and_labelled_uniform():
    """A layer that attends evenly (its queries and keys decayed to zero, as in the release's
    second layer) gives a flat map. Stretched to its own range it would come out black, the
    look of no attention at all; it is drawn in the colormap's middle and labelled."""
    from matplotlib.figure import Figure

    image = Image.new("RGB", (8, 8), (128, 128, 128))
    flat, peaked = torch.full((4, 4), 1 / 17), torch.zeros(4, 4)
    peaked[1, 2] = 0.5
    assert visualize.is_uniform(flat) and not visualize.is_uniform(peaked)
    assert not visualize.is_uniform(flat + 1e-3 * torch.rand(4, 4))
    middle = visualize.matplotlib.colormaps[visualize.COLORMAP](0.5)[:3]
    expected = 0.45 * 128 / 255 + 0.55 * torch.tensor(middle)
    blended = torch.from_numpy(visualize.overlay(image, flat)).float()
    torch.testing.assert_close(blended, expected.float().expand(8, 8, 3), atol=1e-3, rtol=0)

    axes = Figure().subplots(1, 3)
    visualize.draw_map(axes[0], flat)  # the raw token grid
    visualize.draw_map(axes[1], flat, image)
    visualize.draw_map(axes[2], peaked)
    assert [[t.get_text() for t in ax.texts] for ax in axes] == [["uniform"], ["uniform"], []]
    grid = axes[0].images[0]
    assert grid.norm(1 / 17) == pytest.approx(0.5)  # the middle of the colormap, not its black end
    assert axes[2].images[0].norm(0.5) == pytest.approx(1.0)  # other maps: stretched to their range


# --------------------------------------------------------------------- model and datasets


def test_grayscale_and_rgba_images_are_predicted_as_rgb(model_dir):
    model, processor = run_folder.load_model(str(model_dir))
    rgb = Image.new("RGB", (16, 16), (90, 90, 90))
    images = [rgb.convert("L"), rgb.convert("RGBA"), rgb]
    outputs = visualize.predict(model, processor, images)
    assert len(outputs.attentions) == TINY_MODEL["num_hidden_layers"]
    torch.testing.assert_close(outputs.logits[0], outputs.logits[2])
    torch.testing.assert_close(outputs.logits[1], outputs.logits[2])
    for method in visualize.METHODS:
        fig = visualize.attention_figure(model, processor, images, names=["gray", "rgba", "rgb"], method=method)
        extra = method == "relevance"  # its own column, before the rollout
        assert len(fig.axes) == 3 * (3 + extra + TINY_MODEL["num_attention_heads"])


def test_the_figure_draws_the_heads_of_the_chosen_layer(model_dir, tmp_path, capsys):
    model, processor = run_folder.load_model(str(model_dir))
    image = Image.new("RGB", (16, 16), (90, 30, 200))
    layers = TINY_MODEL["num_hidden_layers"]
    for layer, expected in ((None, layers), (1, 1)):
        fig = visualize.attention_figure(model, processor, [image], names=["x"], method="heads", layer=layer)
        titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
        assert f"layer {expected} head 1" in titles and f"layer {expected} CLS, mean of heads" in titles
        assert f"in layer {expected} drawn" in fig._suptitle.get_text()
    with pytest.raises(run_folder.UserError, match=f"layer must be between 1 and {layers}"):
        visualize.attention_figure(model, processor, [image], names=["x"], layer=layers + 1)
    # On the command line: refused once the model is loaded, before any drawing; nothing written.
    image.save(tmp_path / "x.png")
    output = tmp_path / "a.png"
    code = visualize.main(["--model", str(model_dir), "--images", str(tmp_path / "x.png"), "--layer", str(layers + 1),
                           "--output", str(output)])
    assert code == 2 and not output.exists()
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --layer {layers + 1}: {model_dir} has {layers} transformer layers"
    )
    with pytest.raises(SystemExit):
        visualize.parse_args(["--model", "m", "--layer", "0"])


def test_the_validation_split_is_the_one_training_carved(model_dir, data_dirs, tmp_path):
    with_test, train_only = data_dirs
    dataset, _, label, split = run_folder.load_split(model_dir, str(with_test))
    assert split == "test" and len(dataset) == 9
    dataset, _, label, split = run_folder.load_split(model_dir, str(train_only))
    assert split == "validation" and len(dataset) == 3  # 10% of 30, the training default
    # A run's train_config.yaml sets the fraction and the seed.
    (tmp_path / "train_config.yaml").write_text("data:\n  train_val_split: 0.2\ntraining:\n  seed: 7\n")
    dataset, _, label, _ = run_folder.load_split(tmp_path, str(train_only), "validation")
    carved, _, _ = cifar10_data.load_splits(str(train_only), 0.2, 7)
    assert len(dataset) == 6 and dataset[label] == carved["validation"][label]
    with pytest.raises(run_folder.UserError, match="has no split 'test'"):
        run_folder.load_split(model_dir, str(train_only), "test")


def test_flip_tta_is_the_softmax_of_the_logits_averaged_with_the_mirrors(model_dir, data_dirs):
    """One test-time augmentation for training and run_eval.py: logits averaged, then softmax."""
    model, processor = run_folder.load_model(str(model_dir))
    dataset = cifar10_data.load_splits(str(data_dirs[0]))[0]["test"]
    labels, plain = run_eval.evaluate_model(model, processor, dataset, "img", "label", batch_size=4, progress=False)
    _, tta = run_eval.evaluate_model(model, processor, dataset, "img", "label", batch_size=4, tta=True, progress=False)
    pixels = processor(images=[image.convert("RGB") for image in dataset["img"]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits, flipped = model(pixel_values=pixels).logits, model(pixel_values=pixels.flip(-1)).logits
    assert labels.tolist() == list(dataset["label"])
    torch.testing.assert_close(plain, logits.softmax(-1))
    torch.testing.assert_close(tta, ((logits + flipped) / 2).softmax(-1))
    summary = run_eval.summarize(labels, tta, ["class_0", "class_1", "class_2"])
    assert sum(map(sum, summary["confusion_matrix"])) == 9
    assert summary["accuracy"] == pytest.approx(sum(summary["confusion_matrix"][i][i] for i in range(3)) / 9)


# --------------------------------------------------------------------------- command lines


def test_visualize_writes_a_figure_for_each_method(model_dir, data_dirs, tmp_path, env):
    images = []
    for mode in ("L", "RGBA", "RGB"):  # files of every mode for one of the runs
        images.append(tmp_path / f"{mode}.png")
        Image.new("RGB", (20, 20), (200, 40, 40)).convert(mode).save(images[-1])
    sources = {
        "rollout": ["--dataset_name", data_dirs[0], "--num_images", 3],  # the default split: test
        "cls": ["--dataset_name", data_dirs[1], "--num_images", 2, "--split", "validation", "--seed", 1],
        "heads": ["--images", *images],
        "relevance": [],  # the bundled examples
    }
    outputs = {method: tmp_path / "figures" / f"{method}.png" for method in visualize.METHODS}
    results = run_scripts(
        [("visualize.py", ["--model", model_dir, *sources[m], "--method", m, "--output", outputs[m]]) for m in visualize.METHODS],
        env,
    )
    for method, result in zip(visualize.METHODS, results):
        assert result.returncode == 0, (method, result.stderr[-3000:])
        assert_png(outputs[method])


def test_visualize_reports_a_missing_model_or_image_in_one_line(model_dir, tmp_path, env):
    image, missing_model, missing_image = tmp_path / "x.png", tmp_path / "no_model", tmp_path / "missing.png"
    Image.new("RGB", (8, 8)).save(image)
    cases = [(missing_model, image, f"error: model folder not found: {missing_model}"),
             (model_dir, missing_image, f"error: image file not found: {missing_image}")]
    results = run_scripts(
        [("visualize.py", ["--model", model, "--images", path, "--output", tmp_path / "a.png"]) for model, path, _ in cases],
        env,
    )
    for (_, _, expected), result in zip(cases, results):
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [expected]
    assert not (tmp_path / "a.png").exists()


def test_run_eval_writes_results_and_figures(model_dir, data_dirs, tmp_path, env):
    # The default split is test when there is one, else the validation split training carved.
    cases = [(data_dirs[0], [], "test", 9), (data_dirs[1], ["--tta"], "validation", 3),
             (data_dirs[1], ["--tta", "--tta_shift", 2], "validation", 3)]
    outs = [tmp_path / f"eval_{i}" for i in range(len(cases))]
    results = run_scripts(
        [("run_eval.py", ["--model", model_dir, "--dataset_name", folder, "--output_dir", out, "--batch_size", 4, *extra])
         for (folder, extra, _, _), out in zip(cases, outs)],
        env,
    )
    for (_, extra, split, samples), out, result in zip(cases, outs, results):
        assert result.returncode == 0, result.stderr[-3000:]
        saved = json.loads((out / "eval_results.json").read_text())
        assert saved["split"] == split and saved["num_samples"] == samples and saved["tta"] is bool(extra)
        assert saved["tta_shift"] == (extra[-1] if "--tta_shift" in extra else 0)
        assert sum(map(sum, saved["confusion_matrix"])) == samples
        assert set(saved["per_class_accuracy"]) == {"class_0", "class_1", "class_2"}
        assert f"accuracy {saved['accuracy']:.4f}" in result.stdout
        assert ("2-pixel shift TTA" in result.stdout) is ("--tta_shift" in extra)
        assert_png(out / "confusion_matrix.png")
        assert_png(out / "mistakes.png")


def test_run_eval_refuses_a_shift_without_tta_before_loading_anything(tmp_path, capsys):
    for argv, message in ((["--tta_shift", "1"], "pass --tta too"), (["--tta", "--tta_shift", "-1"], "at least 0")):
        with pytest.raises(SystemExit) as exit_info:
            run_eval.parse_args(["--model", str(tmp_path / "absent"), *argv])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_run_eval_refuses_a_shift_as_large_as_the_image_and_writes_nothing(model_dir, data_dirs, tmp_path, capsys):
    out = tmp_path / "eval"
    code = run_eval.main(["--model", str(model_dir), "--dataset_name", str(data_dirs[0]), "--output_dir", str(out),
                          "--tta", "--tta_shift", "16"])  # the tiny test model's images are 16x16
    assert code == 2 and not out.exists()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "error: --tta_shift must be below the model's image size (16), got 16"


# --------------------------------------------------------------------------------- notebook


def test_the_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert "MODEL_PATH" in code[0].source


def test_the_notebook_runs_end_to_end_on_a_tiny_model(model_dir, data_dirs, env, monkeypatch):
    from nbclient import NotebookClient

    for key, value in {**env, "MODEL_PATH": str(model_dir), "DATASET": str(data_dirs[0]), "NUM_IMAGES": "2",
                       "MAX_EVAL": "9", "LAYER": "1"}.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) >= 7  # curves, confusion, per class, mistakes, 2 attention figures, distance, entropy


def test_the_readme_notebook_command_runs_from_the_project_root(model_dir, data_dirs, env):
    """`jupyter execute` (nbclient's, which .[dev] installs) from the project's root, with
    MODEL_PATH and DATASET relative to that root, as the README gives them."""
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert "jupyter execute notebooks/attention_analysis.ipynb --output=attention_analysis_executed" in readme
    name = f"test_{os.getpid()}_executed"
    relative = {key: os.path.relpath(path, PROJECT_ROOT) for key, path in (("MODEL_PATH", model_dir), ("DATASET", data_dirs[0]))}
    try:
        result = subprocess.run(
            ["jupyter", "execute", "notebooks/attention_analysis.ipynb", f"--output={name}"],
            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
            env={**env, **relative, "NUM_IMAGES": "2", "MAX_EVAL": "9", "LAYER": "1"},
        )
        assert result.returncode == 0, result.stderr[-3000:]
        executed = nbformat.read(str(NOTEBOOK.parent / f"{name}.ipynb"), as_version=4)
        outputs = [output for cell in executed.cells if cell.cell_type == "code" for output in cell.outputs]
        assert not [output for output in outputs if output.output_type == "error"]
        assert sum("image/png" in output.get("data", {}) for output in outputs) >= 7
    finally:
        (NOTEBOOK.parent / f"{name}.ipynb").unlink(missing_ok=True)


def test_visualize_with_no_arguments_draws_the_release_on_the_bundled_examples(tmp_path, env):
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "visualize.py")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figure = tmp_path / "attention.png"
    assert f"wrote {figure}" in result.stderr
    with Image.open(figure) as image:
        assert image.width > 500 and image.height > 500  # a row for each of the bundled examples
