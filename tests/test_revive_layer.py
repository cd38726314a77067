"""scripts/revive_layer.py: a dead layer gets fresh input weights without changing what
the model computes, its output weights get a gradient again, and a live or missing layer
is refused with nothing written."""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from configuration_hybrid_vit import HybridViTConfig
from modeling_hybrid_vit import HybridViTForImageClassification, save_model_and_processor
from tests.conftest import PROJECT_ROOT, TINY_MODEL

spec = importlib.util.spec_from_file_location("revive_layer", PROJECT_ROOT / "scripts" / "revive_layer.py")
revive_layer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(revive_layer)

BRANCHES = revive_layer.INPUTS + revive_layer.OUTPUTS


def model_with_a_dead_second_layer(seed=0):
    """A tiny model whose second layer's four branch matrices were shrunk to about 1e-4 of
    their size and their biases set to 1e-4, as long weight decay left the H200 release's."""
    torch.manual_seed(seed)
    model = HybridViTForImageClassification(HybridViTConfig(**TINY_MODEL, num_labels=3)).eval()
    with torch.no_grad():
        for name in BRANCHES:
            model.hybrid_vit.layers[1].get_submodule(name).weight.mul_(1e-4)
            model.hybrid_vit.layers[1].get_submodule(name).bias.fill_(1e-4)
    return model


def output_weight_gradient(model, pixel_values):
    """Norm of the loss gradient on the second layer's attention output matrix."""
    model.zero_grad()
    model(pixel_values=pixel_values, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    return model.hybrid_vit.layers[1].attention.to_out.weight.grad.norm().item()


def test_revival_keeps_the_function_and_ends_the_saddle():
    model = model_with_a_dead_second_layer()
    pixel_values = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        before = model(pixel_values=pixel_values).logits
    dead_gradient = output_weight_gradient(model, pixel_values)
    output_weights = {name: model.hybrid_vit.layers[1].get_submodule(name).weight.clone() for name in revive_layer.OUTPUTS}

    norms = revive_layer.revive(model, 2)

    with torch.no_grad():
        after = model(pixel_values=pixel_values).logits
    torch.testing.assert_close(after, before, atol=1e-3, rtol=0)
    layer = model.hybrid_vit.layers[1]
    for name in revive_layer.INPUTS:
        linear = layer.get_submodule(name)
        expected = 0.02 * linear.weight.numel() ** 0.5  # initializer_range; clipping at 2 std only shrinks it
        assert 0.7 * expected < norms["after"][name] < expected and norms["before"][name] < 1e-2
        assert linear.bias.abs().max() == 0
    for name, weight in output_weights.items():
        assert torch.equal(layer.get_submodule(name).weight, weight)
    assert output_weight_gradient(model, pixel_values) > 100 * dead_gradient


def test_the_seed_sets_the_new_weights():
    weights = []
    for seed in (0, 0, 1):
        model = model_with_a_dead_second_layer()
        revive_layer.revive(model, 2, seed=seed)
        weights.append(model.hybrid_vit.layers[1].attention.to_qkv.weight.clone())
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


@pytest.mark.parametrize("layer, message", [(1, "layer 1 is alive"), (3, "between 1 and 2"), (0, "between 1 and 2")])
def test_a_live_or_missing_layer_is_refused_unchanged(layer, message):
    model = model_with_a_dead_second_layer()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(revive_layer.InputError, match=message):
        revive_layer.revive(model, layer)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def test_the_command_line_saves_a_loadable_folder_with_the_runs_split(tmp_path, capsys):
    source, out = tmp_path / "dead", tmp_path / "revived"
    save_model_and_processor(model_with_a_dead_second_layer(), source)
    (source / "train_config.yaml").write_text("data:\n  train_val_split: 0.2\ntraining:\n  seed: 3\n")

    assert revive_layer.main(["--model", str(source), "--layer", "2", "--output_dir", str(out), "--seed", "5"]) == 0
    assert "layer 2 attention.to_qkv.weight: norm 0.0" in capsys.readouterr().out

    from transformers import AutoModelForImageClassification

    loaded = AutoModelForImageClassification.from_pretrained(out, trust_remote_code=True)
    assert loaded.config.num_hidden_layers == 2
    old, new = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {key for key in old if not torch.equal(old[key], new[key])}
    assert changed == {f"hybrid_vit.layers.1.{name}.{kind}" for name in revive_layer.INPUTS for kind in ("weight", "bias")}
    assert (out / "train_config.yaml").read_text() == (source / "train_config.yaml").read_text()
    record = json.loads((out / "revival.json").read_text())
    assert record["layer"] == 2 and record["seed"] == 5 and record["norms"]["after"]["attention.to_qkv"] > 0.1


def test_the_command_line_refuses_a_live_layer_and_writes_nothing(tmp_path, capsys):
    source, out = tmp_path / "dead", tmp_path / "revived"
    save_model_and_processor(model_with_a_dead_second_layer(), source)
    assert revive_layer.main(["--model", str(source), "--layer", "1", "--output_dir", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: layer 1 is alive")
    assert not out.exists()


def test_dead_below_sets_what_counts_as_dead():
    model = model_with_a_dead_second_layer()
    with pytest.raises(revive_layer.InputError, match="layer 2 is alive"):
        revive_layer.revive(model, 2, dead_below=1e-6)  # its output norms are about 1e-4 of a live layer's
    norms = revive_layer.revive(model, 1, dead_below=100.0)
    assert norms["after"]["attention.to_qkv"] != norms["before"]["attention.to_qkv"]
