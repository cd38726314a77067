"""A trained model's folder, as the Hub sees it: whether a name is a local folder or a Hub id,
the public names a folder keeps instead of local paths, the model card (huggingface_hub's card
classes), the push, the settings of the run that trained it, and the one way to load it."""

import copy
import os
import shlex
from pathlib import Path

import yaml

from errors import UserError

# Settings whose values may be local paths; what a folder keeps of them is a public name.
PATH_SETTINGS = (("data", "dataset_name"), ("training", "output_dir"), ("training", "resume_from_checkpoint"))


def is_local_path(name: str) -> bool:
    """A folder on this machine, or something written as a path (`./x`, `/x`, `~/x`,
    `a/b/c`), as opposed to a Hub id (`name` or `owner/name`)."""
    return Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1


def dataset_hub_id(dataset_name: str) -> str | None:
    """The Hub id of the dataset: a Hub id as it is; for a local folder, the one dataset its
    README front matter names in `source_datasets` (as a copy of a Hub dataset says, e.g.
    `uoft-cs/cifar10`); otherwise None."""
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


def public_settings(settings: dict) -> dict:
    """Settings (as a dict of sections) as a folder keeps them: no local paths."""
    public = copy.deepcopy(settings)
    for section, key in PATH_SETTINGS:
        value = public[section].get(key)
        if isinstance(value, str) and value != "latest":
            public[section][key] = public_dataset_name(value) if key == "dataset_name" else public_name(value)
    return public


def public_dataset_name(dataset_name: str) -> str:
    """What a card calls a dataset: its Hub id where known, else the folder's last name."""
    return dataset_hub_id(dataset_name) or public_name(dataset_name)


def public_command(command: str, names: dict, drop: tuple = ()) -> str:
    """`command` with the value of each flag in `names` (`--dataset_name ../data/cifar10`, also
    in `--key=value` form) replaced by the public name `names` gives it, so that a card's command
    runs for a Hub user and holds no local path; each flag in `drop` leaves with its value."""
    words, out = shlex.split(command), []
    for index, word in enumerate(words):
        key, equals, _ = word.partition("=")
        flag_before = words[index - 1] if index > 0 and not word.startswith("--") else None
        if key in drop or flag_before in drop:
            continue
        if equals and names.get(key) is not None:
            word = f"{key}={names[key]}"
        elif flag_before is not None and names.get(flag_before) is not None:
            word = str(names[flag_before])
        out.append(word)
    return shlex.join(out)


# ------------------------------------------------------------------------- the model card


def card_data(model_name: str, dataset_name: str, results: dict):
    """The card's metadata: `datasets:` and each result's dataset are the Hub id wherever the
    data is (a copy of) a Hub dataset, so the Hub links them."""
    from huggingface_hub import EvalResult, ModelCardData

    hub_id = dataset_hub_id(dataset_name)
    name = hub_id or public_name(dataset_name)
    rows = [
        EvalResult(task_type="image-classification", task_name="Image Classification", dataset_type=name,
                   dataset_name=name, dataset_split=split, metric_type="accuracy", metric_name=title,
                   metric_value=round(results[key], 4))
        for split, key, title in (("validation", "eval_accuracy", "Validation accuracy (held out from train)"),
                                  ("test", "test_accuracy", "Test accuracy"))
        if results.get(key) is not None
    ]
    return ModelCardData(
        model_name=model_name, library_name="transformers", pipeline_tag="image-classification", license="apache-2.0",
        tags=["image-classification", "vision", "hybrid-vit", "cifar10"], datasets=[hub_id] if hub_id else None,
        metrics=["accuracy"], eval_results=rows,
    )


def precision_name(mixed_precision: str) -> str:
    return {"no": "float32", "bf16": "bf16 mixed precision"}.get(mixed_precision, mixed_precision)


def duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 90 * 60 else f"{seconds / 3600:.2f} h"


def hardware_line(results: dict) -> str:
    """Where the run trained: its hardware, or, for a run resumed elsewhere, each stretch's."""
    segments = results.get("segments") or []
    if len({(s["hardware"], s["mixed_precision"]) for s in segments}) <= 1:
        return results["hardware"]
    return "; ".join(f"steps {s['first_step']}-{s['last_step']} on {s['hardware']}, "
                     f"{precision_name(s['mixed_precision'])}, {duration(s['train_seconds'])}"
                     for s in segments)


def write_model_card(output_dir, settings: dict, results: dict, command: str, label_names) -> None:
    """README.md of a trained folder: metadata the Hub reads, what was measured, how it was
    trained and how to use it. Holds no local path."""
    from huggingface_hub import ModelCard

    public = public_settings(settings)
    name = settings["training"]["hub_model_id"] or Path(output_dir).resolve().name
    split = settings["data"]["train_val_split"]
    # The command that makes the model from scratch; a run that resumed (more than one stretch) says so after it.
    path_names = {f"--{key}": public[section][key] for section, key in PATH_SETTINGS}
    resumed = " (stopped and continued with `--resume_from_checkpoint latest`)" if len(results.get("segments") or []) > 1 else ""
    test_row = f"| test accuracy | {results['test_accuracy']:.4f} |\n" if results.get("test_accuracy") is not None else ""
    body = f"""
# {name}

A hybrid Vision Transformer (convolutional backbone + transformer encoder) trained on
`{public['data']['dataset_name']}` with the hybrid-vit-cifar10 project's `run_train.py`.

| metric | value |
| --- | --- |
| validation accuracy (final model, {results['eval_samples']} held-out training images) | {results['eval_accuracy']:.4f} |
| validation accuracy with flip test-time augmentation | {results['eval_accuracy_flip_tta']:.4f} |
{test_row}| epochs | {results['epochs']:.2f} |
| optimisation steps | {results['steps']} |
| training time | {duration(results['train_seconds'])} |
| training throughput | {results['train_samples_per_second']:.0f} images/s |
| precision | {precision_name(results['mixed_precision'])} |
| parameters | {results['num_parameters']:,} |

The validation images are a stratified, seeded {split:.0%} of the training split, held out
from training; nothing was chosen by them (the model is the one the last step left).

- Hardware: {hardware_line(results)}
- Command: `{public_command(command, path_names, drop=("--resume_from_checkpoint",))}`{resumed}
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
    metadata = card_data(name, settings["data"]["dataset_name"], results)
    ModelCard(f"---\n{metadata.to_yaml()}\n---\n{body}").save(Path(output_dir) / "README.md")


def replace_card_section(folder, heading: str, text: str) -> None:
    """Put `## heading` with `text` into the folder's card, README.md: in place of a section of
    that name, or before `## Use`."""
    path = Path(folder) / "README.md"
    card = path.read_text() if path.is_file() else ""
    section = f"## {heading}\n\n{text.strip()}\n\n"
    start = card.find(f"## {heading}\n")
    if start >= 0:
        end = card.find("\n## ", start + 1)
        card = card[:start] + section + (card[end + 1 :] if end >= 0 else "")
    else:
        use = card.find("## Use\n")
        card = card[:use] + section + card[use:] if use >= 0 else card.rstrip() + "\n\n" + section
    path.write_text(card)


def check_writable(output_dir) -> None:
    """Fail now, not after an hour of training."""
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise UserError(f"output folder {output_dir} is not writable: {error.strerror or error}") from None


def push_to_hub(output_dir, repo_id: str, ignore_patterns=("checkpoints/*", "*.incomplete*")) -> None:
    import huggingface_hub

    huggingface_hub.create_repo(repo_id, exist_ok=True)
    huggingface_hub.upload_folder(repo_id=repo_id, folder_path=str(output_dir), ignore_patterns=list(ignore_patterns))


# ------------------------------------------------------------------ reading a trained folder


def saved_settings(model_path) -> dict:
    """The settings of the run that trained `model_path` (its train_config.yaml); empty when
    there is none, as for a Hub model."""
    path = Path(model_path).expanduser() / "train_config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def load_model(name_or_path: str):
    """(model in eval mode, image processor) from a saved folder or a Hub id, as a Hub user
    loads it (`trust_remote_code=True`), or one clear line."""
    path = os.path.expanduser(name_or_path)
    if is_local_path(name_or_path) and not os.path.isdir(path):
        raise UserError(f"model folder not found: {name_or_path}")
    if is_local_path(name_or_path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{name_or_path} is not a saved model folder (no config.json)")
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    try:
        model = AutoModelForImageClassification.from_pretrained(path, trust_remote_code=True)
        processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=True)
    except OSError as error:  # an unknown Hub id, or the Hub unreachable offline
        hint = "" if is_local_path(name_or_path) else "; offline, give a saved model folder (e.g. checkpoints/hybrid-vit-cifar10)"
        raise UserError(f"could not load model {name_or_path!r}: {str(error).strip().splitlines()[0]}{hint}") from error
    return model.eval(), processor
