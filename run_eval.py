"""Evaluate a saved hybrid ViT on a dataset split: accuracy, per-class accuracy, the
confusion matrix, the most confident mistakes, the transformer's health (accuracy with each
block skipped, CLS attention entropy, how much the maps differ between images:
transformer_health.py), calibration (expected calibration error,
and with --fit_temperature a temperature fitted on the validation split and saved with the
model) and how faithful its attention maps are (deletion and insertion curves against
random and average-map baselines: faithfulness.py), as eval_results.json and five PNGs.

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

from run_folder import UserError, dataset_images, load_model, load_split
from visualize import display_image


def pixel_batches(model, processor, dataset, image_column: str, label_column: str, batch_size: int = 128,
                  progress: bool = True, desc: str = "eval"):
    """(pixel_values, labels) for `dataset` in batches, decoded and preprocessed by the
    model's own processor, on the model's device, with a progress bar."""
    from tqdm.auto import tqdm

    from cifar10_data import decode_image

    total = math.ceil(len(dataset) / batch_size)
    for rows in tqdm(dataset.iter(batch_size=batch_size), total=total, desc=desc, disable=not progress):
        images = [decode_image(value) for value in rows[image_column]]
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(model.device)
        yield pixel_values, torch.tensor(rows[label_column], dtype=torch.long, device=model.device)


def evaluate_model(model, processor, dataset, image_column: str, label_column: str, batch_size: int = 128,
                   tta: bool = False, progress: bool = True, tta_shift: int = 0, logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (N,) and class probabilities (N, C) for every image of `dataset` (or, with
    `logits`, the logits, divided by the model's temperature), preprocessed in batches by the
    model's own processor. With `tta`, the softmax of the logits averaged over each image's
    test-time views (`cifar10_data.tta_logits`: its mirror image, and with `tta_shift` both
    shifted by that many pixels), as training evaluates."""
    from cifar10_data import tta_logits

    labels, batches = [], []
    with torch.no_grad():
        for pixel_values, batch_labels in pixel_batches(model, processor, dataset, image_column, label_column, batch_size, progress):
            scores = tta_logits(model, pixel_values, tta, tta_shift)
            batches.append((scores if logits else scores.softmax(dim=-1)).cpu())
            labels.append(batch_labels.cpu())
    return torch.cat(labels), torch.cat(batches)


def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE (Guo et al. 2017): the image-weighted mean, over equal-width confidence bins, of
    |accuracy - mean confidence| in the bin."""
    confidence, predictions = probabilities.max(dim=-1)
    correct = (predictions == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    error = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            error += inside.float().mean().item() * abs(correct[inside].mean().item() - confidence[inside].mean().item())
    return error


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T > 0 that minimises the cross-entropy of softmax(logits / T)
    (temperature scaling, Guo et al. 2017), by L-BFGS on log T."""
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")
    logits = logits.float()

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return log_t.exp().item()


def lowest_ece_any_temperature(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15,
                               also: tuple[float, ...] = ()) -> tuple[float, float]:
    """(ECE, T): the lowest expected calibration error that any one temperature reaches on
    these logits, over a log-spaced grid of T from 0.1 to 10 and the temperatures in `also`
    (the fitted one, so the result is never above it). When it is well above zero, the
    model's miscalibration is in the shape of its confidence, not its scale, and no
    temperature can remove it."""
    logits = logits.float()
    return min((expected_calibration_error((logits / t).softmax(-1), labels, bins), t)
               for t in [*torch.logspace(-1, 1, 401, dtype=torch.float64).tolist(), *also])


def plot_reliability(curves: dict, labels: torch.Tensor, bins: int = 15):
    """Reliability diagram: accuracy against confidence in equal-width bins, for each set of
    probabilities in `curves` ({name: (N, C)}), with the diagonal of perfect calibration."""
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    edges = torch.linspace(0, 1, bins + 1)
    for name, probabilities in curves.items():
        confidence, predictions = probabilities.max(dim=-1)
        correct = (predictions == labels).float()
        points = [(confidence[m].mean().item(), correct[m].mean().item())
                  for m in ((confidence > lo) & (confidence <= hi) for lo, hi in zip(edges[:-1], edges[1:])) if m.any()]
        ax.plot(*zip(*points), marker="o", label=f"{name} (ECE {expected_calibration_error(probabilities, labels, bins):.1%})")
    ax.set_xlabel("confidence (largest probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("Reliability")
    fig.tight_layout()
    return fig


def calibrate(args, model, labels, scaled_logits, split, out) -> dict:
    """ECE of the model as saved, from its (temperature-divided) logits without test-time
    augmentation; with --fit_temperature, fit a temperature on them (the validation split
    only), save it in the model folder's config.json, and report ECE before and after, with
    a reliability diagram."""
    saved = model.config.logit_temperature
    logits = scaled_logits * saved  # undo the saved temperature
    result = {"temperature": saved, "ece": expected_calibration_error((logits / saved).softmax(-1), labels)}
    curves = {f"as saved (T = {saved:.3f})": (logits / saved).softmax(-1)}
    if args.fit_temperature:
        temperature = fit_temperature(logits, labels)
        result.update(
            temperature=temperature, ece_before=expected_calibration_error(logits.softmax(-1), labels),
            ece=expected_calibration_error((logits / temperature).softmax(-1), labels), fitted_on=split,
        )
        floor, floor_temperature = lowest_ece_any_temperature(logits, labels, also=(temperature,))
        result["lowest_ece_any_temperature"] = {"ece": floor, "temperature": floor_temperature}
        curves = {"T = 1": logits.softmax(-1), f"fitted T = {temperature:.3f}": (logits / temperature).softmax(-1)}
        model.config.logit_temperature = temperature
        model.config.save_pretrained(args.model)
        print(f"temperature {temperature:.4f} saved in {Path(args.model) / 'config.json'}: expected calibration error "
              f"{result['ece_before']:.2%} -> {result['ece']:.2%} (the lowest any one temperature reaches: {floor:.2%}, "
              f"at T = {floor_temperature:.3f})", file=sys.stderr)
    plot_reliability(curves, labels).savefig(out / "reliability.png", dpi=110)
    return result


def faithfulness_of_maps(args, model, processor, dataset, image_column, label_column, out) -> dict:
    """Deletion and insertion AUCs of the maps on a seeded sample of the split, the
    randomised-transformer sanity check, and the curves' figure (faithfulness.py)."""
    import faithfulness
    from cifar10_data import decode_image
    from run_folder import sample_indices

    indices = sample_indices(len(dataset), args.faithfulness_images, seed=0)
    rows = dataset.select(indices)
    pixel_values = processor(images=[decode_image(v) for v in rows[image_column]], return_tensors="pt")["pixel_values"]
    labels = torch.tensor(rows[label_column])
    results = faithfulness.measure(model, pixel_values.to(model.device), labels.to(model.device), batch_size=args.batch_size)
    results["sanity_check_rank_correlation"] = faithfulness.sanity_check(model, pixel_values[:256].to(model.device), args.batch_size)
    faithfulness.plot_curves(results).savefig(out / "faithfulness.png", dpi=110)
    return results


def health_of_transformer(args, model, processor, dataset, image_column, label_column, out) -> dict:
    """Accuracy with each block skipped, each block's CLS attention entropy relative to
    uniform, and the rollout maps' cosine to the average map, on a seeded sample of the
    split (transformer_health.py), with its figure."""
    import transformer_health
    from run_folder import sample_indices

    rows = dataset.select(sorted(sample_indices(len(dataset), args.health_images, seed=0)))
    batches = pixel_batches(model, processor, rows, image_column, label_column, args.batch_size, desc="health")
    health, cosines = transformer_health.measure(model, batches)
    transformer_health.plot_health(health, cosines).savefig(out / "transformer_health.png", dpi=110)
    return health


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
    parser.add_argument("--model", default="checkpoints/hybrid-vit-cifar10", help="a saved model folder or a Hub id (default: the release)")
    parser.add_argument("--dataset_name", default="uoft-cs/cifar10", help="a Hub id or a local folder")
    parser.add_argument("--split", default=None, help="default: test when the dataset has one, else validation")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--output_dir", default="outputs/eval")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--tta", action="store_true", help="average the logits of each image and its horizontal flip")
    parser.add_argument("--tta_shift", type=int, default=0,
                        help="with --tta, also average both views shifted by this many pixels (1 or 2; 0 = off)")
    parser.add_argument("--faithfulness_images", type=int, default=1000,
                        help="images of the split (a seeded sample) on which the maps' deletion and insertion curves are measured; 0 skips")
    parser.add_argument("--health_images", type=int, default=5000,
                        help="images of the split (a seeded sample) on which the transformer's health is measured: accuracy "
                             "with each block skipped, CLS attention entropy, rollout similarity across images; 0 skips")
    parser.add_argument("--fit_temperature", action="store_true",
                        help="fit a temperature on the validation split and save it in the model folder's config.json")
    args = parser.parse_args(argv)
    if args.faithfulness_images < 0:
        parser.error("--faithfulness_images must be at least 0")
    if args.health_images < 0:
        parser.error("--health_images must be at least 0")
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
            raise UserError(f"--tta_shift must be below the model's image size ({model.config.image_size}), got {args.tta_shift}")
        dataset, image_column, label_column, split = load_split(args.model, args.dataset_name, args.split, args.max_eval_samples)
        label_names = dataset.features[label_column].names
        if len(label_names) != model.config.num_labels:
            raise UserError(f"the dataset has {len(label_names)} classes but the model predicts {model.config.num_labels}")
        if args.fit_temperature and split != "validation":
            raise UserError(f"--fit_temperature fits on the validation split, never on {split!r}: add --split validation")
        if args.fit_temperature and not Path(args.model).is_dir():
            raise UserError(f"--fit_temperature saves into a model folder; {args.model} is not one")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model_names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if model_names != label_names:
        print(f"note: the model's labels {model_names} differ from the dataset's; using the dataset's", file=sys.stderr)

    # One pass gives the logits calibration needs; a second only when TTA changes them.
    labels, logits = evaluate_model(model, processor, dataset, image_column, label_column, args.batch_size, logits=True)
    probabilities = logits.softmax(dim=-1)
    if args.tta:
        _, probabilities = evaluate_model(model, processor, dataset, image_column, label_column, args.batch_size, True,
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
    results["calibration"] = calibrate(args, model, labels, logits, split, out)
    blocks = model.config.num_hidden_layers
    if not blocks and (args.health_images or args.faithfulness_images):
        print("note: the model has no transformer blocks (the backbone alone): no attention to check", file=sys.stderr)
    if blocks and args.health_images:
        results["transformer_health"] = health_of_transformer(args, model, processor, dataset, image_column, label_column, out)
    if blocks and args.faithfulness_images:
        results["faithfulness"] = faithfulness_of_maps(args, model, processor, dataset, image_column, label_column, out)
    (out / "eval_results.json").write_text(json.dumps(results, indent=2))
    plot_confusion_matrix(results["confusion_matrix"], label_names).savefig(out / "confusion_matrix.png", dpi=120)
    mistakes = [entry["index"] for entry in results["most_confident_mistakes"]]
    plot_mistakes(dataset, image_column, label_column, mistakes, probabilities, label_names).savefig(out / "mistakes.png", dpi=110)

    print(f"{split}: accuracy {results['accuracy']:.4f} on {results['num_samples']} images" + tta_description(args))
    width = max(len(name) for name in label_names)
    for name, accuracy in results["per_class_accuracy"].items():
        print(f"  {name:<{width}}  {accuracy:.4f}")
    print(f"expected calibration error {results['calibration']['ece']:.2%} (temperature {results['calibration']['temperature']:.3f})")
    if "transformer_health" in results:
        h = results["transformer_health"]
        for b in h["blocks"]:
            print(f"  block {b['block']}: accuracy {b['accuracy_skipped']:.4f} when skipped ({100 * b['skip_cost']:+.2f} points lost), "
                  f"CLS attention entropy {b['cls_entropy_of_uniform']:.2f} of uniform")
        print(f"  rollout map's cosine to the average map: {h['rollout_cosine_to_average']:.2f} (1 = the same map for every image); "
              f"last block's CLS attention: {h['last_layer_cls_cosine_to_average']:.2f}")
    if "faithfulness" in results:
        f = results["faithfulness"]
        for name in ("rollout", "relevance", "cls", "random", "average_map"):
            print(f"  {name:<12} deletion AUC {f[name]['deletion_auc']:.3f}  insertion AUC {f[name]['insertion_auc']:.3f}")
        print(f"most faithful map: {f['most_faithful']}")
    figures = ["confusion_matrix.png", "mistakes.png", "reliability.png"]
    figures += ["transformer_health.png"] * ("transformer_health" in results) + ["faithfulness.png"] * ("faithfulness" in results)
    print(f"wrote {out / 'eval_results.json'}, {', '.join(figures)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
