"""Gradio demo: upload an image (or pick a bundled example) and see the hybrid ViT's top-5
CIFAR-10 classes and its attention rollout drawn over the image.

    python app.py --model outputs/hybrid-vit-cifar10          # serves http://127.0.0.1:7860
    GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=8080 python app.py --model ORG/MODEL_ID

Gradio's own variables choose the address: GRADIO_SERVER_NAME (default 127.0.0.1, the
Docker image sets 0.0.0.0) and GRADIO_SERVER_PORT (default 7860). Without --model the
model comes from HYBRID_VIT_MODEL, which is how the Docker image and a Hugging Face Space
(space/README.md holds its header) choose it. The maps come from attention_maps.py; this
file only wires them to the page.
"""

import argparse
import os
import sys
from pathlib import Path

import gradio as gr
import numpy as np

from attention_maps import display_image, model_outputs, overlay, relevance_map, rollout_map
from errors import UserError, command
from hub_folder import load_model

MODEL_VARIABLE = "HYBRID_VIT_MODEL"
EXAMPLES_DIR = Path(__file__).resolve().parent / "assets" / "examples"
TOP_K = 5
OVERLAY_SIZE = 256  # pixels: the overlay shows the image as the model sees it, squashed to a square

DESCRIPTION = """\
# Hybrid ViT: what it sees and where it looks

Upload a picture or click an example. The model, a small convolutional stem followed by a
transformer encoder, sees it at {size}x{size} pixels and chooses among {num_classes} classes:
{classes}.

The attention rollout (Abnar & Zuidema 2020) shows where the CLS token that the
classifier reads gathers its information from: bright where the model looks most.
"""


# What the overlay draws. The default is the map that measured most faithful on the release
# checkpoint (docs/interpretability.md: deletion and insertion curves, run_eval.py).
METHODS = {"rollout": "Attention rollout", "relevance": "Gradient-weighted attention relevance for the predicted class"}
DEFAULT_METHOD = "rollout"


def make_classifier(model, processor, method: str = DEFAULT_METHOD):
    """Return `classify(image) -> ({label: probability} for the top 5, overlay)` for a loaded
    model; the overlay is an (OVERLAY_SIZE, OVERLAY_SIZE, 3) uint8 array. Any PIL mode works
    (grayscale, RGBA, palette): the image is converted to RGB. `None`, a cleared input,
    clears both outputs."""

    def classify(image):
        if image is None:
            return None, None
        image = image.convert("RGB")
        outputs = model_outputs(model, processor, [image])
        probabilities = outputs.logits[0].float().softmax(dim=-1)
        top = probabilities.topk(min(TOP_K, probabilities.numel()))
        labels = {model.config.id2label[int(i)]: float(p) for p, i in zip(top.values, top.indices)}
        if method == "relevance":
            pixel_values = processor(images=[image], return_tensors="pt")["pixel_values"].to(model.device)
            heatmap = relevance_map(model, pixel_values)[0][0]  # (g, g)
        else:
            heatmap = rollout_map(outputs.attentions)[0]  # (g, g)
        blended = overlay(display_image(image, OVERLAY_SIZE), heatmap)  # (H, W, 3) floats in [0, 1]
        return labels, (blended * 255).round().astype(np.uint8)

    return classify


def build_demo(classify, model_name: str, config, method: str = DEFAULT_METHOD) -> gr.Blocks:
    examples = sorted(str(path) for path in EXAMPLES_DIR.glob("*.png"))
    classes = [config.id2label[i] for i in sorted(config.id2label)]
    description = DESCRIPTION.format(size=config.image_size, num_classes=len(classes), classes=", ".join(classes))
    with gr.Blocks(title="Hybrid ViT demo") as demo:
        gr.Markdown(description)
        with gr.Row(equal_height=False):
            with gr.Column():
                # image_mode=None hands the upload over as it is; classify converts to RGB.
                image = gr.Image(type="pil", image_mode=None, label="Image", sources=["upload", "clipboard"], height=320)
                gr.Examples(examples=examples, inputs=image, label="Examples (drawn for this demo, not CIFAR-10 images)")
            with gr.Column():
                label = gr.Label(num_top_classes=TOP_K, label="Top-5 classes", elem_id="prediction")
                heatmap = gr.Image(
                    label=f"{METHODS[method]} (the image squashed to a square, as the model sees it)",
                    interactive=False,
                    height=320,
                    elem_id="rollout",
                )
        gr.Markdown(f"Model: `{model_name}`")
        # `change` fires for uploads, pasted images and clicked examples alike.
        image.change(classify, inputs=image, outputs=[label, heatmap])
    return demo


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default=os.environ.get(MODEL_VARIABLE),
        help=f"a saved model folder or a Hub id (default: ${MODEL_VARIABLE})",
    )
    parser.add_argument("--method", choices=list(METHODS), default=DEFAULT_METHOD,
                        help="the map drawn over the image (default: the one measured most faithful on the release)")
    args = parser.parse_args(argv)
    if not args.model:
        parser.error(f"--model is required when {MODEL_VARIABLE} is not set")
    return args


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    model, processor = load_model(args.model)
    if not model.config.num_hidden_layers:
        raise UserError(f"{args.model} has no transformer blocks (the backbone alone): the demo draws attention")
    demo = build_demo(make_classifier(model, processor, args.method), args.model, model.config, args.method)
    # Examples are served from the checkout even when app.py is started from elsewhere.
    demo.launch(allowed_paths=[str(EXAMPLES_DIR)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
