"""Evaluate a saved hybrid ViT on a dataset split: accuracy, per-class accuracy, the confusion
matrix and the most confident mistakes; calibration (expected calibration error as saved, and
after a temperature fitted on the validation split); the transformer's health (accuracy with
each block skipped, CLS attention entropy, how much the maps differ between images:
transformer_health.py); and how faithful its attention maps are (deletion and insertion curves
against a random order and the average map: faithfulness.py). Writes eval_results.json and
figures; the model folder is left as it is unless --save_temperature or --add_to_card say
otherwise.

    python run_eval.py --model outputs/hybrid-vit-cifar10 --dataset_name ../shared/data/cifar10 --tta

Without `--split`: the `test` split when the dataset has one, else the validation split the
model's run carved (its fraction and seed, from the folder's train_config.yaml).
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

import faithfulness
import hub_folder
import transformer_health
from cifar10_data import DecodedImages, decode_all, eval_dataloader, load_split, sample_indices
from errors import UserError, command
from evaluation import (expected_calibration_error, fit_temperature, plot_confusion_matrix, plot_mistakes,
                        plot_reliability, predict, summarize)
from hub_folder import is_local_path, load_model
from training_settings import split_of


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="checkpoints/hybrid-vit-cifar10", help="a saved model folder or a Hub id (default: the release)")
    parser.add_argument("--dataset_name", default="uoft-cs/cifar10", help="a Hub id or a local folder")
    parser.add_argument("--split", default=None, help="default: test when the dataset has one, else validation")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--output_dir", default="outputs/eval")
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--tta", action="store_true", help="also score each image averaged with its mirror image")
    parser.add_argument("--health_images", type=int, default=5000,
                        help="images of the split (a seeded sample) for the transformer's health; 0 skips it")
    parser.add_argument("--faithfulness_images", type=int, default=1000,
                        help="images of the split (a seeded sample) for the maps' deletion and insertion curves; 0 skips them")
    parser.add_argument("--save_temperature", action="store_true",
                        help="write the temperature fitted on the validation split into the model folder's config.json")
    parser.add_argument("--add_to_card", action="store_true",
                        help="write this evaluation (accuracy, calibration, health, faithfulness) into the model folder's "
                             "card, README.md, replacing an earlier one")
    args = parser.parse_args(argv)
    for name in ("health_images", "faithfulness_images"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be at least 0")
    if args.batch_size < 1 or (args.max_eval_samples is not None and args.max_eval_samples < 1):
        parser.error("--batch_size and --max_eval_samples must be at least 1")
    for flag in ("save_temperature", "add_to_card"):
        if getattr(args, flag) and not is_local_path(args.model):
            parser.error(f"--{flag} writes into a model folder; {args.model} is a Hub id")
    return args


def calibration(model, logits: torch.Tensor, labels: torch.Tensor, split: str, out: Path) -> dict:
    """Expected calibration error of the model as saved (its logits already divided by its
    saved temperature), and on the validation split, after the temperature fitted there; the
    reliability diagram of both."""
    saved = model.config.logit_temperature
    raw = logits * saved
    result = {"saved_temperature": saved, "ece": expected_calibration_error(logits.softmax(-1), labels)}
    curves = {f"as saved (T = {saved:.3f})": logits.softmax(-1)}
    if split == "validation":
        temperature = fit_temperature(raw, labels)
        result.update(ece_at_temperature_1=expected_calibration_error(raw.softmax(-1), labels), fitted_temperature=temperature,
                      ece_after_fitting=expected_calibration_error((raw / temperature).softmax(-1), labels))
        curves[f"fitted here (T = {temperature:.3f})"] = (raw / temperature).softmax(-1)
    plot_reliability(curves, labels).savefig(out / "reliability.png", dpi=110)
    return result


def batches(images: DecodedImages, indices, batch_size: int):
    """(pixel_values, labels) for the images at `indices`, `batch_size` at a time."""
    for start in range(0, len(indices), batch_size):
        batch = images.__getitems__(indices[start : start + batch_size])
        yield batch["pixel_values"], batch["labels"]


def interpretability(args, model, images: DecodedImages, out: Path) -> dict:
    """The transformer's health and the faithfulness of its maps, each on a seeded sample of
    the split, with their figures; for the model as saved."""
    results = {}
    if not model.config.num_hidden_layers:
        print("note: the model has no transformer blocks (the backbone alone): no attention to check", file=sys.stderr)
        return results
    if args.health_images:
        indices = sorted(sample_indices(len(images), args.health_images, seed=0))
        health, spread = transformer_health.measure(model, batches(images, indices, args.batch_size))
        transformer_health.plot_health(health, spread).savefig(out / "transformer_health.png", dpi=110)
        results["transformer_health"] = health
    if args.faithfulness_images:
        pixel_values = images.__getitems__(sample_indices(len(images), args.faithfulness_images, seed=0))["pixel_values"]
        maps = faithfulness.measure(model, pixel_values, batch_size=args.batch_size)
        maps["sanity_check_rank_correlation"] = faithfulness.sanity_check(model, pixel_values[:256], args.batch_size)
        faithfulness.plot_curves(maps).savefig(out / "faithfulness.png", dpi=110)
        results["faithfulness"] = maps
    return results


def report(results: dict, out: Path):
    """The headline numbers on stdout."""
    print(f"{results['split']}: accuracy {results['accuracy']:.4f} on {results['num_samples']} images"
          + (f" ({results['accuracy_flip_tta']:.4f} with flip TTA)" if results["tta"] else ""))
    width = max(len(name) for name in results["label_names"])
    for name, value in results["per_class_accuracy"].items():
        print(f"  {name:<{width}}  {value:.4f}")
    c = results["calibration"]
    print(f"expected calibration error {c['ece']:.2%} as saved (temperature {c['saved_temperature']:.3f})"
          + (f"; {c['ece_at_temperature_1']:.2%} at temperature 1, {c['ece_after_fitting']:.2%} at the temperature fitted "
             f"here ({c['fitted_temperature']:.3f})" if "fitted_temperature" in c else ""))
    if "transformer_health" in results:
        h = results["transformer_health"]
        for b in h["blocks"]:
            print(f"  block {b['block']}: accuracy {b['accuracy_skipped']:.4f} when skipped ({100 * b['skip_cost']:+.2f} "
                  f"points lost), CLS attention entropy {b['cls_entropy_of_uniform']:.2f} of uniform")
        print(f"  rollout map against the average map: cosine {h['rollout_cosine_to_average']:.2f}, correlation "
              f"{h['rollout_correlation_to_average']:.2f} (1 = the same map for every image)")
    if "faithfulness" in results:
        f = results["faithfulness"]
        for name in (*faithfulness.MAP_METHODS, "random", "average_map"):
            print(f"  {name:<12} deletion AUC {f[name]['deletion_auc']:.3f}  insertion AUC {f[name]['insertion_auc']:.3f}")
        print(f"most faithful map: {f['most_faithful']} (following the predicted class)")
    print(f"wrote {out / 'eval_results.json'} and {', '.join(sorted(p.name for p in out.glob('*.png')))}", file=sys.stderr)


def card_section(results: dict, argv) -> str:
    """The evaluation as a model card section: accuracy, calibration, and where measured the
    transformer's health and the faithfulness of its maps."""
    c = results["calibration"]
    rows = [f"| accuracy | {results['accuracy']:.4f} |"]
    rows += [f"| accuracy with flip test-time augmentation | {results['accuracy_flip_tta']:.4f} |"] * results["tta"]
    rows += [f"| expected calibration error, as saved (T = {c['saved_temperature']:.3f}) | {c['ece']:.2%} |"]
    if "fitted_temperature" in c:
        rows += [f"| expected calibration error at T = 1 | {c['ece_at_temperature_1']:.2%} |",
                 f"| expected calibration error at T = {c['fitted_temperature']:.3f}, fitted on this split | {c['ece_after_fitting']:.2%} |"]
    if "transformer_health" in results:
        h = results["transformer_health"]
        rows += [f"| block {b['block']}: accuracy lost when skipped; CLS attention entropy of uniform | "
                 f"{100 * b['skip_cost']:.2f} points; {b['cls_entropy_of_uniform']:.2f} |" for b in h["blocks"]]
        rows += [f"| rollout map against the average map: cosine; correlation | {h['rollout_cosine_to_average']:.2f}; "
                 f"{h['rollout_correlation_to_average']:.2f} |"]
    if "faithfulness" in results:
        f = results["faithfulness"]
        rows += [f"| {name.replace('_', ' ')} order: deletion AUC; insertion AUC ({f['num_images']} images) | "
                 f"{f[name]['deletion_auc']:.3f}; {f[name]['insertion_auc']:.3f} |"
                 for name in (*faithfulness.MAP_METHODS, "random", "average_map")]
    names = {"--model": hub_folder.public_name(results["model"]), "--output_dir": hub_folder.public_name(results["output_dir"]),
             "--dataset_name": hub_folder.public_dataset_name(results["dataset_name"])}
    command_line = hub_folder.public_command(shlex.join(["python", "run_eval.py", *(sys.argv[1:] if argv is None else argv)]), names)
    return (f"`{command_line}` on the {results['split']} split ({results['num_samples']} images); deletion and insertion "
            "follow the predicted class (lower deletion and higher insertion are more faithful).\n\n"
            "| measure | value |\n| --- | --- |\n" + "\n".join(rows) + "\n")


def load(args):
    """The model, and the split decoded once at its image size, or one clear line."""
    model, _ = load_model(args.model)
    dataset, image_column, label_column, split = load_split(args.dataset_name, args.split, *split_of(args.model),
                                                            args.max_eval_samples)
    label_names = dataset.features[label_column].names
    if len(label_names) != model.config.num_labels:
        raise UserError(f"the dataset has {len(label_names)} classes but the model predicts {model.config.num_labels}")
    if args.save_temperature and split != "validation":
        raise UserError(f"--save_temperature fits on the validation split, never on {split!r}: add --split validation")
    images = DecodedImages(*decode_all(dataset, image_column, label_column, model.config.image_size)[:2])
    return model, dataset, image_column, label_column, split, images


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    model, dataset, image_column, label_column, split, images = load(args)
    label_names = dataset.features[label_column].names
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    loader = eval_dataloader(images, args.batch_size)
    logits, labels = predict(model, loader, desc=f"evaluating on {split}")
    results = {"model": args.model, "dataset_name": args.dataset_name, "output_dir": args.output_dir, "split": split, "tta": args.tta,
               **summarize(labels, logits.softmax(-1), label_names)}
    if args.tta:
        results["accuracy_flip_tta"] = summarize(labels, predict(model, loader, flip=True)[0].softmax(-1), label_names)["accuracy"]
    results["calibration"] = calibration(model, logits, labels, split, out)
    results.update(interpretability(args, model, images, out))
    (out / "eval_results.json").write_text(json.dumps(results, indent=2))
    plot_confusion_matrix(results["confusion_matrix"], label_names).savefig(out / "confusion_matrix.png", dpi=120)
    mistakes = [entry["index"] for entry in results["most_confident_mistakes"]]
    plot_mistakes(dataset, image_column, label_column, mistakes, logits.softmax(-1), label_names).savefig(out / "mistakes.png", dpi=110)
    if args.save_temperature:
        model.config.logit_temperature = results["calibration"]["fitted_temperature"]
        folder = Path(args.model).expanduser()  # as load_model read it: `~/model` is not a folder named `~`
        model.config.save_pretrained(folder)
        print(f"temperature {model.config.logit_temperature:.4f} saved in {folder / 'config.json'}", file=sys.stderr)
    if args.add_to_card:
        hub_folder.replace_card_section(Path(args.model).expanduser(), "Evaluation", card_section(results, argv))
        print(f"evaluation written into {Path(args.model).expanduser() / 'README.md'}", file=sys.stderr)
    report(results, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
