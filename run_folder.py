"""A trained model's folder (or Hub repository) and what comes with it: loading the model,
its run's saved settings and the validation split it was scored on; names that carry no
local path (the dataset's Hub id, or a folder's last name); the model card, written with
huggingface_hub's card classes; and the push to the Hub. Also the project's one user-error
type, and its one test of whether a name is a local path or a Hub id."""

import copy
import os
import random
import shlex
from pathlib import Path

import yaml

class UserError(ValueError):
    """Something the user must fix (a setting, a path, a dataset, an image, a run that cannot
    go on), said in one line; commands print it as `error: ...` and exit with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


# Settings whose values may be local paths; what a folder keeps of them is a public name.
PATH_SETTINGS = (
    ("data", "dataset_name"),
    ("training", "output_dir"),
    ("training", "model_name_or_path"),
    ("training", "teacher_model"),
    ("training", "resume_from_checkpoint"),
)


def is_local_path(name: str) -> bool:
    """A folder on this machine, or something written as a path (`./x`, `/x`, `~/x`,
    `a/b/c`), as opposed to a Hub id (`name` or `owner/name`)."""
    return Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1


def dataset_hub_id(dataset_name: str, declared: str | None = None) -> str | None:
    """The Hub id of the dataset: `declared` if given; a Hub id as it is; for a local folder,
    the one dataset its README front matter names in `source_datasets` (as a copy of a Hub
    dataset says, e.g. `uoft-cs/cifar10`); otherwise None."""
    if declared:
        return declared
    if not is_local_path(dataset_name):
        return dataset_name
    readme = Path(dataset_name).expanduser() / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import DatasetCard

    try:
        sources = DatasetCard.load(readme).data.to_dict().get("source_datasets") or []
    except (ValueError, OSError, yaml.YAMLError):
        return None
    sources = [sources] if isinstance(sources, str) else sources
    return sources[0] if len(sources) == 1 else None


def public_name(name: str | None) -> str | None:
    """A Hub id as it is; a local path as its last name (`../data/cifar10` -> `cifar10`)."""
    if name is None or not is_local_path(name):
        return name
    return Path(name).expanduser().resolve().name


def public_dataset_name(data: dict) -> str:
    return dataset_hub_id(data["dataset_name"], data.get("dataset_hub_id")) or public_name(data["dataset_name"])


def public_settings(settings: dict) -> dict:
    """The settings as saved with a model (train_config.yaml, the card): no local paths."""
    public = copy.deepcopy(settings)
    for section, key in PATH_SETTINGS:
        value = public[section].get(key)
        if isinstance(value, str) and value != "latest":
            public[section][key] = public_dataset_name(settings["data"]) if key == "dataset_name" else public_name(value)
    return public


def public_command(command: str, settings: dict) -> str:
    """`command` with each path-valued setting (`--dataset_name ../data/cifar10`, also in
    `--key=value` form) replaced by its public name, so the card's command runs for a Hub user."""
    public = public_settings(settings)
    names = {f"--{key}": public[section][key] for section, key in PATH_SETTINGS}
    words, out = shlex.split(command), []
    for index, word in enumerate(words):
        key, equals, _ = word.partition("=")
        if equals and key in names and names[key] is not None:
            word = f"{key}={names[key]}"
        elif index > 0 and words[index - 1] in names and names[words[index - 1]] is not None and not word.startswith("--"):
            word = str(names[words[index - 1]])
        out.append(word)
    return shlex.join(out)


def eval_results(dataset_id: str, results: dict, validation_note: str) -> list:
    """huggingface_hub EvalResults for the splits measured: validation, and test when the
    dataset has one. `dataset_id` is the Hub id where known, so the Hub links the dataset."""
    from huggingface_hub import EvalResult

    rows = []
    for split, key, name in (
        ("validation", "eval_accuracy", f"Validation accuracy ({validation_note})"),
        ("test", "test_accuracy", "Test accuracy"),
    ):
        if results.get(key) is not None:
            rows.append(
                EvalResult(
                    task_type="image-classification",
                    task_name="Image Classification",
                    dataset_type=dataset_id,
                    dataset_name=dataset_id,
                    dataset_split=split,
                    metric_type="accuracy",
                    metric_name=name,
                    metric_value=round(results[key], 4),
                )
            )
    return rows


def card_data(model_name: str, settings: dict, results: dict, base_model: str | None = None):
    """The card's metadata (huggingface_hub ModelCardData): `datasets:` and each result's
    dataset are the Hub id wherever the data is (a copy of) a Hub dataset."""
    from huggingface_hub import ModelCardData

    data = settings["data"]
    hub_id = dataset_hub_id(data["dataset_name"], data.get("dataset_hub_id"))
    note = f"a stratified, seeded {data['train_val_split']:.0%} of the training split, held out"
    return ModelCardData(
        model_name=model_name,
        base_model=base_model if base_model and not is_local_path(base_model) else None,  # metadata names Hub models only
        library_name="transformers",
        pipeline_tag="image-classification",
        license="apache-2.0",
        tags=["image-classification", "vision", "hybrid-vit", "cifar10"],
        datasets=[hub_id] if hub_id else None,
        metrics=["accuracy"],
        eval_results=eval_results(hub_id or public_name(data["dataset_name"]), results, note),
    )


def write_model_card(output_dir, settings: dict, results: dict, command: str, label_names) -> None:
    """README.md of a trained folder: metadata the Hub reads, then what was measured, how
    it was trained, and how to use it. Holds no local path."""
    from huggingface_hub import ModelCard

    data, train = settings["data"], settings["training"]
    public = public_settings(settings)
    name = train["hub_model_id"] or Path(output_dir).resolve().name
    dataset = public["data"]["dataset_name"]
    base = public["training"]["model_name_or_path"]
    start = f", starting from the weights of `{base}`" if base else ""
    if train["teacher_model"]:
        start += (
            f", distilled from `{public['training']['teacher_model']}` (weight {train['distillation_alpha']:g} on its "
            f"predictions{', averaged with its mirror image' if train['teacher_flip_tta'] else ''}"
            f"{f' and {shift}-pixel shifts of both' if (shift := train['teacher_tta_shift']) else ''}, "
            f"temperature {train['distillation_temperature']:g})"
        )
    metadata = card_data(name, settings, results, base_model=train["model_name_or_path"])
    test_line = f"| test accuracy | {results['test_accuracy']:.4f} |\n" if results.get("test_accuracy") is not None else ""
    shift_line = (
        f"| validation accuracy with flip and {results['tta_shift']}-pixel shift test-time augmentation "
        f"| {results['eval_accuracy_flip_shift_tta']:.4f} |\n"
        if results.get("eval_accuracy_flip_shift_tta") is not None else ""
    )
    body = f"""
# {name}

A hybrid Vision Transformer (convolutional stem + transformer encoder) trained on
`{dataset}` with the hybrid-vit-cifar10 project's `run_train.py`{start}.

| metric | value |
| --- | --- |
| validation accuracy (best epoch, {results['eval_samples']} held-out training images) | {results['eval_accuracy']:.4f} |
| validation accuracy with flip test-time augmentation | {results['eval_accuracy_flip_tta']:.4f} |
{shift_line}{test_line}| epochs | {results['epochs']:.2f} |
| optimisation steps | {results['steps']} |
| training time | {results['train_seconds'] / 60:.1f} min |
| training throughput | {results['train_samples_per_second']:.0f} images/s |
| precision | {results.get('mixed_precision', 'no')} |
| parameters | {results['num_parameters']:,} |

Validation images are a stratified, seeded {data['train_val_split']:.0%} of the training split
when the dataset has no validation split; nothing was tuned on the test split.

- Hardware: {results['hardware']}
- Command: `{public_command(command, settings)}`
- Classes: {", ".join(label_names)}

## Use

```python
from transformers import pipeline
classify = pipeline("image-classification", model="{name}", trust_remote_code=True)
classify("image.png")
```

`output_attentions=True` returns one attention map per layer, `(batch, heads, tokens + 1, tokens + 1)`.

## Training settings

```yaml
{yaml.safe_dump(public, sort_keys=False).strip()}
```
"""
    ModelCard(f"---\n{metadata.to_yaml()}\n---\n{body}").save(Path(output_dir) / "README.md")


def push_to_hub(output_dir, repo_id: str, ignore_patterns=("checkpoints/*", "*.incomplete*")) -> None:
    import huggingface_hub

    huggingface_hub.create_repo(repo_id, exist_ok=True)
    huggingface_hub.upload_folder(repo_id=repo_id, folder_path=str(output_dir), ignore_patterns=list(ignore_patterns))


# ------------------------------------------------------------------ loading a run's folder


def train_settings(model_path) -> dict:
    """The settings of the run that trained `model_path` (its train_config.yaml, as
    run_train.py saves it); empty when there is none, as for a Hub model. The one reader
    of that file."""
    config = Path(model_path).expanduser() / "train_config.yaml"
    if not config.is_file():
        return {}
    return yaml.safe_load(config.read_text()) or {}


def split_settings(model_path) -> tuple[float, int]:
    """train_val_split and seed from the run's train_config.yaml, so the validation split
    here is the one training held out; the training defaults when there is none."""
    settings = train_settings(model_path)
    return float(settings.get("data", {}).get("train_val_split", 0.1)), int(settings.get("training", {}).get("seed", 42))


def load_model(model: str):
    """(model in eval mode, image processor) from a saved folder or a Hub id."""
    path = os.path.expanduser(model)
    if is_local_path(model) and not os.path.isdir(path):
        raise UserError(f"model folder not found: {model}")
    if is_local_path(model) and not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{model} is not a saved model folder (no config.json)")
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    try:
        loaded = AutoModelForImageClassification.from_pretrained(path, trust_remote_code=True)
        processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=True)
    except OSError as error:  # an unknown Hub id, or the Hub unreachable offline
        hint = "" if is_local_path(model) else "; offline, give a saved model folder (e.g. checkpoints/hybrid-vit-cifar10)"
        raise UserError(f"could not load model {model!r}: {str(error).strip().splitlines()[0]}{hint}") from error
    return loaded.eval(), processor


def load_split(model_path, dataset_name: str, split: str | None = None, max_samples: int | None = None):
    """The evaluation split: `test` when the dataset has one, else the validation split that
    training carved (its fraction and seed from the run's train_config.yaml). Returns
    (dataset, image column, label column, split name)."""
    import cifar10_data

    train_val_split, seed = split_settings(model_path)
    splits, image_column, label_column = cifar10_data.load_splits(dataset_name, train_val_split, seed, max_eval_samples=max_samples)
    split = split or ("test" if "test" in splits else "validation")
    if split not in splits:
        raise UserError(f"dataset {dataset_name} has no split {split!r}; splits: {', '.join(splits)}")
    dataset = splits[split]
    if split == "train" and max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    return dataset, image_column, label_column, split


def open_image(path):
    """An image file as a PIL image, or one clear line."""
    from PIL import Image

    if not Path(path).is_file():
        raise UserError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read image {path}: {error}") from error


def dataset_images(dataset, image_column: str, label_column: str, indices):
    """The RGB images at `indices` and their label names."""
    from cifar10_data import decode_image

    names = dataset.features[label_column].names
    rows = [dataset[int(i)] for i in indices]
    return [decode_image(row[image_column]) for row in rows], [names[row[label_column]] for row in rows]


def sample_indices(size: int, num: int, seed: int) -> list[int]:
    return random.Random(seed).sample(range(size), min(num, size))
