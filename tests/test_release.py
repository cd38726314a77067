"""The release checkpoint, checkpoints/hybrid-vit-cifar10: a complete, small Hub folder that
loads without the project's code, and whose card states what it scored and how it was made."""

import json
import re

import pytest
import yaml

from configuration_hybrid_vit import CIFAR10_LABELS
from tests.conftest import PROJECT_ROOT, SHARED_CIFAR10, run_isolated

RELEASE = PROJECT_ROOT / "checkpoints" / "hybrid-vit-cifar10"


def test_release_folder_is_complete_small_and_has_no_training_state():
    files = {p.name for p in RELEASE.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "configuration_hybrid_vit.py",
            "modeling_hybrid_vit.py", "README.md", "all_results.json", "train_config.yaml"} <= files
    assert not (RELEASE / "checkpoints").exists()
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)
    assert (RELEASE / "model.safetensors").stat().st_size < 16 * 2**20
    assert json.loads((RELEASE / "config.json").read_text())["auto_map"]["AutoModelForImageClassification"]
    # The shipped model files are the project's current ones.
    for name in ("configuration_hybrid_vit.py", "modeling_hybrid_vit.py"):
        assert (RELEASE / name).read_text() == (PROJECT_ROOT / name).read_text(), name


def test_release_card_states_its_score_command_hardware_and_time():
    card = (RELEASE / "README.md").read_text()
    results = json.loads((RELEASE / "all_results.json").read_text())
    assert f"{results['eval_accuracy']:.4f}" in card
    assert re.search(r"value: 0\.\d+", card)  # model-index metric
    assert re.search(r"Command: `python run_train.py --config (configs/cpu\.yaml|default\.yaml) ", card)
    assert "Hardware:" in card and "training time" in card


def test_an_averaged_release_card_gives_the_averaging_command_and_the_average_score():
    """A model soup's card must say how it was averaged: the command over every averaged model,
    and the average's own score (averaging.json), which is what all_results.json states."""
    record_path = RELEASE / "averaging.json"
    if not record_path.is_file():
        pytest.skip("the release is a single run, not an average")
    record = json.loads(record_path.read_text())
    card = (RELEASE / "README.md").read_text()
    command = next(line for line in card.splitlines() if "Command: `python scripts/average_models.py" in line)
    assert all(model in command for model in record["models"])
    assert len(re.findall(r"Command: `python run_train.py", card)) >= len(record["models"])
    results = json.loads((RELEASE / "all_results.json").read_text())
    assert abs(record["validation"]["average"]["accuracy"] - results["eval_accuracy"]) < 1e-4
    assert record["bn_images"] > 0 and record["bn_augmentation"]["cutout_size"] == yaml.safe_load(
        (RELEASE / "train_config.yaml").read_text())["data"]["cutout_size"]


def test_release_loads_with_no_project_code_and_classifies_the_examples(tmp_path):
    result = run_isolated(
        f"""
        import json
        from transformers import AutoModelForImageClassification, pipeline
        model = AutoModelForImageClassification.from_pretrained({str(RELEASE)!r}, trust_remote_code=True)
        classify = pipeline("image-classification", model={str(RELEASE)!r}, trust_remote_code=True)
        print(json.dumps(classify({str(PROJECT_ROOT / "assets/examples/ship.png")!r})))
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = json.loads(result.stdout.strip().splitlines()[-1])
    assert predictions[0]["label"] in CIFAR10_LABELS


@pytest.mark.skipif(not SHARED_CIFAR10.is_dir(), reason="../shared/data/cifar10 is not on this machine")
def test_release_scores_on_its_validation_split_what_its_card_says():
    """On the first 1,000 images of the validation split its training run carved (same seed
    and fraction), accuracy is within 3 points of the card's figure for all 5,000."""
    import run_eval
    import run_folder

    settings = yaml.safe_load((RELEASE / "train_config.yaml").read_text())
    model, processor = run_folder.load_model(str(RELEASE))
    dataset, image_column, label_column, split = run_folder.load_split(
        str(RELEASE), str(SHARED_CIFAR10), split="validation", max_samples=1000
    )
    assert split == "validation" and settings["training"]["seed"] is not None
    labels, probabilities = run_eval.evaluate_model(model, processor, dataset, image_column, label_column, progress=False)
    accuracy = (probabilities.argmax(-1) == labels).float().mean().item()
    stated = json.loads((RELEASE / "all_results.json").read_text())["eval_accuracy"]
    assert abs(accuracy - stated) < 0.03, (accuracy, stated)


@pytest.mark.skipif(not SHARED_CIFAR10.is_dir(), reason="../shared/data/cifar10 is not on this machine")
def test_release_card_states_the_transformer_health_it_measures():
    """The card's health table (accuracy with each block skipped, CLS entropy) holds for the
    first 1,000 validation images: skipped-block accuracy within 3 points, entropy within 0.03."""
    import run_eval
    import run_folder
    import transformer_health

    rows = re.findall(r"^\| (\d+) \| ([\d.]+)% \(.*?\) \| [\d.]+% \| ([\d.]+) \|$", (RELEASE / "README.md").read_text(), re.M)
    model, processor = run_folder.load_model(str(RELEASE))
    assert len(rows) == model.config.num_hidden_layers
    dataset, image_column, label_column, _ = run_folder.load_split(str(RELEASE), str(SHARED_CIFAR10), split="validation", max_samples=1000)
    batches = run_eval.pixel_batches(model, processor, dataset, image_column, label_column, 250, progress=False)
    health, _ = transformer_health.measure(model, batches)
    for (block, skipped, entropy), measured in zip(rows, health["blocks"]):
        assert measured["block"] == int(block)
        assert abs(100 * measured["accuracy_skipped"] - float(skipped)) < 3, (block, measured)
        assert abs(measured["cls_entropy_of_uniform"] - float(entropy)) < 0.03, (block, measured)


def test_release_metadata_names_the_hub_dataset_and_its_files_hold_no_local_path():
    from huggingface_hub import ModelCard

    card = ModelCard.load(RELEASE / "README.md")
    results = json.loads((RELEASE / "all_results.json").read_text())
    assert card.data.datasets == ["uoft-cs/cifar10"]
    assert card.data.pipeline_tag == "image-classification" and card.data.metrics == ["accuracy"]
    (validation,) = [r for r in card.data.eval_results if r.dataset_split == "validation"]
    assert validation.dataset_type == validation.dataset_name == "uoft-cs/cifar10"
    assert validation.metric_value == pytest.approx(results["eval_accuracy"], abs=1e-4)
    for name in ("README.md", "train_config.yaml", "averaging.json"):
        path = RELEASE / name
        if path.is_file():
            text = path.read_text()
            assert not re.search(r"\.\./|\.device|/tmp/|outputs/|shared/data", text), name
    assert yaml.safe_load((RELEASE / "train_config.yaml").read_text())["data"]["dataset_name"] == "uoft-cs/cifar10"
