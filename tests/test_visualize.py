"""attention_maps.py, visualize.py and run_eval.py: the attention maths on hand-built matrices
with known answers, the figures and both command lines on a tiny saved model, and the analysis
notebook end to end."""

import json
import math
import os
import subprocess
import sys

import nbformat
import pytest
import torch
from PIL import Image

import attention_maps
import cifar10_data
import run_eval
import visualize
from configuration_hybrid_vit import HybridViTConfig
from errors import UserError
from evaluation import predict, summarize
from hub_folder import load_model
from modeling_hybrid_vit import HybridViTForImageClassification, save_model_and_processor
from tests.conftest import PROJECT_ROOT, TINY_MODEL, make_image_dataset
from training_settings import split_of

NOTEBOOK = PROJECT_ROOT / "notebooks" / "attention_analysis.ipynb"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAMES = [f"class_{i}" for i in range(3)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An untrained tiny model for the tiny dataset's 3 classes, with a short training log."""
    folder = tmp_path_factory.mktemp("tiny_model")
    config = HybridViTConfig(**TINY_MODEL, id2label=dict(enumerate(NAMES)), label2id={n: i for i, n in enumerate(NAMES)})
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


def softmax_attention(B, H, T, seed=0):
    return torch.randn(B, H, T, T, generator=torch.Generator().manual_seed(seed)).softmax(-1)


def assert_png(path):
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def last_error_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


# ------------------------------------------------------------------------ attention maths


def test_rollout_of_identity_attention_is_identity():
    eye = torch.eye(5).expand(2, 3, 5, 5)
    rollout = attention_maps.attention_rollout((eye, eye, eye))
    torch.testing.assert_close(rollout, torch.eye(5).expand(2, 5, 5))


def test_rollout_of_two_layers_matches_the_hand_computation():
    # Layer 1: heads [[1,0],[0,1]] and [[0,1],[0,1]] average to [[.5,.5],[0,1]];
    # + I and renormalised: [[.75,.25],[0,1]]. Layer 2: [[0,1],[1,0]] -> [[.5,.5],[.5,.5]].
    # Rollout = layer 2 @ layer 1 = [[.375,.625],[.375,.625]] (the other order gives all .5).
    layer1 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]])[None]
    layer2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).expand(1, 2, 2, 2)
    rollout = attention_maps.attention_rollout((layer1, layer2))
    torch.testing.assert_close(rollout, torch.tensor([[[0.375, 0.625], [0.375, 0.625]]]))


def test_rollout_rows_sum_to_one_and_the_map_is_the_cls_row():
    attentions = tuple(softmax_attention(3, 2, 10, seed) for seed in range(4))  # 3x3 grid + CLS
    rollout = attention_maps.attention_rollout(attentions)
    assert rollout.shape == (3, 10, 10)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(3, 10))
    maps = attention_maps.rollout_map(attentions)
    assert maps.shape == (3, 3, 3)
    torch.testing.assert_close(maps.amax(dim=(1, 2)), torch.ones(3))
    cls_row = rollout[:, 0, 1:]
    torch.testing.assert_close(maps, (cls_row / cls_row.amax(-1, keepdim=True)).reshape(3, 3, 3))
    with pytest.raises(ValueError, match="square grid"):
        attention_maps.rollout_map((softmax_attention(1, 1, 9),))  # 8 patch tokens: no square grid


def test_cls_attention_is_the_cls_row_of_the_chosen_layer():
    attentions = (softmax_attention(2, 4, 17, 0), softmax_attention(2, 4, 17, 1))
    last = attention_maps.cls_attention(attentions)
    assert last.shape == (2, 4, 4, 4)
    torch.testing.assert_close(last[1, 2].flatten(), attentions[1][1, 2, 0, 1:])
    torch.testing.assert_close(attention_maps.cls_attention(attentions, layer=0)[0, 3].flatten(), attentions[0][0, 3, 0, 1:])


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
    distance = attention_maps.mean_attention_distance(heads, patch_size)
    torch.testing.assert_close(distance, torch.tensor([0.0, 4.0, 4.0, 4 * math.sqrt(2)]))
    # Uniform attention over a 2x2 grid: from each patch, distances 0, p, p and p*sqrt(2).
    uniform = torch.full((1, 1, 5, 5), 0.2)
    torch.testing.assert_close(
        attention_maps.mean_attention_distance(uniform, patch_size), torch.tensor([(2 + math.sqrt(2)) * patch_size / 4])
    )
    assert attention_maps.attention_distances((heads, heads), patch_size).shape == (2, 4)


def test_a_class_attention_block_mixes_no_patches_and_measures_distance_zero():
    torch.manual_seed(0)
    model = HybridViTForImageClassification(HybridViTConfig(**{**TINY_MODEL, "class_attention_layers": 1})).eval()
    with torch.no_grad():
        attentions = model(pixel_values=torch.randn(2, 3, 16, 16), output_attentions=True).attentions
    distances = attention_maps.attention_distances(attentions, model.config.patch_size)
    assert (distances[0] > 0).all() and (distances[1] == 0).all()  # a self-attention block, then a class-attention one


def test_cls_entropy_is_log_n_for_uniform_and_zero_for_one_patch():
    uniform = torch.full((2, 1, 10, 10), 0.1)
    one_patch = torch.zeros(2, 1, 10, 10)
    one_patch[..., 3] = 1.0
    entropy = attention_maps.cls_attention_entropy((uniform, one_patch))
    torch.testing.assert_close(entropy, torch.tensor([[math.log(9)], [0.0]]))


def test_overlay_is_an_rgb_float_image_the_size_of_the_input():
    image = Image.new("L", (40, 24), 128)
    heatmap = torch.zeros(4, 4)
    heatmap[0, 0] = 1.0
    blended = attention_maps.overlay(image, heatmap)
    assert blended.shape == (24, 40, 3) and blended.dtype.kind == "f"
    # The hot corner is coloured differently from the cold opposite one.
    assert abs(blended[0, 0] - blended[-1, -1]).sum() > 0.3
    # The cold corner is the colormap's bottom blended with the grey image, as the alpha says.
    bottom = torch.tensor(attention_maps.matplotlib.colormaps[attention_maps.COLORMAP](0.0)[:3])
    torch.testing.assert_close(torch.from_numpy(blended[-1, -1]).float(), (0.45 * 128 / 255 + 0.55 * bottom).float(),
                               atol=1e-3, rtol=0)


def test_a_flat_map_is_drawn_mid_colormap_and_labelled_uniform():
    """A layer that attends evenly (its queries and keys decayed to zero, as in the 4x4 release's
    second layer) gives a flat map. Stretched to its own range it would come out black, the
    look of no attention at all; it is drawn in the colormap's middle and labelled."""
    from matplotlib.figure import Figure

    image = Image.new("RGB", (8, 8), (128, 128, 128))
    flat, peaked = torch.full((4, 4), 1 / 17), torch.zeros(4, 4)
    peaked[1, 2] = 0.5
    assert attention_maps.is_uniform(flat) and not attention_maps.is_uniform(peaked)
    assert not attention_maps.is_uniform(flat + 1e-3 * torch.rand(4, 4))
    middle = attention_maps.matplotlib.colormaps[attention_maps.COLORMAP](0.5)[:3]
    expected = 0.45 * 128 / 255 + 0.55 * torch.tensor(middle)
    blended = torch.from_numpy(attention_maps.overlay(image, flat)).float()
    torch.testing.assert_close(blended, expected.float().expand(8, 8, 3), atol=1e-3, rtol=0)

    axes = Figure().subplots(1, 3)
    attention_maps.draw_map(axes[0], flat)  # the raw token grid
    attention_maps.draw_map(axes[1], flat, image)
    attention_maps.draw_map(axes[2], peaked)
    assert [[t.get_text() for t in ax.texts] for ax in axes] == [["uniform"], ["uniform"], []]
    grid = axes[0].images[0]
    assert grid.norm(1 / 17) == pytest.approx(0.5)  # the middle of the colormap, not its black end
    assert axes[2].images[0].norm(0.5) == pytest.approx(1.0)  # other maps: stretched to their range


# --------------------------------------------------------------------- model and datasets


def test_grayscale_and_rgba_images_are_predicted_as_rgb(model_dir):
    model, processor = load_model(str(model_dir))
    rgb = Image.new("RGB", (16, 16), (90, 90, 90))
    images = [rgb.convert("L"), rgb.convert("RGBA"), rgb]
    outputs = attention_maps.model_outputs(model, processor, images)
    assert len(outputs.attentions) == TINY_MODEL["num_hidden_layers"]
    torch.testing.assert_close(outputs.logits[0], outputs.logits[2])
    torch.testing.assert_close(outputs.logits[1], outputs.logits[2])
    for method in attention_maps.METHODS:
        fig = attention_maps.attention_figure(model, processor, images, names=["gray", "rgba", "rgb"], method=method)
        extra = method == "relevance"  # its own column, before the rollout
        assert len(fig.axes) == 3 * (3 + extra + TINY_MODEL["num_attention_heads"])


def test_the_figure_titles_each_image_with_its_prediction_and_probability(model_dir):
    model, processor = load_model(str(model_dir))
    images = [Image.new("RGB", (16, 16), colour) for colour in ((200, 30, 30), (30, 30, 200))]
    probabilities = attention_maps.model_outputs(model, processor, images).logits.softmax(-1)
    fig = attention_maps.attention_figure(model, processor, images, true_labels=["class_0", "class_2"])
    image_axes = fig.axes[:: len(fig.axes) // 2]  # the first column: one row per image
    for ax, truth, p in zip(image_axes, ["class_0", "class_2"], probabilities):
        predicted = NAMES[int(p.argmax())]
        assert ax.get_title() == f"true: {truth}\npred: {predicted} {p.max():.0%}"
        assert ax.title.get_color() == (attention_maps.CORRECT_COLOUR if predicted == truth else attention_maps.WRONG_COLOUR)


def test_the_figure_draws_the_heads_of_the_chosen_layer(model_dir, tmp_path, capsys):
    model, processor = load_model(str(model_dir))
    image = Image.new("RGB", (16, 16), (90, 30, 200))
    layers = TINY_MODEL["num_hidden_layers"]
    for layer, expected in ((None, layers), (1, 1)):
        fig = attention_maps.attention_figure(model, processor, [image], names=["x"], method="heads", layer=layer)
        titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
        assert f"layer {expected} head 1" in titles and f"layer {expected} CLS, mean of heads" in titles
        assert f"in layer {expected} drawn" in fig._suptitle.get_text()
    with pytest.raises(UserError, match=f"layer must be between 1 and {layers}"):
        attention_maps.attention_figure(model, processor, [image], names=["x"], layer=layers + 1)
    # On the command line: refused once the model is loaded, before any drawing; nothing written.
    image.save(tmp_path / "x.png")
    output = tmp_path / "a.png"
    code = visualize.main(["--model", str(model_dir), "--images", str(tmp_path / "x.png"), "--layer", str(layers + 1),
                           "--output", str(output)])
    assert code == 2 and not output.exists()
    assert last_error_line(capsys) == f"error: --layer {layers + 1}: {model_dir} has {layers} transformer layers"
    with pytest.raises(SystemExit):
        visualize.parse_args(["--model", "m", "--layer", "0"])


def test_the_validation_split_is_the_one_training_carved(model_dir, data_dirs, tmp_path):
    with_test, train_only = data_dirs
    dataset, _, label, split = cifar10_data.load_split(str(with_test), None, *split_of(model_dir))
    assert split == "test" and len(dataset) == 9
    dataset, _, label, split = cifar10_data.load_split(str(train_only), None, *split_of(model_dir))
    assert split == "validation" and len(dataset) == 3  # 10% of 30, the training default
    # A run's train_config.yaml sets the fraction and the seed.
    (tmp_path / "train_config.yaml").write_text("data:\n  train_val_split: 0.2\ntraining:\n  seed: 7\n")
    assert split_of(tmp_path) == (0.2, 7)
    dataset, _, label, _ = cifar10_data.load_split(str(train_only), "validation", *split_of(tmp_path))
    carved, _, _ = cifar10_data.load_splits(str(train_only), 0.2, 7)
    assert len(dataset) == 6 and dataset[label] == carved["validation"][label]
    with pytest.raises(UserError, match="has no split 'test'"):
        cifar10_data.load_split(str(train_only), "test", *split_of(model_dir))


def test_run_eval_scores_the_images_as_the_processor_prepares_them_and_flip_tta_averages_the_mirrors(model_dir, data_dirs):
    """The split decoded once (as run_eval.py and training do) gives the logits the model's own
    processor gives a user, in the dataset's order; with flip, each averaged with its mirror's."""
    model, processor = load_model(str(model_dir))
    dataset = cifar10_data.load_splits(str(data_dirs[0]), 0.1, 0)[0]["test"]
    images = cifar10_data.DecodedImages(*cifar10_data.decode_all(dataset, "img", "label", model.config.image_size)[:2])
    loader = cifar10_data.eval_dataloader(images, 4)
    model.train()  # predict scores in eval mode and gives the model back as it found it
    plain, labels = predict(model, loader)
    tta, _ = predict(model, loader, flip=True)
    assert model.training
    model.eval()
    pixels = processor(images=[image.convert("RGB") for image in dataset["img"]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits, flipped = model(pixel_values=pixels).logits, model(pixel_values=pixels.flip(-1)).logits
    assert labels.tolist() == list(dataset["label"])
    torch.testing.assert_close(plain, logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tta, (logits + flipped) / 2, atol=1e-4, rtol=1e-4)
    summary = summarize(labels, tta.softmax(-1), NAMES)
    assert sum(map(sum, summary["confusion_matrix"])) == 9
    assert summary["accuracy"] == pytest.approx(sum(summary["confusion_matrix"][i][i] for i in range(3)) / 9)


# --------------------------------------------------------------------------- command lines


def test_visualize_writes_a_figure_for_each_method_and_source(model_dir, data_dirs, tmp_path, capsys):
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
    for method in attention_maps.METHODS:
        output = tmp_path / "figures" / f"{method}.png"
        code = visualize.main([str(a) for a in ["--model", model_dir, *sources[method], "--method", method, "--output", output]])
        assert code == 0, capsys.readouterr().err[-3000:]
        assert_png(output)


def test_visualize_reports_a_missing_model_or_image_in_one_line(model_dir, tmp_path, capsys):
    image, missing_model, missing_image = tmp_path / "x.png", tmp_path / "no_model", tmp_path / "missing.png"
    Image.new("RGB", (8, 8)).save(image)
    for model, path, expected in ((missing_model, image, f"error: model folder not found: {missing_model}"),
                                  (model_dir, missing_image, f"error: image file not found: {missing_image}")):
        assert visualize.main(["--model", str(model), "--images", str(path), "--output", str(tmp_path / "a.png")]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [expected]
    assert not (tmp_path / "a.png").exists()


def test_run_eval_writes_results_and_figures(model_dir, data_dirs, tmp_path, env):
    """The command line, as a user runs it, on the default split (test); the checks and the
    flip TTA each on a sample of the size asked for."""
    out = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, "run_eval.py", "--model", str(model_dir), "--dataset_name", str(data_dirs[0]), "--output_dir", str(out),
         "--batch_size", "4", "--tta", "--health_images", "4", "--faithfulness_images", "3"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["split"] == "test" and saved["num_samples"] == 9 and saved["tta"] is True
    assert sum(map(sum, saved["confusion_matrix"])) == 9 and set(saved["per_class_accuracy"]) == set(NAMES)
    assert saved["transformer_health"]["num_samples"] == 4 and saved["faithfulness"]["num_images"] == 3
    assert f"test: accuracy {saved['accuracy']:.4f} on 9 images ({saved['accuracy_flip_tta']:.4f} with flip TTA)" in result.stdout
    for name in ("confusion_matrix", "mistakes", "reliability", "transformer_health", "faithfulness"):
        assert_png(out / f"{name}.png")


def test_run_eval_defaults_to_the_validation_split_training_carved_and_tta_is_optional(model_dir, data_dirs, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["--model", str(model_dir), "--dataset_name", str(data_dirs[1]), "--output_dir", str(out),
            "--health_images", "0", "--faithfulness_images", "0"]
    assert run_eval.main(args) == 0
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["split"] == "validation" and saved["num_samples"] == 3 and saved["tta"] is False
    assert "accuracy_flip_tta" not in saved and "with flip TTA" not in capsys.readouterr().out
    assert "transformer_health" not in saved and "faithfulness" not in saved
    assert not (out / "transformer_health.png").exists() and not (out / "faithfulness.png").exists()
    assert_png(out / "confusion_matrix.png")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--health_images", "-1"], "--health_images must be at least 0"),
        (["--faithfulness_images", "-1"], "--faithfulness_images must be at least 0"),
        (["--batch_size", "0"], "--batch_size and --max_eval_samples must be at least 1"),
        (["--max_eval_samples", "0"], "--batch_size and --max_eval_samples must be at least 1"),
    ],
)
def test_run_eval_refuses_bad_flags_before_loading_anything(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        run_eval.parse_args(["--model", str(tmp_path / "absent"), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


# --------------------------------------------------------------------------------- notebook


def test_the_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert "MODEL_PATH" in code[0].source


def test_the_notebooks_command_runs_from_the_project_root(model_dir, data_dirs, env):
    """`jupyter execute` (nbclient's, which .[dev] installs) from the project's root, with
    MODEL_PATH and DATASET relative to that root, as the notebook's first cell gives them:
    every cell runs and draws its figure."""
    command = "jupyter execute notebooks/attention_analysis.ipynb --output=attention_analysis_executed"
    assert command in nbformat.read(NOTEBOOK, as_version=4).cells[0].source
    name = f"test_{os.getpid()}_executed"
    relative = {key: os.path.relpath(path, PROJECT_ROOT) for key, path in (("MODEL_PATH", model_dir), ("DATASET", data_dirs[0]))}
    try:
        result = subprocess.run(
            [*command.split()[:-1], f"--output={name}"],
            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
            env={**env, **relative, "NUM_IMAGES": "2", "MAX_EVAL": "9", "LAYER": "1"},
        )
        assert result.returncode == 0, result.stderr[-3000:]
        executed = nbformat.read(str(NOTEBOOK.parent / f"{name}.ipynb"), as_version=4)
        outputs = [output for cell in executed.cells if cell.cell_type == "code" for output in cell.outputs]
        assert not [output for output in outputs if output.output_type == "error"]
        # training curves, confusion matrix, mistakes, two attention figures, distance, entropy
        assert sum("image/png" in output.get("data", {}) for output in outputs) == 7
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
