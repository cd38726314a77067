"""Evaluate a saved hybrid ViT on a dataset split: accuracy, per-class accuracy, the
confusion matrix and the most confident mistakes, as eval_results.json and two PNGs.

    python run_eval.py --model outputs/hybrid-vit-cifar10 --dataset_name ../shared/data/cifar10 \
        --output_dir outputs/eval --tta

Without `--split`, the `test` split when the dataset has one, else the validation split
that run_train.py carved (same fraction and seed, read from the run's train_config.yaml).
The functions also serve the analysis notebook, including `plot_training_curves`.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from visualize import InputError, dataset_images, display_image, load_model, load_split


def evaluate_model(model, processor, dataset, image_column: str, label_column: str, batch_size: int = 128,
                   tta: bool = False, progress: bool = True, tta_shift: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (N,) and class probabilities (N, C) for every image of `dataset`, preprocessed
    in batches by the model's own processor. With `tta`, the softmax of each image and of
    its horizontal flip are averaged; with `tta_shift` too, so are those of both shifted by
    that many pixels (weighted as `cifar10_data.tta_views` says)."""
    from tqdm.auto import tqdm

    from cifar10_data import decode_image, tta_views

    labels, batches = [], []
    total = math.ceil(len(dataset) / batch_size)
    with torch.no_grad():
        for rows in tqdm(dataset.iter(batch_size=batch_size), total=total, desc="eval", disable=not progress):
            images = [decode_image(value) for value in rows[image_column]]
            pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(model.device)
            if tta:
                probabilities = sum(weight * model(pixel_values=view).logits.float().softmax(dim=-1)
                                    for view, weight in tta_views(pixel_values, tta_shift))
            else:
                probabilities = model(pixel_values=pixel_values).logits.float().softmax(dim=-1)
            batches.append(probabilities.cpu())
            labels += rows[label_column]
    return torch.tensor(labels, dtype=torch.long), torch.cat(batches)


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts; row = true class, column = predicted class."""
    return torch.bincount(labels * num_classes + predictions, minlength=num_classes**2).reshape(num_classes, num_classes)


def most_confident(labels: torch.Tensor, probabilities: torch.Tensor, correct: bool, k: int) -> list[int]:
    """Indices of the k correct (or wrong) predictions made with the highest confidence."""
    confidence, predictions = probabilities.max(dim=-1)
    candidates = torch.nonzero((predictions == labels) == correct).flatten()
    order = confidence[candidates].argsort(descending=True)
    return candidates[order[:k]].tolist()


def summarize(labels: torch.Tensor, probabilities: torch.Tensor, label_names: list[str], num_mistakes: int = 16) -> dict:
    """Everything eval_results.json holds, as plain numbers and lists. `loss` is the mean
    cross-entropy of `probabilities` (flip-averaged ones with TTA)."""
    labels = labels.long()
    confidence, predictions = probabilities.max(dim=-1)
    matrix = confusion_matrix(labels, predictions, len(label_names))
    per_class = matrix.diag().double() / matrix.sum(dim=1).clamp_min(1)
    loss = F.nll_loss(probabilities.clamp_min(1e-12).log(), labels).item()
    mistakes = most_confident(labels, probabilities, correct=False, k=num_mistakes)
    return {
        "num_samples": len(labels),
        "accuracy": (predictions == labels).sum().item() / max(len(labels), 1),
        "loss": loss,
        "per_class_accuracy": {name: per_class[i].item() for i, name in enumerate(label_names)},
        "label_names": list(label_names),
        "confusion_matrix": matrix.tolist(),
        "most_confident_mistakes": [
            {
                "index": i,
                "true": label_names[labels[i]],
                "predicted": label_names[predictions[i]],
                "confidence": confidence[i].item(),
            }
            for i in mistakes
        ],
    }


def plot_confusion_matrix(matrix, label_names: list[str]):
    """Confusion matrix with each row normalised to the true class's count, so the diagonal
    is the per-class accuracy; the cells give the counts."""
    counts = np.asarray(matrix)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    C = len(label_names)
    size = max(4.5, 0.6 * C + 1.5)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(C):
        for j in range(C):
            if counts[i, j]:
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(C), label_names, rotation=45, ha="right")
    ax.set_yticks(range(C), label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    ax.set_title(f"Confusion matrix ({counts.sum()} images, accuracy {accuracy:.1%})")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    fig.tight_layout()
    return fig


def plot_per_class_accuracy(per_class_accuracy: dict):
    names, values = list(per_class_accuracy), list(per_class_accuracy.values())
    fig = Figure(figsize=(max(5, 0.6 * len(names) + 1), 3.5))
    ax = fig.subplots()
    ax.bar(names, values, color="#4c72b0")
    for x, value in enumerate(values):
        ax.text(x, value + 0.01, f"{value:.0%}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy per class")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    return fig


def plot_mistakes(dataset, image_column: str, label_column: str, indices, probabilities: torch.Tensor,
                  label_names: list[str], columns: int = 8):
    """A grid of the images at `indices` (e.g. the most confident mistakes), each titled
    with its true label, the predicted one and the confidence."""
    images, true = dataset_images(dataset, image_column, label_column, indices)
    columns = max(1, min(columns, len(images)))
    rows = max(1, math.ceil(len(images) / columns))
    fig = Figure(figsize=(1.9 * columns, 2.3 * rows + 0.4))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, name, index in zip(axes.flat, images, true, indices):
        confidence, predicted = probabilities[index].max(dim=-1)
        ax.imshow(display_image(image))
        ax.set_title(f"true: {name}\npred: {label_names[predicted]} {confidence:.0%}", fontsize=9)
    if not images:
        axes[0, 0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    fig.suptitle("Most confident mistakes", fontsize=11)
    fig.tight_layout()
    return fig


def plot_training_curves(run_dir):
    """Training loss and learning rate against step, validation loss and accuracy against
    epoch, from a run folder's training_log.json. None (and a note) when the run has none."""
    path = Path(run_dir) / "training_log.json"
    if not path.is_file():
        print(f"no training log at {path}")
        return None
    log = json.loads(path.read_text())
    train = [entry for entry in log if "train_loss" in entry]
    evals = [entry for entry in log if "eval_accuracy" in entry]
    fig = Figure(figsize=(14, 3.8))
    loss_ax, acc_ax, lr_ax = fig.subplots(1, 3)
    loss_ax.plot([e["step"] for e in train], [e["train_loss"] for e in train], label="train (batch)", alpha=0.7)
    if evals:
        loss_ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="validation")
        acc_ax.plot([e["epoch"] for e in evals], [e["eval_accuracy"] for e in evals], "o-", color="#1a7f37")
        best = max(evals, key=lambda e: e["eval_accuracy"])
        acc_ax.set_title(f"Validation accuracy (best {best['eval_accuracy']:.1%} at epoch {best['epoch']:.1f})")
    else:
        acc_ax.set_title("Validation accuracy (no evaluation yet)")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("Loss")
    loss_ax.legend()
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("accuracy")
    lr_ax.plot([e["step"] for e in train], [e["learning_rate"] for e in train], color="#8172b2")
    lr_ax.set_xlabel("step")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_title("Learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    fig.tight_layout()
    return fig


def tta_description(args) -> str:
    if not args.tta:
        return ""
    return f" (flip and {args.tta_shift}-pixel shift TTA)" if args.tta_shift else " (flip TTA)"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a saved model folder or a Hub id")
    parser.add_argument("--dataset_name", default="uoft-cs/cifar10", help="a Hub id or a local folder")
    parser.add_argument("--split", default=None, help="default: test when the dataset has one, else validation")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--output_dir", default="outputs/eval")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--tta", action="store_true", help="average the softmax of each image and its horizontal flip")
    parser.add_argument("--tta_shift", type=int, default=0,
                        help="with --tta, also average both views shifted by this many pixels (1 or 2; 0 = off)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    if args.max_eval_samples is not None and args.max_eval_samples < 1:
        parser.error("--max_eval_samples must be at least 1")
    if args.tta_shift < 0:
        parser.error("--tta_shift must be at least 0")
    if args.tta_shift and not args.tta:
        parser.error("--tta_shift adds views to --tta's: pass --tta too")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        model, processor = load_model(args.model)
        if args.tta_shift >= model.config.image_size:
            raise InputError(f"--tta_shift must be below the model's image size ({model.config.image_size}), got {args.tta_shift}")
        dataset, image_column, label_column, split = load_split(args.model, args.dataset_name, args.split, args.max_eval_samples)
        label_names = dataset.features[label_column].names
        if len(label_names) != model.config.num_labels:
            raise InputError(f"the dataset has {len(label_names)} classes but the model predicts {model.config.num_labels}")
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model_names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if model_names != label_names:
        print(f"note: the model's labels {model_names} differ from the dataset's; using the dataset's", file=sys.stderr)

    labels, probabilities = evaluate_model(model, processor, dataset, image_column, label_column, args.batch_size, args.tta,
                                          tta_shift=args.tta_shift)
    results = {
        "model": args.model,
        "dataset_name": args.dataset_name,
        "split": split,
        "tta": args.tta,
        "tta_shift": args.tta_shift,
        **summarize(labels, probabilities, label_names),
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_results.json").write_text(json.dumps(results, indent=2))
    plot_confusion_matrix(results["confusion_matrix"], label_names).savefig(out / "confusion_matrix.png", dpi=120)
    mistakes = [entry["index"] for entry in results["most_confident_mistakes"]]
    plot_mistakes(dataset, image_column, label_column, mistakes, probabilities, label_names).savefig(out / "mistakes.png", dpi=110)

    print(f"{split}: accuracy {results['accuracy']:.4f} on {results['num_samples']} images" + tta_description(args))
    width = max(len(name) for name in label_names)
    for name, accuracy in results["per_class_accuracy"].items():
        print(f"  {name:<{width}}  {accuracy:.4f}")
    print(f"wrote {out / 'eval_results.json'}, confusion_matrix.png and mistakes.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
