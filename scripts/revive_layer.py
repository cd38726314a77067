"""Give a dead transformer layer of a saved model fresh input weights, keeping its function.

A pre-norm block adds `to_out(attention(to_qkv(x)))` and `fc2(gelu(fc1(x)))` to its input.
When weight decay has shrunk all four matrices to about zero (the H200 release's second
layer: norms 0.002 and below), the block passes its input through, and it cannot learn
its way back: each branch is a product of two near-zero matrices, whose gradients are each
proportional to the other's size, a saddle point. This re-draws the input side of both
branches (`to_qkv` and `fc1`: normal at the model's `initializer_range`, clipped to twice
that, zero biases) and leaves the output side (`to_out`, `fc2`) as it is, near zero. The model then
computes what it did before, up to those near-zero outputs, and the output matrices get a
gradient again, as with zero-initialised residual branches (Goyal et al., 2017; Zhang et
al., 2019, "Fixup"). Fine-tune the result, e.g. distilled from the original model.

    python scripts/revive_layer.py --model checkpoints/hybrid-vit-cifar10 --layer 2 --output_dir outputs/release-layer2-revived

`--layer` counts from 1, as `visualize.py --layer` does. A layer whose output matrices are
not near zero (norm at or above `--dead_below`) is alive: re-drawing its inputs would change
what the model computes, so it is refused. The run's train_config.yaml is copied, so that
`run_eval.py` and `run_train.py --teacher_model` see the same validation split.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visualize import InputError, load_model  # noqa: E402

INPUTS = ("attention.to_qkv", "mlp.fc1")
OUTPUTS = ("attention.to_out", "mlp.fc2")


def branch_norms(layer) -> dict[str, float]:
    """Frobenius norm of each of the block's four branch matrices."""
    return {name: layer.get_submodule(name).weight.norm().item() for name in INPUTS + OUTPUTS}


@torch.no_grad()
def revive(model, layer_number: int, dead_below: float = 0.01, seed: int = 0) -> dict:
    """Re-draw the input matrices of layer `layer_number` (from 1) in place; return the
    norms before and after. Raises InputError for a layer that does not exist or is alive."""
    base = getattr(model, model.base_model_prefix, model)
    layers = base.layers
    if not 1 <= layer_number <= len(layers):
        raise InputError(f"--layer must be between 1 and {len(layers)} (the model's layers), got {layer_number}")
    layer = layers[layer_number - 1]
    before = branch_norms(layer)
    alive = {name: round(before[name], 4) for name in OUTPUTS if before[name] >= dead_below}
    if alive:
        raise InputError(f"layer {layer_number} is alive (output weight norms {alive}, --dead_below {dead_below}): "
                         "re-drawing its inputs would change what the model computes")
    generator = torch.Generator().manual_seed(seed)
    std = model.config.initializer_range
    for name in INPUTS:
        linear = layer.get_submodule(name)
        weight = torch.empty(linear.weight.shape).normal_(generator=generator).mul_(std).clamp_(-2 * std, 2 * std)
        linear.weight.copy_(weight)
        if linear.bias is not None:
            linear.bias.zero_()
    return {"before": before, "after": branch_norms(layer)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="saved model folder or Hub id")
    parser.add_argument("--layer", type=int, required=True, help="the dead layer, counting from 1")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--dead_below", type=float, default=0.01,
                        help="the layer counts as dead when its to_out and fc2 weight norms are both below this")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new weights")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        model, _ = load_model(args.model)
        norms = revive(model, args.layer, args.dead_below, args.seed)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name in INPUTS + OUTPUTS:
        print(f"layer {args.layer} {name}.weight: norm {norms['before'][name]:.4f} -> {norms['after'][name]:.4f}")

    from modeling_hybrid_vit import save_model_and_processor

    out = Path(args.output_dir)
    save_model_and_processor(model, out)
    if (Path(args.model) / "train_config.yaml").is_file():
        shutil.copy(Path(args.model) / "train_config.yaml", out / "train_config.yaml")
    (out / "revival.json").write_text(json.dumps({"model": args.model, "layer": args.layer, "seed": args.seed,
                                                  "norms": norms}, indent=2))
    print(f"saved to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
