"""Draw where a trained hybrid ViT looks: one row per image with the image and its prediction,
the attention rollout from the CLS token over the pixels, and one layer's CLS attention per head
(every map from `outputs.attentions`; attention_maps.py has the maths).

    python visualize.py                    # the release on the bundled examples -> attention.png
    python visualize.py --model outputs/hybrid-vit-cifar10 --dataset_name ../shared/data/cifar10 --num_images 8
    python visualize.py --images cat.png dog.jpg --method relevance
"""

import argparse
import sys
from pathlib import Path

from attention_maps import METHODS, attention_figure
from cifar10_data import dataset_images, load_split, sample_indices
from errors import UserError, command
from hub_folder import load_model
from training_settings import split_of

PROJECT = Path(__file__).resolve().parent
RELEASE = PROJECT / "checkpoints" / "hybrid-vit-cifar10"
EXAMPLES = PROJECT / "assets" / "examples"


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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(RELEASE), help="a saved model folder or a Hub id (default: the release)")
    parser.add_argument("--images", nargs="+", help="image files (default: the bundled examples, assets/examples/*.png)")
    parser.add_argument("--dataset_name", default=None,
                        help="a Hub id (uoft-cs/cifar10) or a local folder to sample --num_images from, instead of --images")
    parser.add_argument("--split", default=None, help="default: test when the dataset has one, else validation")
    parser.add_argument("--num_images", type=int, default=8, help="images sampled from the dataset")
    parser.add_argument("--seed", type=int, default=0, help="which images are sampled")
    parser.add_argument("--method", choices=METHODS, default="rollout",
                        help="what is drawn over the image: the rollout, the gradient-weighted relevance for the predicted "
                             "class, --layer's CLS attention (mean of heads), or each head")
    parser.add_argument("--layer", type=int, default=None, help="the layer (from 1) whose CLS attention is drawn; default the last")
    parser.add_argument("--output", default="attention.png", help="PNG file to write")
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error("--num_images must be at least 1")
    if args.layer is not None and args.layer < 1:
        parser.error("--layer counts from 1")
    if args.images and args.dataset_name:
        parser.error("give --images or --dataset_name, not both")
    return args


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    images = [open_image(path) for path in args.images] if args.images else None  # checked before the slow loading
    model, processor = load_model(args.model)
    if not model.config.num_hidden_layers:
        raise UserError(f"{args.model} has no transformer blocks (the backbone alone): it has no attention to draw")
    if args.layer is not None and args.layer > model.config.num_hidden_layers:
        raise UserError(f"--layer {args.layer}: {args.model} has {model.config.num_hidden_layers} transformer layers")
    if args.dataset_name is None:
        paths = args.images or sorted(str(path) for path in EXAMPLES.glob("*.png"))
        images = images or [open_image(path) for path in paths]
        true_labels, names = None, [Path(path).name for path in paths]
    else:
        dataset, image_column, label_column, _ = load_split(args.dataset_name, args.split, *split_of(args.model))
        indices = sample_indices(len(dataset), args.num_images, args.seed)
        (images, true_labels), names = dataset_images(dataset, image_column, label_column, indices), None
    figure = attention_figure(model, processor, images, true_labels, names, args.method, args.layer)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output, dpi=110)
    print(f"wrote {Path(args.output).resolve()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
