"""Is the transformer doing the work? Three checks a user makes before trusting a map,
measured on a dataset split by run_eval.py:

- each block's contribution: accuracy with the block skipped (its two residual branches
  removed, so its input goes straight to the next block), and how many predictions change;
  a block that costs nothing when skipped is dead weight;
- each block's CLS attention entropy relative to uniform (1.0: the CLS token spreads its
  attention evenly over the patches and looks at nothing in particular; 0: one patch);
- how much the rollout map depends on the image: its mean cosine similarity to the split's
  average map (1.0: every image gets the same map), and the same centred, the Pearson
  correlation of each map with the average map. The cosine compares non-negative maps, so
  even unrelated maps score about 0.75; the correlation is about 0 for a map unrelated to the
  average and 1 for the average itself (up to scale), and its square is the share of an
  image's map that the shared map explains.
"""

import contextlib
import math

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

import attention_maps

# What "alive" means in the project's documents: the thresholds drawn in the figure.
MIN_SKIP_COST = 0.01  # accuracy lost when a block is skipped
MAX_CLS_ENTROPY = 0.95  # of uniform
MAX_ROLLOUT_COSINE = 0.85  # to the average map
MAX_ROLLOUT_CORRELATION = 0.7  # to the average map: it explains less than half of a map (0.7^2 < 0.5)


class SkippedBlock(nn.Module):
    """Stands in for a transformer block: passes its input through, attends to nothing."""

    def forward(self, x, output_attentions: bool = False):
        return x, None


@contextlib.contextmanager
def block_skipped(model, index: int):
    """Within the block, `model` runs without its transformer block `index` (0-based)."""
    layers = getattr(model, model.base_model_prefix, model).layers
    block = layers[index]
    layers[index] = SkippedBlock()
    try:
        yield model
    finally:
        layers[index] = block


def cls_entropy_ratio(attentions) -> torch.Tensor:
    """Each block's CLS attention entropy over the patch tokens divided by the uniform
    entropy log(N), per image and averaged over heads: (B, layers)."""
    uniform = math.log(attentions[0].shape[-1] - 1)  # over the patch keys
    return torch.stack([attention_maps.cls_entropy_per_image(attention).mean(dim=1) / uniform for attention in attentions], dim=1)


def cosine_to_average(maps: torch.Tensor) -> torch.Tensor:
    """(B,) cosine similarity of each (flattened) map to the mean of all of them."""
    flat = maps.flatten(1).float()
    return torch.nn.functional.cosine_similarity(flat, flat.mean(dim=0, keepdim=True), dim=1)


def correlation_to_average(maps: torch.Tensor) -> torch.Tensor:
    """(B,) Pearson correlation of each (flattened) map with the mean of all of them: the
    cosine once each map and the average are centred on their own mean value."""
    flat = maps.flatten(1).float()
    average = flat.mean(dim=0, keepdim=True)
    return torch.nn.functional.cosine_similarity(flat - flat.mean(dim=1, keepdim=True), average - average.mean(), dim=1)


class HealthMeter:
    """Accumulates the three checks over batches of (pixel_values, labels)."""

    def __init__(self, model):
        self.model = model
        self.num_layers = model.config.num_hidden_layers
        self.correct = 0
        self.correct_skipped = [0] * self.num_layers
        self.changed = [0] * self.num_layers
        self.entropy, self.maps, self.cls_maps, self.count = [], [], [], 0

    @torch.no_grad()
    def update(self, pixel_values: torch.Tensor, labels: torch.Tensor):
        outputs = self.model(pixel_values=pixel_values, output_attentions=True)
        predictions = outputs.logits.argmax(dim=-1)
        self.correct += (predictions == labels).sum().item()
        self.count += len(labels)
        self.entropy.append(cls_entropy_ratio(outputs.attentions).cpu())
        self.maps.append(attention_maps.rollout_map(outputs.attentions).cpu())
        self.cls_maps.append(attention_maps.cls_attention(outputs.attentions).mean(dim=1).cpu())
        for index in range(self.num_layers):
            with block_skipped(self.model, index):
                skipped = self.model(pixel_values=pixel_values).logits.argmax(dim=-1)
            self.correct_skipped[index] += (skipped == labels).sum().item()
            self.changed[index] += (skipped != predictions).sum().item()

    def result(self) -> tuple[dict, dict]:
        """The checks, and each image's rollout cosine and correlation to the average map
        (for plot_health)."""
        accuracy = self.correct / max(self.count, 1)
        entropy = torch.cat(self.entropy).mean(dim=0)
        maps = torch.cat(self.maps)
        spread = {"cosine": cosine_to_average(maps), "correlation": correlation_to_average(maps)}
        blocks = [{
            "block": index + 1,
            "accuracy_skipped": self.correct_skipped[index] / max(self.count, 1),
            "skip_cost": accuracy - self.correct_skipped[index] / max(self.count, 1),
            "predictions_changed": self.changed[index] / max(self.count, 1),
            "cls_entropy_of_uniform": entropy[index].item(),
        } for index in range(self.num_layers)]
        quartiles = torch.tensor([0.25, 0.5, 0.75])
        return {
            "num_samples": self.count,
            "accuracy": accuracy,
            "blocks": blocks,
            "rollout_cosine_to_average": spread["cosine"].mean().item(),
            "rollout_cosine_to_average_quartiles": spread["cosine"].quantile(quartiles).tolist(),
            "rollout_correlation_to_average": spread["correlation"].mean().item(),
            "rollout_correlation_to_average_quartiles": spread["correlation"].quantile(quartiles).tolist(),
            "last_layer_cls_cosine_to_average": cosine_to_average(torch.cat(self.cls_maps)).mean().item(),
            "every_block_alive": all(b["skip_cost"] >= MIN_SKIP_COST and b["cls_entropy_of_uniform"] <= MAX_CLS_ENTROPY for b in blocks),
            "maps_differ": spread["cosine"].mean().item() <= MAX_ROLLOUT_COSINE
            and spread["correlation"].mean().item() <= MAX_ROLLOUT_CORRELATION,
        }, spread


def measure(model, batches) -> tuple[dict, dict]:
    """The checks over an iterable of (pixel_values, labels) batches (see HealthMeter), and
    each image's rollout cosine and correlation to the average map (for plot_health)."""
    meter = HealthMeter(model)
    for pixel_values, labels in batches:
        meter.update(pixel_values, labels)
    return meter.result()


def plot_health(health: dict, spread: dict | None = None):
    """Three panels: accuracy lost when each block is skipped, each block's CLS entropy
    relative to uniform, and the spread of the rollout maps' cosine and correlation to the
    average map, each with the line a healthy transformer stays on the right side of."""
    blocks = health["blocks"]
    names = [str(b["block"]) for b in blocks]
    fig = Figure(figsize=(11, 3.3))
    cost_ax, entropy_ax, cosine_ax = fig.subplots(1, 3)
    costs = [100 * b["skip_cost"] for b in blocks]
    cost_ax.bar(names, costs, color=["#4c72b0" if c >= 100 * MIN_SKIP_COST else "#cf222e" for c in costs])
    cost_ax.axhline(100 * MIN_SKIP_COST, color="grey", linestyle=":")
    cost_ax.set_ylim(min(0, *costs) * 1.2, max(2 * 100 * MIN_SKIP_COST, *costs) * 1.18)
    for x, c in enumerate(costs):
        cost_ax.text(x, c, f"{c:.1f}", ha="center", va="bottom", fontsize=8)
    cost_ax.set_xlabel("block skipped")
    cost_ax.set_ylabel("accuracy lost (points)")
    cost_ax.set_title(f"Skipping a block (full: {health['accuracy']:.1%})", fontsize=10)
    entropies = [b["cls_entropy_of_uniform"] for b in blocks]
    entropy_ax.bar(names, entropies, color=["#4c72b0" if e <= MAX_CLS_ENTROPY else "#cf222e" for e in entropies])
    entropy_ax.axhline(MAX_CLS_ENTROPY, color="grey", linestyle=":")
    entropy_ax.set_ylim(0, 1.05)
    entropy_ax.set_xlabel("block")
    entropy_ax.set_ylabel("CLS attention entropy / uniform")
    entropy_ax.set_title("How focused the CLS token is", fontsize=10)
    if spread is not None:
        bins = np.linspace(-1, 1, 81)
        cosine_ax.hist(spread["cosine"].numpy(), bins=bins, color="#bbbbbb", label=f"cosine (mean {health['rollout_cosine_to_average']:.2f})")
        cosine_ax.hist(spread["correlation"].numpy(), bins=bins, color="#4c72b0", alpha=0.8,
                       label=f"correlation (mean {health['rollout_correlation_to_average']:.2f})")
    cosine_ax.axvline(MAX_ROLLOUT_COSINE, color="grey", linestyle=":")
    cosine_ax.axvline(MAX_ROLLOUT_CORRELATION, color="#4c72b0", linestyle=":")
    cosine_ax.set_xlabel("rollout map against the average map")
    cosine_ax.set_ylabel("images")
    cosine_ax.set_title("Does the map depend on the image?", fontsize=10)
    cosine_ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig
