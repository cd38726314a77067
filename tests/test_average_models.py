"""scripts/average_models.py: the weighted average, the BatchNorm re-estimate, and the
command line on two tiny saved models (including a bad pair, which writes nothing)."""

import copy
import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from configuration_hybrid_vit import HybridViTConfig
from modeling_hybrid_vit import HybridViTForImageClassification, save_model_and_processor
from tests.conftest import PROJECT_ROOT, TINY_MODEL, make_image_dataset

spec = importlib.util.spec_from_file_location("average_models", PROJECT_ROOT / "scripts" / "average_models.py")
average_models = importlib.util.module_from_spec(spec)
spec.loader.exec_module(average_models)

NAMES = [f"class_{i}" for i in range(3)]


def tiny(seed, **overrides):
    config = HybridViTConfig(**{**TINY_MODEL, **overrides}, id2label=dict(enumerate(NAMES)),
                             label2id={n: i for i, n in enumerate(NAMES)})
    torch.manual_seed(seed)
    return HybridViTForImageClassification(config).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two tiny models of one architecture and a third of another, each saved with a
    train_config.yaml (seeds 0, 0 and 1), and a 30-image training set of their 3 classes."""
    root = tmp_path_factory.mktemp("average")
    data = root / "data"
    data.mkdir()
    make_image_dataset(num_per_class=10, seed=0).to_parquet(str(data / "train-00000-of-00001.parquet"))
    paths = {}
    for name, seed, overrides, split_seed in (("a", 0, {}, 0), ("b", 1, {}, 1), ("wide", 2, {"hidden_size": 24}, 0)):
        model = tiny(seed, **overrides)
        with torch.no_grad():  # BatchNorm statistics no training image would give
            for layer in model.modules():
                if isinstance(layer, torch.nn.BatchNorm2d):
                    layer.running_mean.fill_(5.0 + seed)
        save_model_and_processor(model, root / name)
        (root / name / "train_config.yaml").write_text(f"data:\n  train_val_split: 0.2\ntraining:\n  seed: {split_seed}\n")
        paths[name] = root / name
    return root, data, paths


def test_the_average_is_weighted_and_keeps_integer_buffers():
    first = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(7)}
    second = {"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(3)}
    averaged = average_models.average_state_dicts([first, second], [2.0, 1.0])
    torch.testing.assert_close(averaged["w"], torch.tensor([2.0, 4.0]))
    assert averaged["n"].item() == 7 and averaged["n"].dtype == torch.int64


def test_batchnorm_statistics_are_replaced_by_the_mean_over_the_batches():
    model = tiny(0)
    reference = copy.deepcopy(model)
    batches = [torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    for layer in model.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.running_mean.fill_(100.0)
    assert average_models.recalibrate_batchnorm(model, batches) == 12
    assert not model.training
    # the first layer's means are those of one training-mode pass over all twelve images
    # (equal-size batches; deeper layers see inputs normalised by each batch's own statistics)
    for layer in reference.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.reset_running_stats()
            layer.momentum = None
    reference.train()
    with torch.no_grad():
        reference(pixel_values=torch.cat(batches))
    pairs = [(m, r) for m, r in zip(model.modules(), reference.modules()) if isinstance(m, torch.nn.BatchNorm2d)]
    torch.testing.assert_close(pairs[0][0].running_mean, pairs[0][1].running_mean, rtol=1e-4, atol=1e-5)
    for layer, expected in pairs:
        assert layer.momentum == 0.1 and (layer.running_mean - 100.0).abs().max() > 50


def test_the_command_line_saves_a_loadable_average_with_fresh_batchnorm_statistics(folders, tmp_path, capsys):
    root, data, paths = folders
    out = tmp_path / "soup"
    code = average_models.main(["--models", str(paths["a"]), str(paths["b"]), "--weights", "3", "1",
                                "--dataset_name", str(data), "--output_dir", str(out), "--batch_size", "8"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "warning" in captured.err and "another validation split" in captured.err  # b used seed 1
    assert str(paths["a"]) in captured.out and "average of 2" in captured.out and "from 24 training images" in captured.out

    from transformers import AutoModelForImageClassification

    loaded = AutoModelForImageClassification.from_pretrained(out, trust_remote_code=True)
    first, second, saved = (load_file(p / "model.safetensors") for p in (paths["a"], paths["b"], out))
    for key, value in saved.items():
        if "running_" in key:
            assert not torch.allclose(value, (3 * first[key] + second[key]) / 4)  # estimated, not averaged
        elif value.is_floating_point():
            torch.testing.assert_close(value, (3 * first[key] + second[key]) / 4)
    assert loaded.config.id2label == {i: n for i, n in enumerate(NAMES)}
    record = json.loads((out / "averaging.json").read_text())
    assert record["weights"] == [3.0, 1.0] and record["bn_images"] == 24
    # named by folder name, as saved records name no local path
    assert record["models"] == [paths["a"].name, paths["b"].name] and str(tmp_path) not in json.dumps(record)
    assert set(record["validation"]) == {paths["a"].name, paths["b"].name, "average"}
    assert 0.0 <= record["validation"]["average"]["accuracy"] <= 1.0
    assert (out / "train_config.yaml").read_text() == (paths["a"] / "train_config.yaml").read_text()


def test_without_an_estimate_batchnorm_statistics_are_averaged_and_the_seed_sets_the_estimate(folders, tmp_path, capsys):
    root, data, paths = folders
    models = ["--models", str(paths["a"]), str(paths["b"]), "--dataset_name", str(data), "--max_eval_samples", "3"]
    assert average_models.main([*models, "--bn_images", "0", "--output_dir", str(tmp_path / "kept")]) == 0
    assert "BatchNorm statistics averaged" in capsys.readouterr().out
    first, second, kept = (load_file(p / "model.safetensors") for p in (paths["a"], paths["b"], tmp_path / "kept"))
    running = [key for key in kept if "running_mean" in key]
    assert running
    for key in running:
        torch.testing.assert_close(kept[key], (first[key] + second[key]) / 2)
    record = json.loads((tmp_path / "kept" / "averaging.json").read_text())
    assert record["bn_images"] == 0 and record["validation_images"] == 3

    estimates = {}
    for name, seed in (("s1", "1"), ("s1_again", "1"), ("s2", "2")):
        assert average_models.main([*models, "--seed", seed, "--output_dir", str(tmp_path / name)]) == 0
        estimates[name] = load_file(tmp_path / name / "model.safetensors")
    assert all(torch.equal(estimates["s1"][key], estimates["s1_again"][key]) for key in running)
    assert not all(torch.equal(estimates["s1"][key], estimates["s2"][key]) for key in running)


def test_models_of_different_architectures_are_refused_and_nothing_is_written(folders, tmp_path, capsys):
    root, data, paths = folders
    out = tmp_path / "soup"
    code = average_models.main(["--models", str(paths["a"]), str(paths["wide"]), "--dataset_name", str(data),
                                "--output_dir", str(out)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "another architecture" in errors[0]
    assert not out.exists()


def test_one_model_or_a_wrong_number_of_weights_is_a_usage_error(folders, capsys):
    _, data, paths = folders
    for argv in (["--models", str(paths["a"])], ["--models", str(paths["a"]), str(paths["b"]), "--weights", "1"]):
        with pytest.raises(SystemExit) as exit_info:
            average_models.main([*argv, "--dataset_name", str(data), "--output_dir", "unused"])
        assert exit_info.value.code == 2


def test_the_batchnorm_estimate_augments_as_the_first_model_was_trained(folders, tmp_path, capsys):
    """A Cutout-trained model's BatchNorm statistics are those of images with a square blanked
    to the mean colour (0 once normalised); the estimate must see such images too."""
    import shutil

    root, data, paths = folders
    trained = tmp_path / "cutout"
    shutil.copytree(paths["a"], trained)
    (trained / "train_config.yaml").write_text(
        "data:\n  train_val_split: 0.2\n  random_crop_padding: 0\n  horizontal_flip: false\n  cutout_size: 6\n"
        "  auto_augment: none\n  mixup_alpha: 0.0\ntraining:\n  seed: 0\n"
    )
    augmentation = average_models.training_augmentation(trained)
    assert augmentation["cutout_size"] == 6 and augmentation["random_crop_padding"] == 0
    assert average_models.training_augmentation(tmp_path / "no-config") == {k: average_models.CROP_FLIP[k] for k in average_models.AUGMENTATION_KEYS}

    images = torch.randint(1, 255, (4, 3, 16, 16), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0])
    blanked, = average_models.training_batches(images, labels, 4, seed=0, augmentation=augmentation)
    plain, = average_models.training_batches(images, labels, 4, seed=0)
    squares = (blanked == 0).all(dim=1)  # (B, H, W): pixels whose three channels were blanked
    assert [int(square.sum()) for square in squares] == [36] * 4  # one 6 x 6 square in each image
    assert not (plain == 0).all(dim=1).any()

    estimates, outputs = {}, {}
    for mode in ("training", "crop_flip"):
        out = tmp_path / mode
        assert average_models.main(["--models", str(trained), str(paths["a"]), "--dataset_name", str(data),
                                    "--bn_augmentation", mode, "--max_eval_samples", "3", "--output_dir", str(out)]) == 0
        outputs[mode] = capsys.readouterr().out
        estimates[mode] = load_file(out / "model.safetensors")
        record = json.loads((out / "averaging.json").read_text())
        assert record["bn_augmentation"]["cutout_size"] == (6 if mode == "training" else 0)
    assert "Cutout 6" in outputs["training"] and "Cutout" not in outputs["crop_flip"]
    running = [key for key in estimates["training"] if "running_var" in key]
    assert not all(torch.allclose(estimates["training"][key], estimates["crop_flip"][key]) for key in running)
