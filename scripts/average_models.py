"""Average the weights of saved models (a "model soup") and score the average.

Models fine-tuned from one starting point, such as runs of `run_train.py
--model_name_or_path`, often lie in one basin of the loss, where the average of their
weights can score above each of them (Wortsman et al., 2022, "Model soups"). BatchNorm's
running statistics do not average that way, so they are estimated afresh on training
images, unless `--bn_images 0`. Those images get the augmentation the first model was
trained with (its train_config.yaml: crop, flip, Cutout, AutoAugment, MixUp and CutMix), since
the statistics a model learned are those of its augmented training images: re-estimated on
merely cropped and flipped images, the Cutout-trained release scores 91.50% instead of its
91.90%. `--bn_augmentation crop_flip` uses crop and flip alone, as this script once did.

    python scripts/average_models.py --models checkpoints/hybrid-vit-cifar10 outputs/ft-a outputs/ft-b \
        --dataset_name ../shared/data/cifar10 --output_dir outputs/soup [--weights 2 1 1]

Every model must have the same architecture and labels. The validation split is the one the
first model's run carved (its train_config.yaml); a model trained on another split gets a
warning, since its training images may be in that validation split. Prints the validation
accuracy of each model and of the average, plain and with flip TTA, then saves the average
as a Hub folder with the first model's train_config.yaml (so `run_eval.py` scores it on the
same split) and `averaging.json` (what was averaged, and the scores).
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cifar10_data import CROP_FLIP, DecodedImages, image_augmentation, mix_collator  # noqa: E402
from run_folder import UserError, load_model, load_split, split_settings, train_settings  # noqa: E402


def average_state_dicts(state_dicts: list[dict], weights: list[float]) -> dict:
    """The weighted mean of each floating-point tensor; other tensors (BatchNorm's batch
    counters) are taken from the first state dict."""
    total = float(sum(weights))
    first = state_dicts[0]
    return {
        key: (sum(w * sd[key].double() for sd, w in zip(state_dicts, weights)) / total).to(first[key].dtype)
        if first[key].is_floating_point() else first[key].clone()
        for key in first
    }


@torch.no_grad()
def recalibrate_batchnorm(model, batches) -> int:
    """Replace every BatchNorm layer's running statistics by their average over `batches`
    (normalised pixel tensors), computed in training mode; returns the number of images.
    The model is left in eval mode with each layer's momentum restored."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over the batches
    model.train()
    seen = 0
    try:
        for pixel_values in batches:
            model(pixel_values=pixel_values.to(model.device))
            seen += len(pixel_values)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.eval()
    return seen


def check_compatible(names, models):
    """Raise UserError unless every model has the first one's weights (names and shapes)
    and labels; warn when a model's run carved another validation split."""
    reference = {key: tuple(value.shape) for key, value in models[0].state_dict().items()}
    first_split = split_settings(names[0])
    for name, model in zip(names[1:], models[1:]):
        shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
        if shapes != reference:
            differing = sorted(set(shapes.items()) ^ set(reference.items()))
            raise UserError(f"{name} has another architecture than {names[0]} (first difference: {differing[0][0]})")
        if model.config.id2label != models[0].config.id2label:
            raise UserError(f"{name} predicts other labels than {names[0]}")
        split = split_settings(name)
        if split != first_split:
            print(f"warning: {name} was trained with another validation split (train_val_split, seed = {split}, "
                  f"not {first_split}); some of the validation images here may be its training images", file=sys.stderr)


AUGMENTATION_KEYS = ("random_crop_padding", "horizontal_flip", "cutout_size", "auto_augment", "mixup_alpha", "cutmix_alpha",
                     "mix_prob", "mix_switch_prob")


def training_augmentation(model_path) -> dict:
    """The augmentation settings of the run that trained `model_path` (the data section of its
    train_config.yaml); random crop and flip alone, as in CROP_FLIP, for what it does not say."""
    data = train_settings(model_path).get("data", {})
    return {key: type(CROP_FLIP[key])(data[key]) if data.get(key) is not None else CROP_FLIP[key] for key in AUGMENTATION_KEYS}


def describe(augmentation: dict) -> str:
    """The augmentation in a few words, for the summary line."""
    parts = [f"crop {augmentation['random_crop_padding']}"] if augmentation["random_crop_padding"] else []
    parts += ["flip"] if augmentation["horizontal_flip"] else []
    parts += [f"Cutout {augmentation['cutout_size']}"] if augmentation["cutout_size"] else []
    parts += [augmentation["auto_augment"]] if augmentation["auto_augment"] != "none" else []
    parts += [f"MixUp {augmentation['mixup_alpha']}"] if augmentation["mixup_alpha"] else []
    parts += [f"CutMix {augmentation['cutmix_alpha']}"] if augmentation["cutmix_alpha"] else []
    return ", ".join(parts) or "none"


def training_batches(images, labels, batch_size: int, seed: int, augmentation: dict | None = None):
    """Normalised batches of the decoded training images, augmented as `augmentation` says
    (see training_augmentation; default CROP_FLIP), batch by batch as run_train does."""
    augmentation = augmentation or CROP_FLIP
    dataset = DecodedImages(images, labels, train=True, seed=seed, **image_augmentation(augmentation))
    mix = mix_collator(augmentation, int(labels.max()) + 1, seed=seed)
    for start in range(0, len(labels), batch_size):
        yield mix(dataset.__getitems__(list(range(start, min(start + batch_size, len(labels))))))["pixel_values"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="saved model folders or Hub ids (two or more)")
    parser.add_argument("--weights", nargs="+", type=float, default=None, help="one weight per model (default: equal)")
    parser.add_argument("--dataset_name", required=True, help="Hub id or local folder of the training data")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--bn_images", type=int, default=10000,
                        help="training images to estimate BatchNorm statistics on (0 keeps the averaged statistics)")
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument("--bn_augmentation", choices=["training", "crop_flip"], default="training",
                        help="augment the BatchNorm estimate's images as the first model's run did (its "
                             "train_config.yaml), or with random crop and flip alone")
    parser.add_argument("--seed", type=int, default=0, help="seed of the augmentation for the BatchNorm estimate")
    parser.add_argument("--max_eval_samples", type=int, default=None)
    args = parser.parse_args(argv)
    if len(args.models) < 2:
        parser.error("--models needs at least two models to average")
    if args.weights is not None and (len(args.weights) != len(args.models) or min(args.weights) <= 0):
        parser.error(f"--weights needs one positive number per model ({len(args.models)}), got {args.weights}")
    if args.bn_images < 0 or args.batch_size < 1:
        parser.error("--bn_images must be >= 0 and --batch_size >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    weights = args.weights or [1.0] * len(args.models)
    import cifar10_data
    from run_eval import evaluate_model

    try:
        loaded = [load_model(name) for name in args.models]
        models = [model for model, _ in loaded]
        processor = loaded[0][1]
        check_compatible(args.models, models)
        validation, image_column, label_column, _ = load_split(args.models[0], args.dataset_name, "validation",
                                                               args.max_eval_samples)
        if validation.features[label_column].names != [models[0].config.id2label[i] for i in range(len(models[0].config.id2label))]:
            raise UserError(f"the dataset's classes differ from the labels of {args.models[0]}")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    def score(model):
        labels, probabilities = evaluate_model(model, processor, validation, image_column, label_column, progress=False)
        _, flip = evaluate_model(model, processor, validation, image_column, label_column, tta=True, progress=False)
        return {"accuracy": (probabilities.argmax(-1) == labels).float().mean().item(),
                "accuracy_flip_tta": (flip.argmax(-1) == labels).float().mean().item()}

    scores = {}
    for name, model in zip(args.models, models):
        scores[name] = score(model)
        print(f"{name}: validation accuracy {scores[name]['accuracy']:.4f} ({scores[name]['accuracy_flip_tta']:.4f} with flip TTA)")

    average = models[0]
    average.load_state_dict(average_state_dicts([model.state_dict() for model in models], weights))
    del models[1:], loaded
    bn_images = 0
    augmentation = training_augmentation(args.models[0]) if args.bn_augmentation == "training" else {key: CROP_FLIP[key] for key in AUGMENTATION_KEYS}
    if args.bn_images and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in average.modules()):
        train, *_ = load_split(args.models[0], args.dataset_name, "train", args.bn_images)
        images, labels, _ = cifar10_data.decode_all(train, image_column, label_column, average.config.image_size,
                                                    skip_bad_images=True)
        bn_images = recalibrate_batchnorm(average, training_batches(images, labels, args.batch_size, args.seed,
                                                                    augmentation))
    scores["average"] = score(average)
    print(f"average of {len(args.models)} (weights {weights}, BatchNorm statistics "
          + (f"from {bn_images} training images ({describe(augmentation)})" if bn_images else "averaged")
          + f"): validation accuracy {scores['average']['accuracy']:.4f} ({scores['average']['accuracy_flip_tta']:.4f} with flip TTA)")

    from modeling_hybrid_vit import save_model_and_processor

    out = Path(args.output_dir)
    save_model_and_processor(average, out)
    if (Path(args.models[0]) / "train_config.yaml").is_file():  # run_train.py wrote it with public names
        shutil.copy(Path(args.models[0]) / "train_config.yaml", out / "train_config.yaml")
    # Saved records name no local paths: each model by its folder's name (with its parent's
    # where two would read the same), the data by its Hub id.
    from run_folder import public_dataset_name, public_name

    names = [public_name(m) for m in args.models]
    if len(set(names)) < len(names):
        names = ["/".join(Path(m).resolve().parts[-2:]) for m in args.models]
    rename = dict(zip(args.models, names))
    scores = {rename.get(key, key): value for key, value in scores.items()}
    record = {"models": names, "weights": weights, "dataset_name": public_dataset_name({"dataset_name": args.dataset_name}),
              "validation_split": dict(zip(("train_val_split", "seed"), split_settings(args.models[0]))),
              "validation_images": len(validation), "bn_images": bn_images, "bn_seed": args.seed,
              "bn_augmentation": augmentation if bn_images else None, "validation": scores}
    (out / "averaging.json").write_text(json.dumps(record, indent=2))
    print(f"saved the average to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
