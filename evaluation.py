"""Scoring a model on a split: the project's one evaluation loop (`predict`, used by training and
by run_eval.py), accuracy and its summaries, calibration (expected calibration error and
temperature scaling, Guo et al. 2017), and their figures."""

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from cifar10_data import dataset_images, tta_logits


@torch.no_grad()
def predict(model, dataloader, flip: bool = False, accelerator=None, desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits (N, C) and labels (N,) of every batch of `dataloader`, on the CPU, in
    eval mode (the model's mode is restored after). With `flip`, each image's logits are
    averaged with its mirror image's. With an `accelerator`, under its autocast, gathered from
    every process, each image exactly once (gather_for_metrics drops the duplicates a
    distributed sampler pads with)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    logits, labels = [], []
    with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
        for batch in tqdm(dataloader, desc=desc, disable=desc is None, leave=False):
            scores, targets = tta_logits(model, batch["pixel_values"], flip), batch["labels"]
            if accelerator is not None:
                scores, targets = accelerator.gather_for_metrics((scores, targets))
            logits.append(scores.cpu())
            labels.append(targets.cpu())
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()


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
    """The temperature T > 0 that minimises the cross-entropy of softmax(logits / T), by
    L-BFGS on log T."""
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
    """Accuracy, loss (the mean cross-entropy of `probabilities`), per-class accuracy, the
    confusion matrix and the most confident mistakes, as plain numbers and lists."""
    labels = labels.long()
    confidence, predictions = probabilities.max(dim=-1)
    matrix = confusion_matrix(labels, predictions, len(label_names))
    per_class = matrix.diag().double() / matrix.sum(dim=1).clamp_min(1)
    return {
        "num_samples": len(labels),
        "accuracy": (predictions == labels).float().mean().item(),
        "loss": F.nll_loss(probabilities.clamp_min(1e-12).log(), labels).item(),
        "per_class_accuracy": {name: per_class[i].item() for i, name in enumerate(label_names)},
        "label_names": list(label_names),
        "confusion_matrix": matrix.tolist(),
        "most_confident_mistakes": [
            {"index": i, "true": label_names[labels[i]], "predicted": label_names[predictions[i]], "confidence": confidence[i].item()}
            for i in most_confident(labels, probabilities, correct=False, k=num_mistakes)
        ],
    }


# ---------------------------------------------------------------------------------- figures


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
    ax.set(xlabel="confidence (largest probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title="Reliability")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def plot_confusion_matrix(matrix, label_names: list[str]):
    """Confusion matrix with each row normalised to the true class's count, so the diagonal is
    the per-class accuracy; the cells give the counts."""
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
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8, color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(C), label_names, rotation=45, ha="right")
    ax.set_yticks(range(C), label_names)
    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title(f"Confusion matrix ({counts.sum()} images, accuracy {np.trace(counts) / max(counts.sum(), 1):.1%})")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    fig.tight_layout()
    return fig


def plot_mistakes(dataset, image_column: str, label_column: str, indices, probabilities: torch.Tensor,
                  label_names: list[str], columns: int = 8):
    """A grid of the images at `indices` (the most confident mistakes), each titled with its
    true label, the predicted one and the confidence."""
    images, true = dataset_images(dataset, image_column, label_column, indices)
    columns = max(1, min(columns, len(images)))
    rows = max(1, math.ceil(len(images) / columns))
    fig = Figure(figsize=(1.9 * columns, 2.3 * rows + 0.4))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, name, index in zip(axes.flat, images, true, indices):
        confidence, predicted = probabilities[index].max(dim=-1)
        ax.imshow(image.resize((128, 128)))
        ax.set_title(f"true: {name}\npred: {label_names[predicted]} {confidence:.0%}", fontsize=9)
    if not images:
        axes[0, 0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    fig.suptitle("Most confident mistakes", fontsize=11)
    fig.tight_layout()
    return fig
