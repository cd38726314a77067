"""What the hybrid ViT attends to, from the attention probabilities it returns with
`output_attentions=True` (one tensor per layer, (B, heads, T, T), token 0 the CLS token):
attention rollout, gradient-weighted relevance, the CLS token's attention per head, attention
distance and entropy, and the figures that draw them. Nothing hooks into the model.

Figures are `matplotlib.figure.Figure` objects, not pyplot ones: PNGs are rendered by Agg
whatever the environment, nothing is kept in pyplot's global state (a web app can make many),
and a notebook shows a returned figure inline.
"""

import math

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image

from errors import UserError

METHODS = ("rollout", "relevance", "cls", "heads")
DISPLAY_SIZE = 128  # pixels: 32x32 images are upsampled (bicubic) so a figure is legible
COLORMAP = "inferno"
CORRECT_COLOUR, WRONG_COLOUR = "#1a7f37", "#cf222e"


# ---------------------------------------------------------------------- attention maths


def grid_side(num_patches: int) -> int:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"expected a square grid of patch tokens, got {num_patches} tokens after CLS")
    return side


def attention_rollout(attentions) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020, eq. 1): average the heads, add the identity
    for the residual connection, renormalise the rows, and multiply through the layers,
    rollout_l = A_l @ rollout_(l-1). Returns (B, T, T); row i says how much of input token j
    flows into token i at the last layer, and each row sums to 1."""
    rollout = None
    for attention in attentions:
        A = attention.float().mean(dim=1)  # (B, T, T)
        A = A + torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        A = A / A.sum(dim=-1, keepdim=True)
        rollout = A if rollout is None else A @ rollout
    return rollout


def rollout_map(attentions) -> torch.Tensor:
    """The CLS row of the rollout over the patch tokens as a (B, g, g) map, max 1 per image."""
    cls_row = attention_rollout(attentions)[:, 0, 1:]  # (B, N)
    B, N = cls_row.shape
    g = grid_side(N)
    cls_row = cls_row / cls_row.amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return cls_row.reshape(B, g, g)


def gradient_relevance(attentions, gradients) -> torch.Tensor:
    """Gradient-weighted attention relevance (Chefer, Gur & Wolf, ICCV 2021, eq. 5-6): start
    from the identity and, layer by layer, R <- R + mean over heads of (grad A * A)^+ @ R,
    where grad A is the gradient of the explained class's logit with respect to A. Unlike
    rollout, it weighs each attention by how much it moved the decision, so a layer that
    attends evenly but does not matter adds nothing. Returns (B, T, T)."""
    relevance = None
    for attention, gradient in zip(attentions, gradients):
        A = (gradient.float() * attention.float()).clamp_min(0).mean(dim=1)  # (B, T, T)
        if relevance is None:
            relevance = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A).clone()
        relevance = relevance + A @ relevance
    return relevance


def relevance_map(model, pixel_values: torch.Tensor, target=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient-weighted relevance of the patch tokens for the CLS token, as a (B, g, g)
    map (max 1 per image), for class `target` ((B,) tensor; default: the predicted class),
    and the logits. The gradients come from `outputs.attentions` through the model's one
    explicit attention path (torch.autograd.grad), not from hooks."""
    with torch.enable_grad():
        outputs = model(pixel_values=pixel_values, output_attentions=True)
        logits = outputs.logits.float()
        target = logits.argmax(dim=-1) if target is None else torch.as_tensor(target, device=logits.device)
        score = logits.gather(1, target.view(-1, 1)).sum()  # images are independent: one backward for the batch
        gradients = torch.autograd.grad(score, outputs.attentions)
    cls_row = gradient_relevance([a.detach() for a in outputs.attentions], gradients)[:, 0, 1:]  # (B, N)
    B, N = cls_row.shape
    g = grid_side(N)
    return (cls_row / cls_row.amax(dim=-1, keepdim=True).clamp_min(1e-12)).reshape(B, g, g), logits.detach()


def cls_attention(attentions, layer: int = -1) -> torch.Tensor:
    """What the CLS query attends to in one layer, per head: (B, heads, g, g). These are the
    raw probabilities; they sum to 1 minus the CLS token's attention to itself."""
    cls_row = attentions[layer][:, :, 0, 1:].float()  # (B, heads, N)
    B, H, N = cls_row.shape
    g = grid_side(N)
    return cls_row.reshape(B, H, g, g)


def patch_distances(num_patches: int, patch_size: int) -> torch.Tensor:
    """(N, N) Euclidean distances in pixels between patch centres on the g x g token grid."""
    g = grid_side(num_patches)
    rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=-1).float() * patch_size  # (N, 2)
    return torch.cdist(centres, centres)


def mean_attention_distance(attention: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Mean attention distance of each head of one layer (Dosovitskiy et al. 2021, fig. 7):
    the attention-weighted pixel distance between a query patch and the patches it attends
    to, averaged over queries and images, the ViT analogue of a CNN's receptive field size.
    Only patch tokens count: the CLS query and key are dropped and each row renormalised
    over the patch keys. A class-attention block's patch rows are the identity (it does not
    mix the patch tokens), so it measures 0. attention: (B, heads, T, T); returns (heads,) in pixels."""
    patches = attention[:, :, 1:, 1:].float()  # (B, heads, N, N)
    patches = patches / patches.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    distance = patch_distances(patches.shape[-1], patch_size).to(patches.device)
    per_query = (patches * distance).sum(dim=-1)  # (B, heads, N)
    return per_query.mean(dim=(0, 2))


def attention_distances(attentions, patch_size: int) -> torch.Tensor:
    """mean_attention_distance of every layer: (layers, heads), in pixels."""
    return torch.stack([mean_attention_distance(attention, patch_size) for attention in attentions])


def cls_entropy_per_image(attention: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the CLS token's attention over the patches in one layer, per image
    and head: (B, heads). The row is renormalised over the patch keys, so log(num_patches)
    means spread evenly over the image and 0 all on one patch."""
    p = attention[:, :, 0, 1:].float()  # (B, heads, N)
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return -(p * p.clamp_min(1e-12).log()).sum(dim=-1)


def cls_attention_entropy(attentions) -> torch.Tensor:
    """`cls_entropy_per_image` of every layer, averaged over images: (layers, heads)."""
    return torch.stack([cls_entropy_per_image(attention).mean(dim=0) for attention in attentions])


def is_uniform(heatmap: torch.Tensor, rtol: float = 1e-4) -> bool:
    """Whether a map is flat: its values differ by less than `rtol` of the largest. A layer
    whose queries and keys have decayed to zero attends evenly, and its maps are flat."""
    values = heatmap.detach().float()
    return bool(values.max() - values.min() <= rtol * values.abs().max().clamp_min(1e-12))


def draw_map(ax, heatmap: torch.Tensor, image: Image.Image | None = None) -> None:
    """One panel: the map over `image`, or, without one, the raw token grid (one square per
    token, stretched to its own range). A flat map is drawn in the colormap's middle and
    labelled "uniform"."""
    uniform = is_uniform(heatmap)
    if image is not None:
        ax.imshow(overlay(image, heatmap))
    else:
        grid = heatmap.detach().float().cpu().numpy()
        level = float(grid.mean())
        limits = {"vmin": 0.0, "vmax": 2 * level} if uniform and level > 0 else {}
        ax.imshow(grid, cmap=COLORMAP, interpolation="nearest", **limits)
    if uniform:
        ax.text(0.5, 0.5, "uniform", transform=ax.transAxes, ha="center", va="center", color="white", fontsize=9)


def overlay(image: Image.Image, heatmap: torch.Tensor, cmap: str = COLORMAP, alpha: float = 0.55) -> np.ndarray:
    """Blend a (g, g) heatmap, upsampled bilinearly to the image size and stretched to its
    own min..max, with the image through a matplotlib colormap: (H, W, 3) floats in [0, 1]."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    H, W = pixels.shape[:2]
    heat = F.interpolate(heatmap.detach().float().cpu()[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    # An even map (attention spread equally) gets the colormap's middle, not its bottom:
    # stretched to its own range it would come out black, like a map of no attention.
    heat = torch.full_like(heat, 0.5) if is_uniform(heatmap) else (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
    colours = matplotlib.colormaps[cmap](heat.numpy())[..., :3]
    return np.clip((1.0 - alpha) * pixels + alpha * colours, 0.0, 1.0)


# ------------------------------------------------------------------------- images


def model_outputs(model, processor, images):
    """Run the model on PIL images (any mode: converted to RGB) with attentions returned."""
    inputs = processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
    with torch.no_grad():
        return model(pixel_values=inputs["pixel_values"].to(model.device), output_attentions=True)


def display_image(image: Image.Image, size: int = DISPLAY_SIZE) -> Image.Image:
    """The image as the model sees it (squashed to a square, like its processor does),
    upsampled so it is legible next to the maps."""
    return image.convert("RGB").resize((size, size), Image.BICUBIC)


# ----------------------------------------------------------------------------- figures


def figure_panels(model, processor, images, method: str, layer: int | None):
    """The maps attention_figure draws, for a batch of images: [(title, (B, g, g) maps, drawn
    over the image)], the predicted class and its probability (B,) each, and the layer."""
    outputs = model_outputs(model, processor, images)
    confidence, predicted = outputs.logits.float().softmax(dim=-1).max(dim=-1)
    num_layers = len(outputs.attentions)
    layer = num_layers if layer is None else layer
    if not 1 <= layer <= num_layers:
        raise UserError(f"layer must be between 1 and {num_layers} (this model's transformer layers), got {layer}")
    heads = cls_attention(outputs.attentions, layer - 1)  # (B, nh, g, g)
    panels = [
        ("attention rollout", rollout_map(outputs.attentions), method == "rollout"),
        (f"layer {layer} CLS, mean of heads", heads.mean(dim=1), method == "cls"),
    ]
    if method == "cls":
        panels.reverse()
    if method == "relevance":
        pixel_values = processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]
        panels.insert(0, ("gradient relevance (predicted class)", relevance_map(model, pixel_values.to(model.device))[0], True))
    panels += [(f"layer {layer} head {h + 1}", heads[:, h], method == "heads") for h in range(heads.shape[1])]
    return panels, predicted, confidence, layer


def attention_figure(model, processor, images, true_labels=None, names=None, method: str = "rollout", layer: int | None = None):
    """One row per image: the image with its true label (or, when unknown, its name from
    `names`) and the prediction with its probability, then the attention rollout, the CLS
    attention of `layer` (counted from 1; default the last) averaged over heads, and that
    attention for each head. `method` chooses what is drawn over the image: `rollout`,
    `relevance` (gradient-weighted, Chefer et al. 2021, for the predicted class; an extra
    column), `cls`, or every head (`heads`); the other maps show the raw token grid."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not images:
        fig = Figure(figsize=(4, 1))
        fig.text(0.5, 0.5, "no images to show", ha="center", va="center")
        return fig
    panels, predicted, confidence, layer = figure_panels(model, processor, images, method, layer)
    fig = Figure(figsize=(2.0 * (1 + len(panels)), 2.4 * len(images) + 0.8))
    axes = fig.subplots(len(images), 1 + len(panels), squeeze=False)
    for b, image in enumerate(images):
        shown = display_image(image)
        label = model.config.id2label[int(predicted[b])]
        first = f"true: {true_labels[b]}" if true_labels is not None else (names[b] if names is not None else f"image {b + 1}")
        colour = "black" if true_labels is None else (CORRECT_COLOUR if true_labels[b] == label else WRONG_COLOUR)
        axes[b, 0].imshow(shown)
        axes[b, 0].set_title(f"{first}\npred: {label} {confidence[b]:.0%}", fontsize=10, color=colour)
        for ax, (title, maps, overlaid) in zip(axes[b, 1:], panels):
            draw_map(ax, maps[b], shown if overlaid else None)
            if b == 0:
                ax.set_title(title, fontsize=10)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    emphasis = {
        "rollout": "Attention rollout from the CLS token drawn over the image",
        "relevance": "Gradient-weighted attention relevance for the predicted class drawn over the image",
        "cls": f"Layer {layer}'s CLS attention (mean of heads) drawn over the image",
        "heads": f"Each head's CLS attention in layer {layer} drawn over the image",
    }[method]
    grid = panels[-1][1].shape[-1]
    fig.suptitle(f"{emphasis}; other maps show the {grid}x{grid} token grid.\n"
                 "Each map is scaled to its own range (bright = most attention).", fontsize=10)
    fig.tight_layout()
    return fig


def plot_attention_distance(distances: torch.Tensor, patch_size: int, num_patches: int):
    """Mean attention distance of every head against depth, as in ViT fig. 7, with the
    distance that attention spread evenly over the grid would give.
    distances: (layers, heads) in pixels, from `attention_distances`."""
    L, H = distances.shape
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for h in range(H):
        x = np.arange(1, L + 1) + 0.08 * (h - (H - 1) / 2)  # side by side, so equal distances stay visible
        ax.scatter(x, distances[:, h].cpu().numpy(), label=f"head {h + 1}", s=40, alpha=0.85)
    uniform = patch_distances(num_patches, patch_size).mean().item()
    ax.axhline(uniform, color="grey", linestyle=":", linewidth=1.2, label="uniform attention")
    ax.set_xlabel("layer (network depth)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_xticks(np.arange(1, L + 1))
    ax.set_ylim(0, max(uniform, distances.max().item()) * 1.15)
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    ax.set_title("How far each head looks")
    fig.tight_layout()
    return fig


def plot_cls_entropy(entropy: torch.Tensor, num_patches: int):
    """Entropy of the CLS token's attention per layer and head, with the uniform maximum.
    entropy: (layers, heads) in nats, from `cls_attention_entropy`."""
    L, H = entropy.shape
    layers = np.arange(1, L + 1)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for h in range(H):
        ax.plot(layers, entropy[:, h].cpu().numpy(), marker="o", label=f"head {h + 1}")
    ax.axhline(math.log(num_patches), color="grey", linestyle=":", label=f"uniform over {num_patches} patches")
    ax.set_xlabel("layer (network depth)")
    ax.set_ylabel("entropy of CLS attention (nats)")
    ax.set_xticks(layers)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title("Where the CLS token concentrates its attention")
    fig.tight_layout()
    return fig
