"""How faithful an attention map is to the decision: deletion and insertion curves over the
image regions of the tokens, in the map's order (Petsiuk et al. 2018, "RISE"; as used for
ViTs by Chefer et al. 2021), against two baselines that know nothing about the image: a
random order, and one map shared by every image (the split's average).

The class followed is the one each map explains: the model's prediction on the whole image
(the relevance map is computed for it; rollout and CLS attention do not depend on a class).

- deletion: blank the regions of the most relevant tokens first, and follow the predicted
  class's probability as more are blanked; a faithful map makes it fall fast (a low area
  under the curve);
- insertion: start from a blank image and reveal the most relevant tokens first; a faithful
  map makes the probability rise fast (a high area).

Blanked pixels take the normalised mean colour (0 after the processor's normalisation,
the dataset's mean colour before it), so a blank region carries no information. Areas are
means over images, with bootstrap 95% intervals over images. run_eval.py reports them; the
maps come from attention_maps.py.
"""

import torch
from matplotlib.figure import Figure

import attention_maps

MAP_METHODS = ("rollout", "relevance", "cls")  # what attention_maps.py draws; the baselines follow
BLANK = 0.0  # the normalised mean colour: (mean - mean) / std


def method_maps(model, pixel_values: torch.Tensor, method: str) -> torch.Tensor:
    """(B, g, g) maps of `method` for a batch: the attention rollout, the gradient-weighted
    relevance for the predicted class, or the last layer's CLS attention (mean of heads)."""
    if method == "relevance":
        return attention_maps.relevance_map(model, pixel_values)[0]
    with torch.no_grad():
        attentions = model(pixel_values=pixel_values, output_attentions=True).attentions
    if method == "rollout":
        return attention_maps.rollout_map(attentions)
    if method == "cls":
        return attention_maps.cls_attention(attentions).mean(dim=1)
    raise ValueError(f"method must be one of {MAP_METHODS}, got {method!r}")


def token_mask(order: torch.Tensor, k: int, grid: int, patch_size: int) -> torch.Tensor:
    """(B, 1, H, W) True over the image regions of the first `k` tokens of each image's
    `order` ((B, N) token indices, row-major on the g x g grid)."""
    B = order.shape[0]
    chosen = torch.zeros(B, grid * grid, dtype=torch.bool, device=order.device)
    chosen.scatter_(1, order[:, :k], True)
    cells = chosen.view(B, 1, grid, grid).float()
    return torch.nn.functional.interpolate(cells, scale_factor=patch_size, mode="nearest").bool()


@torch.no_grad()
def perturbation_curves(model, pixel_values, classes, order, steps, patch_size) -> tuple[torch.Tensor, torch.Tensor]:
    """The probability of `classes` (B,) after blanking (deletion) and after revealing
    (insertion) the first k tokens of `order`, for each k in `steps`: two (B, len(steps)) tensors."""
    grid = pixel_values.shape[-1] // patch_size
    deletion, insertion = [], []
    for k in steps:
        mask = token_mask(order, k, grid, patch_size)
        for images, curve in ((pixel_values.masked_fill(mask, BLANK), deletion),
                              (torch.where(mask, pixel_values, torch.full_like(pixel_values, BLANK)), insertion)):
            probabilities = model(pixel_values=images).logits.float().softmax(dim=-1)
            curve.append(probabilities.gather(1, classes.view(-1, 1)).squeeze(1))
    return torch.stack(deletion, dim=1), torch.stack(insertion, dim=1)


def area(curves: torch.Tensor, steps, num_tokens: int) -> torch.Tensor:
    """Per-image area under each curve against the fraction of tokens, by the trapezoid rule: (B,)."""
    x = torch.tensor([k / num_tokens for k in steps], dtype=curves.dtype)
    return torch.trapezoid(curves.cpu(), x, dim=1)


def bootstrap_interval(values: torch.Tensor, samples: int = 1000, seed: int = 0) -> list[float]:
    """95% percentile interval of the mean of `values` over images resampled with replacement."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(values), (samples, len(values)), generator=generator)
    means = values[picks].mean(dim=1)
    return [means.quantile(0.025).item(), means.quantile(0.975).item()]


def summary(deletion_areas: torch.Tensor, insertion_areas: torch.Tensor) -> dict:
    return {
        "deletion_auc": deletion_areas.mean().item(),
        "deletion_auc_ci95": bootstrap_interval(deletion_areas),
        "insertion_auc": insertion_areas.mean().item(),
        "insertion_auc_ci95": bootstrap_interval(insertion_areas),
    }


def random_orders(batch: int, num_tokens: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(num_tokens, generator=generator) for _ in range(batch)])


def order_of(maps: torch.Tensor) -> torch.Tensor:
    """Tokens from most to least relevant: (B, g, g) maps -> (B, N) indices (ties by index)."""
    return maps.flatten(1).argsort(dim=1, descending=True, stable=True)


def measure(model, pixel_values: torch.Tensor, batch_size: int = 100, seed: int = 0, progress: bool = True) -> dict:
    """Deletion and insertion AUCs of every map method and both baselines on these images
    (normalised, (N, C, H, W)), each following the probability of the class the model
    predicts for the whole image; their mean curves; and which method is the most faithful
    (the largest insertion minus deletion area). The average-map baseline averages that
    method's maps over the images."""
    from tqdm.auto import tqdm

    config = model.config
    num_tokens, patch_size = config.num_patches, config.patch_size
    stride = max(1, num_tokens // 8)
    steps = sorted(set(range(0, num_tokens, stride)) | {num_tokens})
    with torch.no_grad():
        labels = torch.cat([model(pixel_values=pixel_values[i : i + batch_size]).logits.argmax(-1)
                            for i in range(0, len(pixel_values), batch_size)])
    batches = [(pixel_values[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, len(labels), batch_size)]
    maps = {method: torch.cat([method_maps(model, x, method).cpu() for x, _ in batches]) for method in MAP_METHODS}
    orders = {method: order_of(value) for method, value in maps.items()}
    orders["random"] = random_orders(len(labels), num_tokens, seed)
    curves = {}
    bar = tqdm(total=len(batches) * (len(orders) + 1), desc="faithfulness", disable=not progress)

    def run(name, order):
        parts = []
        for index, (x, y) in enumerate(batches):
            start = index * batch_size
            parts.append(perturbation_curves(model, x, y, order[start : start + len(y)].to(x.device), steps, patch_size))
            bar.update(1)
        curves[name] = tuple(torch.cat([p[i].cpu() for p in parts]) for i in (0, 1))

    for name, order in orders.items():
        run(name, order)
    areas = {name: (area(d, steps, num_tokens), area(i, steps, num_tokens)) for name, (d, i) in curves.items()}
    best = max(MAP_METHODS, key=lambda m: (areas[m][1] - areas[m][0]).mean().item())
    average = maps[best].mean(dim=0, keepdim=True)
    run("average_map", order_of(average).expand(len(labels), -1))
    bar.close()
    areas["average_map"] = tuple(area(c, steps, num_tokens) for c in curves["average_map"])
    results = {name: summary(*areas[name]) for name in (*MAP_METHODS, "random", "average_map")}
    results["average_map"]["of"] = best
    results.update(
        followed_class="predicted",
        most_faithful=best,
        num_images=len(labels),
        fractions=[k / num_tokens for k in steps],
        mean_curves={name: {"deletion": d.mean(0).tolist(), "insertion": i.mean(0).tolist()} for name, (d, i) in curves.items()},
    )
    return results


def randomised_transformer(model):
    """A copy of `model` whose transformer blocks are re-drawn from their initialisation,
    backbone and head kept (the cascading randomisation test of Adebayo et al. 2018 applied
    to the part the maps are read from)."""
    import copy

    randomised = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in randomised.hybrid_vit.layers.modules():
            if isinstance(module, torch.nn.Linear):  # as _init_weights draws them
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator).clamp(-2, 2) * model.config.initializer_range)
                if module.bias is not None:
                    module.bias.zero_()
    return randomised.eval()


def sanity_check(model, pixel_values: torch.Tensor, batch_size: int = 100) -> dict:
    """Mean Spearman rank correlation, over images, of each method's map from the trained
    model and from one whose transformer is re-drawn at random. A map that does not change
    (correlation near 1) does not depend on what the transformer learned."""
    randomised = randomised_transformer(model)
    result = {}
    for method in MAP_METHODS:
        trained = torch.cat([method_maps(model, pixel_values[i : i + batch_size], method).cpu() for i in range(0, len(pixel_values), batch_size)])
        redrawn = torch.cat([method_maps(randomised, pixel_values[i : i + batch_size], method).cpu() for i in range(0, len(pixel_values), batch_size)])
        result[method] = rank_correlation(trained.flatten(1), redrawn.flatten(1)).mean().item()
    return result


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of each row of a with the same row of b: (B,)."""
    def ranks(x):
        return x.argsort(dim=1).argsort(dim=1).float()

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-12)


def plot_curves(results: dict):
    """Mean deletion and insertion curves of every method and baseline, with their areas."""
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    x = results["fractions"]
    styles = {"random": ":", "average_map": "--"}
    for name, curves in results["mean_curves"].items():
        for ax, kind in zip(axes, ("deletion", "insertion")):
            label = f"{name.replace('_', ' ')} ({results[name][f'{kind}_auc']:.3f})"
            ax.plot(x, curves[kind], styles.get(name, "-"), marker="o", markersize=3, label=label,
                    linewidth=2.5 if name == results["most_faithful"] else 1.5)
    for ax, kind, better in zip(axes, ("deletion", "insertion"), ("lower", "higher")):
        ax.set_xlabel(f"fraction of tokens {'blanked' if kind == 'deletion' else 'revealed'}, most relevant first")
        ax.set_ylabel("probability of the predicted class")
        ax.set_title(f"{kind.capitalize()} ({better} area is more faithful)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8, title="map (area)")
    fig.suptitle(f"Faithfulness of the maps on {results['num_images']} images; most faithful: {results['most_faithful']}", fontsize=11)
    fig.tight_layout()
    return fig
