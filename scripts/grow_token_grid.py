"""Give a trained model finer tokens, keeping what it computes: the starting point for
fine-tuning a 4x4-token model (such as the release) into the feature-pyramid design.

    python scripts/grow_token_grid.py --model checkpoints/hybrid-vit-cifar10 --token_stages 2 \
        --output_dir outputs/release-8x8-init
    python run_train.py --config default.yaml --model_name_or_path outputs/release-8x8-init ...

The new model has `token_stages` token stages (modeling_hybrid_vit.HybridViTEmbeddings):
its tokens lie on an earlier backbone stage's finer grid, each the sum of that stage's own
1x1 projection (a lateral connection) and the coarser token above it. Every weight is
copied from `--model`, except two:
- the new lateral projections start at zero, so each fine token starts as a copy of the
  coarse token it lies in;
- the position embeddings are the old ones resized bicubically to the new grid (as ViT
  fine-tunes at a new resolution; `interpolate_pos_encoding`).

Its predictions therefore start close to the old model's: attention over four copies of a
token, at nearly the same positions, is nearly attention over the one (only the CLS token's
share of its own attention shrinks). On the release, 92.8% of the first 1,000 validation
images are right before fine-tuning, against 92.6% for the release itself. Fine-tuning
teaches the lateral projections what the finer grid adds. The script prints the validation
accuracy of neither: score both with `run_eval.py`. `train_config.yaml` is copied, so
`run_eval.py` and `run_train.py` find the split the model was trained on.

`--class_attention_layers K` also turns the last K blocks into class-attention blocks (a
block of either kind has the same weights), and `--num_hidden_layers N` keeps only the first
N blocks (a block that is dead in the old model can be dropped).
"""

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from run_folder import UserError  # noqa: E402


def grow(model, token_stages: int, class_attention_layers: int | None = None, num_hidden_layers: int | None = None):
    """A new model with `token_stages` token stages (and optionally other block counts),
    its weights copied from `model` as the module docstring says."""
    from configuration_hybrid_vit import HybridViTConfig
    from modeling_hybrid_vit import HybridViTForImageClassification

    old = model.config
    if token_stages < old.token_stages:
        raise UserError(f"--token_stages {token_stages}: the model already has {old.token_stages}; this script only adds stages")
    settings = old.to_dict()
    for key in ("architectures", "transformers_version", "model_type", "dtype", "torch_dtype", "auto_map"):
        settings.pop(key, None)
    settings.update(token_stages=token_stages, patch_size=None)
    if num_hidden_layers is not None:
        if not 0 < num_hidden_layers <= old.num_hidden_layers:
            raise UserError(f"--num_hidden_layers {num_hidden_layers}: keep from 1 to the model's {old.num_hidden_layers} blocks")
        settings["num_hidden_layers"] = num_hidden_layers
    if class_attention_layers is not None:
        settings["class_attention_layers"] = class_attention_layers
    try:
        config = HybridViTConfig(**settings)
    except ValueError as error:
        raise UserError(str(error).splitlines()[0]) from None
    new = HybridViTForImageClassification(config)
    state = model.state_dict()
    grid = config.image_size // config.patch_size
    with torch.no_grad():
        state["hybrid_vit.embeddings.position_embeddings"] = model.hybrid_vit.embeddings.interpolate_pos_encoding(grid, grid).clone()
    for lateral in new.hybrid_vit.embeddings.lateral_tokens[len(model.hybrid_vit.embeddings.lateral_tokens):]:
        torch.nn.init.zeros_(lateral.weight)
        torch.nn.init.zeros_(lateral.bias)
    target = new.state_dict()
    dropped = [key for key in state if key not in target]
    if num_hidden_layers is None and dropped:
        raise UserError(f"weights with no place in the new model: {', '.join(dropped[:3])}")
    missing = new.load_state_dict({k: v for k, v in state.items() if k in target}, strict=False).missing_keys
    unexpected_new = [key for key in missing if ".lateral_tokens." not in key]
    if unexpected_new:
        raise UserError(f"weights the old model lacks: {', '.join(unexpected_new[:3])}")
    return new.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved model folder (run_train.py's output, or the release)")
    parser.add_argument("--token_stages", type=int, default=2, help="token stages of the new model (default 2: an 8x8 grid)")
    parser.add_argument("--class_attention_layers", type=int, default=None, help="the last K blocks become class-attention blocks")
    parser.add_argument("--num_hidden_layers", type=int, default=None, help="keep only the first N blocks")
    parser.add_argument("--output_dir", required=True, help="a new folder for the grown model")
    args = parser.parse_args(argv)
    try:
        from modeling_hybrid_vit import save_model_and_processor
        from run_folder import load_model

        output = Path(args.output_dir)
        if output.exists() and any(output.iterdir()):
            raise UserError(f"--output_dir {output} exists and is not empty")
        model, _ = load_model(args.model)
        new = grow(model, args.token_stages, args.class_attention_layers, args.num_hidden_layers)
        new.config.logit_temperature = 1.0  # a temperature fitted to the old model does not carry over
        save_model_and_processor(new, output)
        if (Path(args.model) / "train_config.yaml").is_file():
            shutil.copy(Path(args.model) / "train_config.yaml", output / "train_config.yaml")
        tokens = new.config.num_patches
        print(f"saved {output}: {tokens} tokens ({int(tokens ** 0.5)}x{int(tokens ** 0.5)}), "
              f"{new.config.num_hidden_layers} blocks ({new.config.class_attention_layers} class attention)")
    except UserError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
