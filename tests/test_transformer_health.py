"""The transformer's health, on tiny models: a zeroed block reports no contribution, a
block that attends evenly reports uniform entropy, identical maps report cosine 1, and
run_eval.py writes the figures and JSON; the backbone-alone baseline trains and evaluates."""

import json
import subprocess
import sys

import pytest
import torch

import transformer_health
from configuration_hybrid_vit import HybridViTConfig
from modeling_hybrid_vit import HybridViTForImageClassification, save_model_and_processor
from tests.conftest import PROJECT_ROOT, TINY_MODEL

NAMES = ["class_0", "class_1", "class_2"]


def tiny(**overrides):
    torch.manual_seed(0)
    config = HybridViTConfig(**{**TINY_MODEL, "num_hidden_layers": 3, **overrides},
                             id2label=dict(enumerate(NAMES)), label2id={n: i for i, n in enumerate(NAMES)})
    model = HybridViTForImageClassification(config).eval()
    with torch.no_grad():  # larger weights than the initialisation's, so that every live block moves predictions
        for layer in model.hybrid_vit.layers:
            for linear in (layer.attention.to_qkv, layer.attention.to_out, layer.mlp.fc1, layer.mlp.fc2):
                linear.weight.normal_(0, 0.5)
    return model


def zero_block(model, index):
    layer = model.hybrid_vit.layers[index]
    with torch.no_grad():
        for linear in (layer.attention.to_out, layer.mlp.fc2):
            linear.weight.zero_()
            linear.bias.zero_()


def batches(n=96, batch=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(n // batch):
        yield torch.randn(batch, 3, 16, 16, generator=generator), torch.randint(0, 3, (batch,), generator=generator)


@pytest.mark.parametrize("class_attention_layers", [0, 2])
def test_a_zeroed_block_contributes_nothing_and_live_ones_do(class_attention_layers):
    model = tiny(class_attention_layers=class_attention_layers)
    zero_block(model, 1)
    health, cosines = transformer_health.measure(model, batches())
    dead, *live = health["blocks"][1], health["blocks"][0], health["blocks"][2]
    assert dead["skip_cost"] == 0 and dead["predictions_changed"] == 0 and dead["accuracy_skipped"] == health["accuracy"]
    assert all(block["predictions_changed"] > 0.05 for block in live)
    assert not health["every_block_alive"]
    assert health["num_samples"] == 96 and cosines.shape == (96,)


@pytest.mark.parametrize("class_attention_layers", [0, 3])
def test_skipping_restores_the_block_and_is_the_model_without_it(class_attention_layers):
    model = tiny(class_attention_layers=class_attention_layers)
    pixel_values = torch.randn(4, 3, 16, 16)
    before = model(pixel_values=pixel_values).logits
    with transformer_health.block_skipped(model, 0):
        skipped = model(pixel_values=pixel_values).logits
    assert torch.equal(model(pixel_values=pixel_values).logits, before)
    # The same as a model whose first block's branches are zero.
    zero_block(model, 0)
    assert torch.allclose(model(pixel_values=pixel_values).logits, skipped, atol=1e-6)


def test_even_attention_has_entropy_one_and_one_hot_attention_zero():
    uniform = torch.full((2, 1, 5, 5), 0.2)
    one_hot = torch.zeros(2, 1, 5, 5)
    one_hot[..., 3] = 1.0
    ratios = transformer_health.cls_entropy_ratio([uniform, one_hot])
    assert ratios.shape == (2, 2)
    assert torch.allclose(ratios[:, 0], torch.ones(2)) and torch.allclose(ratios[:, 1], torch.zeros(2), atol=1e-5)
    # A block whose queries and keys are zero attends evenly: its ratio is 1.
    model = tiny()
    with torch.no_grad():
        model.hybrid_vit.layers[0].attention.to_qkv.weight[: 2 * 16].zero_()
        model.hybrid_vit.layers[0].attention.to_qkv.bias.zero_()
    health, _ = transformer_health.measure(model, batches(32))
    assert health["blocks"][0]["cls_entropy_of_uniform"] == pytest.approx(1.0, abs=1e-5)
    assert health["blocks"][2]["cls_entropy_of_uniform"] < 0.99


def test_the_same_map_for_every_image_has_cosine_one():
    same = torch.rand(1, 4, 4).expand(10, 4, 4)
    assert torch.allclose(transformer_health.cosine_to_average(same), torch.ones(10))
    different = torch.eye(16).view(16, 4, 4)  # each image one different token
    assert torch.allclose(transformer_health.cosine_to_average(different), torch.full((16,), 0.25))


def test_run_eval_reports_the_health_and_draws_it(tmp_path, env, dataset_dir):
    folder, out = tmp_path / "model", tmp_path / "eval"
    model = tiny()
    zero_block(model, 2)
    save_model_and_processor(model, folder)
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "run_eval.py"), "--model", str(folder), "--dataset_name",
                             str(dataset_dir), "--output_dir", str(out), "--faithfulness_images", "0"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    health = json.loads((out / "eval_results.json").read_text())["transformer_health"]
    assert [b["block"] for b in health["blocks"]] == [1, 2, 3]
    assert health["blocks"][2]["skip_cost"] == 0 and health["blocks"][2]["predictions_changed"] == 0
    assert 0 <= health["rollout_cosine_to_average"] <= 1 and 0 <= health["last_layer_cls_cosine_to_average"] <= 1
    assert (out / "transformer_health.png").is_file()
    assert "block 3: accuracy" in result.stdout


def test_the_backbone_alone_pools_its_tokens_and_has_no_attention_to_check(tmp_path, env, dataset_dir):
    with pytest.raises(ValueError, match="pooling"):
        HybridViTConfig(**{**TINY_MODEL, "num_hidden_layers": 0})
    model = tiny(num_hidden_layers=0, pooling="mean")
    pixel_values = torch.randn(2, 3, 16, 16)
    outputs = model.hybrid_vit(pixel_values)
    assert torch.allclose(outputs.pooler_output, outputs.last_hidden_state[:, 1:].mean(dim=1))
    assert model(pixel_values=pixel_values, output_attentions=True).attentions == ()
    folder, out = tmp_path / "model", tmp_path / "eval"
    save_model_and_processor(model, folder)
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "run_eval.py"), "--model", str(folder), "--dataset_name",
                             str(dataset_dir), "--output_dir", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "eval_results.json").read_text())
    assert "transformer_health" not in results and "faithfulness" not in results and "no transformer blocks" in result.stderr
    drawn = subprocess.run([sys.executable, str(PROJECT_ROOT / "visualize.py"), "--model", str(folder), "--output",
                            str(tmp_path / "maps.png")], capture_output=True, text=True, env=env, timeout=300)
    assert drawn.returncode == 2 and "no attention to draw" in drawn.stderr and not (tmp_path / "maps.png").exists()
