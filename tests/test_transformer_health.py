"""The transformer's health, on tiny models: a zeroed block reports no contribution, a
block that attends evenly reports uniform entropy, the rollout's cosine and correlation to the
average map have their known values and tell maps that follow the image from one map for
every image, and run_eval.py writes the figures and JSON; the backbone-alone baseline
evaluates and has no attention to check."""

import json

import numpy as np
import pytest
import torch

import run_eval
import transformer_health
import visualize
from configuration_hybrid_vit import HybridViTConfig
from modeling_hybrid_vit import HybridViTForImageClassification, save_model_and_processor
from tests.conftest import TINY_MODEL

NAMES = ["class_0", "class_1", "class_2"]


def tiny(**overrides):
    torch.manual_seed(0)
    config = HybridViTConfig(**{**TINY_MODEL, "num_hidden_layers": 3, **overrides},
                             id2label=dict(enumerate(NAMES)), label2id={n: i for i, n in enumerate(NAMES)})
    model = HybridViTForImageClassification(config).eval()
    # Larger weights than the initialisation's, so that every live block moves predictions: at
    # 0.02 the classifier's own preference for one class outweighs what any block changes.
    with torch.no_grad():
        for layer in model.hybrid_vit.layers:
            for linear in (layer.attention.to_qkv, layer.attention.to_out, layer.mlp.fc1, layer.mlp.fc2):
                linear.weight.normal_(0, 1.0)
        model.classifier.weight.normal_(0, 1.0)
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


def spot_batches(n=96, batch=32, seed=0):
    """A grey image with one bright 4x4 square, in a different place in each image."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(n // batch):
        images = torch.zeros(batch, 3, 16, 16)
        for image in images:
            row, col = torch.randint(0, 13, (2,), generator=generator).tolist()
            image[:, row : row + 4, col : col + 4] = 2.0
        yield images, torch.randint(0, 3, (batch,), generator=generator)


@pytest.mark.parametrize("class_attention_layers", [0, 2])
def test_a_zeroed_block_contributes_nothing_and_live_ones_do(class_attention_layers):
    model = tiny(class_attention_layers=class_attention_layers)
    zero_block(model, 1)
    health, spread = transformer_health.measure(model, batches())
    dead, *live = health["blocks"][1], health["blocks"][0], health["blocks"][2]
    assert dead["skip_cost"] == 0 and dead["predictions_changed"] == 0 and dead["accuracy_skipped"] == health["accuracy"]
    assert all(block["predictions_changed"] > 0.05 for block in live)
    assert not health["every_block_alive"]
    assert health["num_samples"] == 96 and spread["cosine"].shape == spread["correlation"].shape == (96,)


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


# ------------------------------------------------------- how much the maps depend on the image


def test_the_same_map_for_every_image_has_cosine_and_correlation_one():
    same = (torch.rand(1, 4, 4) + 0.1 * torch.arange(16.0).view(1, 4, 4)).expand(10, 4, 4)
    assert torch.allclose(transformer_health.cosine_to_average(same), torch.ones(10))
    assert torch.allclose(transformer_health.correlation_to_average(same), torch.ones(10))
    different = torch.eye(16).view(16, 4, 4)  # each image one different token
    assert torch.allclose(transformer_health.cosine_to_average(different), torch.full((16,), 0.25))


def test_the_correlation_is_pearsons_with_the_average_map_whatever_each_maps_scale_and_offset():
    maps = torch.rand(12, 4, 4, generator=torch.Generator().manual_seed(0))
    average = maps.mean(dim=0).flatten().numpy()
    expected = [np.corrcoef(m.flatten().numpy(), average)[0, 1] for m in maps]
    correlation = transformer_health.correlation_to_average(maps)
    np.testing.assert_allclose(correlation.numpy(), expected, rtol=1e-5)
    # One map rescaled and shifted: its own correlation stays, its cosine does not.
    shifted = maps.clone()
    shifted[0] = 3 * maps[0] + 2
    changed_average = shifted.mean(dim=0).flatten().numpy()
    assert transformer_health.correlation_to_average(shifted)[0].item() == pytest.approx(
        np.corrcoef(maps[0].flatten().numpy(), changed_average)[0, 1], rel=1e-5)
    assert transformer_health.cosine_to_average(shifted)[0] != pytest.approx(transformer_health.cosine_to_average(maps)[0])


def test_the_correlation_tells_unrelated_maps_apart_where_the_cosine_cannot():
    """Maps that share a pattern up to independent noise: the correlation is the square root of
    the share of a map's variance the pattern explains, sqrt(1 / (1 + noise / pattern)), so 0 for
    maps that share nothing; the cosine of non-negative maps stays high either way."""
    generator = torch.Generator().manual_seed(0)
    pattern = torch.randn(1, 8, 8, generator=generator)
    pattern = (pattern - pattern.mean()) / pattern.std(correction=0)  # variance 1 over its tokens
    noise = torch.randn(2000, 8, 8, generator=generator)
    for noise_std, expected in ((0.0, 1.0), (1.0, 1 / np.sqrt(2)), (np.sqrt(3), 0.5)):
        correlation = transformer_health.correlation_to_average(pattern + noise_std * noise)
        assert correlation.mean().item() == pytest.approx(expected, abs=0.03), noise_std
    unrelated = torch.rand(2000, 8, 8, generator=generator)  # uniform in [0, 1], independent
    assert transformer_health.correlation_to_average(unrelated).mean().abs() < 0.05
    # E[x] / sqrt(E[x^2]) = 0.5 / sqrt(1/3): above the cosine's line although nothing is shared.
    cosine = transformer_health.cosine_to_average(unrelated).mean().item()
    assert cosine == pytest.approx(np.sqrt(3) / 2, abs=0.02) and cosine > transformer_health.MAX_ROLLOUT_COSINE


def test_the_check_tells_maps_that_follow_the_image_from_one_map_for_every_image():
    """One class-attention block (the default design) on images whose one bright square moves:
    its maps differ. The same model with its token projections zeroed sees every image as the
    same tokens (the position embeddings): one map for all, which the check reports."""
    model = tiny(num_hidden_layers=1, class_attention_layers=1)
    health, spread = transformer_health.measure(model, spot_batches())
    assert health["maps_differ"]
    assert health["rollout_cosine_to_average"] < transformer_health.MAX_ROLLOUT_COSINE
    assert health["rollout_correlation_to_average"] < transformer_health.MAX_ROLLOUT_CORRELATION
    embeddings = model.hybrid_vit.embeddings
    with torch.no_grad():
        for projection in (embeddings.to_tokens, *embeddings.lateral_tokens):
            projection.weight.zero_()
    health, spread = transformer_health.measure(model, spot_batches())
    assert not health["maps_differ"]
    assert torch.allclose(spread["cosine"], torch.ones(96)) and torch.allclose(spread["correlation"], torch.ones(96), atol=1e-5)
    assert health["rollout_correlation_to_average_quartiles"] == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)


# --------------------------------------------------------------------------- run_eval.py


def test_run_eval_reports_the_health_and_draws_it(tmp_path, dataset_dir, capsys):
    folder, out = tmp_path / "model", tmp_path / "eval"
    model = tiny()
    zero_block(model, 2)
    save_model_and_processor(model, folder)
    assert run_eval.main(["--model", str(folder), "--dataset_name", str(dataset_dir), "--output_dir", str(out),
                          "--faithfulness_images", "0"]) == 0
    results = json.loads((out / "eval_results.json").read_text())
    health = results["transformer_health"]
    # Every image of the test split (fewer than --health_images), scored as the evaluation scores them.
    assert health["num_samples"] == results["num_samples"] == 9 and health["accuracy"] == pytest.approx(results["accuracy"])
    assert [b["block"] for b in health["blocks"]] == [1, 2, 3]
    assert health["blocks"][2]["skip_cost"] == 0 and health["blocks"][2]["predictions_changed"] == 0
    assert not health["every_block_alive"]
    assert health["maps_differ"] == (health["rollout_cosine_to_average"] <= transformer_health.MAX_ROLLOUT_COSINE
                                     and health["rollout_correlation_to_average"] <= transformer_health.MAX_ROLLOUT_CORRELATION)
    printed = capsys.readouterr().out
    assert "block 3: accuracy" in printed
    assert (f"rollout map against the average map: cosine {health['rollout_cosine_to_average']:.2f}, "
            f"correlation {health['rollout_correlation_to_average']:.2f}") in printed
    assert (out / "transformer_health.png").is_file()


def test_the_backbone_alone_pools_its_tokens_and_has_no_attention_to_check(tmp_path, dataset_dir, capsys):
    with pytest.raises(ValueError, match="pooling"):
        HybridViTConfig(**{**TINY_MODEL, "num_hidden_layers": 0})
    model = tiny(num_hidden_layers=0, class_attention_layers=0, pooling="mean")
    pixel_values = torch.randn(2, 3, 16, 16)
    outputs = model.hybrid_vit(pixel_values)
    assert torch.allclose(outputs.pooler_output, outputs.last_hidden_state[:, 1:].mean(dim=1))
    assert model(pixel_values=pixel_values, output_attentions=True).attentions == ()
    folder, out = tmp_path / "model", tmp_path / "eval"
    save_model_and_processor(model, folder)
    assert run_eval.main(["--model", str(folder), "--dataset_name", str(dataset_dir), "--output_dir", str(out)]) == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert "transformer_health" not in results and "faithfulness" not in results
    assert "no transformer blocks" in capsys.readouterr().err
    assert not (out / "transformer_health.png").exists() and not (out / "faithfulness.png").exists()
    code = visualize.main(["--model", str(folder), "--output", str(tmp_path / "maps.png")])
    assert code == 2 and "no attention to draw" in capsys.readouterr().err and not (tmp_path / "maps.png").exists()
