"""The release checkpoint, checkpoints/hybrid-vit-cifar10: a complete, small Hub folder that
loads without the project's code, classifies the bundled examples, scores on its own validation
split what its card says, and whose card states what it scored and how it was made.

The release is made by release.sh: configs/release.yaml trained from seed 0, evaluated into its
card by run_eval.py. Its config.json states every architecture setting, so later defaults do not
change it."""

import inspect
import json
import re
import subprocess

import pytest
import torch
import yaml

from configuration_hybrid_vit import HybridViTConfig
from tests.conftest import PROJECT_ROOT, SHARED_CIFAR10, run_isolated
from tests.test_training import base_args
from training_settings import split_of

RELEASE = PROJECT_ROOT / "checkpoints" / "hybrid-vit-cifar10"
EXAMPLES = PROJECT_ROOT / "assets" / "examples"
EXAMPLE_CLASSES = ("airplane", "automobile", "frog", "ship")  # each file is a drawing of the class it is named for
# The first images of the validation split scored here: the card's figures are for all 5,000,
# so they are compared within about 2.1 standard errors of a 1,000-image sample (0.95 points
# at the release's 90%). A release that lost its weights scores about 10%; one scored on the wrong split
# (another seed) scores about 99%, since most of those images are training images.
VALIDATION_IMAGES = 1000
HEALTH_IMAGES = 500
needs_cifar10 = pytest.mark.skipif(not SHARED_CIFAR10.is_dir(), reason="../shared/data/cifar10 is not on this machine")


def results():
    return json.loads((RELEASE / "all_results.json").read_text())


def test_release_folder_is_complete_small_and_has_no_training_state():
    files = {p.name for p in RELEASE.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "configuration_hybrid_vit.py",
            "modeling_hybrid_vit.py", "README.md", "all_results.json", "train_config.yaml"} <= files
    assert not (RELEASE / "checkpoints").exists()
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)
    assert (RELEASE / "model.safetensors").stat().st_size < 16 * 2**20
    assert json.loads((RELEASE / "config.json").read_text())["auto_map"]["AutoModelForImageClassification"]
    # The shipped model code is the project's; its configuration file may keep its own
    # defaults, because config.json states every architecture argument, so no default (the
    # shipped file's or the project's) decides what the release is.
    assert (RELEASE / "modeling_hybrid_vit.py").read_text() == (PROJECT_ROOT / "modeling_hybrid_vit.py").read_text()
    arguments = [name for name, p in inspect.signature(HybridViTConfig.__init__).parameters.items()
                 if name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]
    stated = json.loads((RELEASE / "config.json").read_text())
    assert not [name for name in arguments if name not in stated], "config.json leaves these to the defaults"


def test_release_loads_with_no_project_code_and_classifies_the_examples(tmp_path):
    """A Hub user's pipeline, with only the folder's own code, names each drawn example's class,
    and gives the logits of the project's own model class loading the same folder."""
    examples = [str(EXAMPLES / f"{name}.png") for name in EXAMPLE_CLASSES]
    result = run_isolated(
        f"""
        import json, torch
        from PIL import Image
        from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline
        model = AutoModelForImageClassification.from_pretrained({str(RELEASE)!r}, trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained({str(RELEASE)!r}, trust_remote_code=True)
        classify = pipeline("image-classification", model={str(RELEASE)!r}, trust_remote_code=True)
        images = [Image.open(path).convert("RGB") for path in {examples!r}]
        with torch.no_grad():
            logits = model(**processor(images=images, return_tensors="pt")).logits
        print(json.dumps({{"top": [classify(image)[0] for image in images], "logits": logits.tolist()}}))
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    isolated = json.loads(result.stdout.strip().splitlines()[-1])
    assert [top["label"] for top in isolated["top"]] == list(EXAMPLE_CLASSES)

    from PIL import Image

    from transformers import ViTImageProcessor

    from modeling_hybrid_vit import HybridViTForImageClassification

    model = HybridViTForImageClassification.from_pretrained(str(RELEASE)).eval()
    processor = ViTImageProcessor.from_pretrained(str(RELEASE))
    images = [Image.open(path).convert("RGB") for path in examples]
    with torch.no_grad():
        logits = model(**processor(images=images, return_tensors="pt")).logits
    assert torch.allclose(logits, torch.tensor(isolated["logits"]), atol=1e-4)
    assert [top["score"] for top in isolated["top"]] == pytest.approx(logits.softmax(-1).max(-1).values.tolist(), abs=1e-4)


def test_release_card_states_its_score_command_hardware_and_time():
    card = (RELEASE / "README.md").read_text()
    assert f"{results()['eval_accuracy']:.4f}" in card
    assert re.search(r"value: 0\.\d+", card)  # model-index metric
    assert re.search(r"Command: `python run_train.py --config configs/release\.yaml ", card)
    assert "Hardware:" in card and "training time" in card
    evaluation = card[card.index("## Evaluation"):]
    assert "fitted on this split" in evaluation and "random order" in evaluation and "average map order" in evaluation
    assert f"{results()['eval_accuracy_flip_tta']:.4f}" in card


def test_release_was_trained_with_the_settings_configs_release_yaml_gives_today():
    """`./release.sh` remakes the release: every setting it trained with, but the output folder,
    is what configs/release.yaml gives now, so a change to the recipe must come with a new release."""
    from hub_folder import public_settings
    from training_settings import load_settings

    trained = yaml.safe_load((RELEASE / "train_config.yaml").read_text())
    today = public_settings(load_settings(["--config", "configs/release.yaml"]).to_dict())  # as run_train.py saves it
    for section, settings in trained.items():
        for name, value in settings.items():
            if name != "output_dir":
                assert value == today[section][name], (section, name, value, today[section][name])


def test_release_metadata_names_the_hub_dataset_and_its_files_hold_no_local_path():
    from huggingface_hub import ModelCard

    card = ModelCard.load(RELEASE / "README.md")
    assert card.data.datasets == ["uoft-cs/cifar10"]
    assert card.data.pipeline_tag == "image-classification" and card.data.metrics == ["accuracy"]
    (validation,) = [r for r in card.data.eval_results if r.dataset_split == "validation"]
    assert validation.dataset_type == validation.dataset_name == "uoft-cs/cifar10"
    assert validation.metric_value == pytest.approx(results()["eval_accuracy"], abs=1e-4)
    for name in ("README.md", "train_config.yaml"):
        path = RELEASE / name
        if path.is_file():
            text = path.read_text()
            assert not re.search(r"\.\./|\.device|/tmp/|outputs/|shared/data", text), name
    assert yaml.safe_load((RELEASE / "train_config.yaml").read_text())["data"]["dataset_name"] == "uoft-cs/cifar10"


# ------------------------------------------------------- scores, on its own validation split


@pytest.fixture(scope="module")
def release_and_validation():
    """The release as run_eval.py loads it, and the first VALIDATION_IMAGES images of the
    validation split its run carved (fraction and seed from its train_config.yaml), decoded;
    and the size of the whole split."""
    from cifar10_data import DecodedImages, decode_all, load_split
    from hub_folder import load_model

    model, _ = load_model(str(RELEASE))
    fraction, seed = split_of(RELEASE)
    whole, *_ = load_split(str(SHARED_CIFAR10), "validation", fraction, seed)
    dataset, image_column, label_column, _ = load_split(str(SHARED_CIFAR10), "validation", fraction, seed, VALIDATION_IMAGES)
    images, labels, _ = decode_all(dataset, image_column, label_column, model.config.image_size)
    return model, DecodedImages(images, labels), len(whole)


@needs_cifar10
def test_release_scores_on_its_validation_split_what_its_card_says(release_and_validation):
    from cifar10_data import eval_dataloader
    from evaluation import accuracy, predict

    model, images, split_size = release_and_validation
    assert split_size == results()["eval_samples"] == 5000  # the split its run held out: 10% of 50,000, seed 0
    logits, labels = predict(model, eval_dataloader(images, 250))
    assert len(labels) == VALIDATION_IMAGES
    assert accuracy(logits, labels) == pytest.approx(results()["eval_accuracy"], abs=0.02)


@needs_cifar10
def test_release_card_states_the_transformer_health_it_measures(release_and_validation):
    """The card's health table (accuracy each block costs when skipped, CLS entropy) holds on
    the first HEALTH_IMAGES of the same images: the cost within 3 points (2.2 standard errors of
    a 500-image accuracy near 90%, or near 10% with the block skipped), entropy within 0.03."""
    import transformer_health
    from cifar10_data import DecodedImages, eval_dataloader

    model, images, _ = release_and_validation
    rows = re.findall(r"^\| block (\d+): accuracy lost when skipped; CLS attention entropy of uniform \| ([\d.]+) points; ([\d.]+) \|$",
                      (RELEASE / "README.md").read_text(), re.M)
    assert len(rows) == model.config.num_hidden_layers == 1
    first = DecodedImages(images.images[:HEALTH_IMAGES], images.labels[:HEALTH_IMAGES])
    batches = ((batch["pixel_values"], batch["labels"]) for batch in eval_dataloader(first, 250))
    health, _ = transformer_health.measure(model, batches)  # the model, and it without each block
    assert health["num_samples"] == HEALTH_IMAGES
    for (block, cost, entropy), measured in zip(rows, health["blocks"], strict=True):
        assert measured["block"] == int(block)
        assert abs(100 * measured["skip_cost"] - float(cost)) < 3, (block, measured)
        assert abs(measured["cls_entropy_of_uniform"] - float(entropy)) < 0.03, (block, measured)


# ------------------------------------------------------------------ release.sh, which makes it


def release_sh(dataset_dir, out, release, env, *extra):
    command = ["bash", str(PROJECT_ROOT / "release.sh"), *base_args(dataset_dir, out, *extra)]
    return subprocess.run(command, cwd=out.parent, env={**env, "RELEASE_DIR": str(release)}, capture_output=True, text=True,
                          timeout=600)


def test_release_sh_trains_evaluates_into_the_card_and_only_then_replaces_the_release(dataset_dir, tmp_path, env):
    release = tmp_path / "release"
    release.mkdir()
    (release / "model.safetensors").write_text("the old release")
    failed = release_sh(dataset_dir, tmp_path / "run", release, env, "--num_train_epochs=-1")
    assert failed.returncode != 0 and "num_train_epochs" in failed.stderr.strip().splitlines()[-1]
    assert [p.name for p in release.iterdir()] == ["model.safetensors"], "a failed release.sh touched the release"

    made = release_sh(dataset_dir, tmp_path / "run", release, env, "--num_train_epochs=2")
    assert made.returncode == 0, made.stderr[-3000:]
    files = {p.name for p in release.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "all_results.json", "train_config.yaml", "modeling_hybrid_vit.py"} <= files
    assert "checkpoints" not in files and not (tmp_path / "release.incomplete").exists()
    evaluation = json.loads((tmp_path / "run-evaluation" / "eval_results.json").read_text())
    assert evaluation["split"] == "validation" and evaluation["num_samples"] == 6  # the 20% its run held out
    config = json.loads((release / "config.json").read_text())
    assert config["logit_temperature"] == pytest.approx(evaluation["calibration"]["fitted_temperature"])
    card = (release / "README.md").read_text()
    assert "## Evaluation" in card and f"{evaluation['accuracy_flip_tta']:.4f}" in card
    assert "fitted on this split" in card and "block 1: accuracy lost when skipped" in card and "average map order" in card
    assert re.search(r"Command: `python run_train.py --config configs/release.yaml ", card)


def test_release_sh_help_describes_it_and_lists_the_settings():
    result = subprocess.run(["bash", str(PROJECT_ROOT / "release.sh"), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Makes the release" in result.stdout and "--resume_from_checkpoint latest" in result.stdout
    assert "--num_train_epochs" in result.stdout
