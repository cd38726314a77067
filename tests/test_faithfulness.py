"""Maps that explain the decision, measured: gradient-weighted relevance, deletion and
insertion curves against random and average-map baselines, the randomised-model sanity
check, and temperature scaling."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import faithfulness
import run_eval
import visualize
from configuration_hybrid_vit import HybridViTConfig
from modeling_hybrid_vit import CIFAR10_MEAN, HybridViTForImageClassification, make_image_processor
from tests.conftest import PROJECT_ROOT, TINY_MODEL


class ReadsOneToken(torch.nn.Module):
    """A model whose decision depends on one known token's region only: class 0 when the
    region is bright, class 1 when dark. Its true relevance ranks that token first."""

    def __init__(self, token=5, grid=4, patch=4):
        super().__init__()
        self.token, self.grid, self.patch = token, grid, patch
        self.config = SimpleNamespace(num_patches=grid * grid, patch_size=patch)

    def forward(self, pixel_values):
        row, col = divmod(self.token, self.grid)
        region = pixel_values[:, :, row * self.patch : (row + 1) * self.patch, col * self.patch : (col + 1) * self.patch]
        s = 4 * region.mean(dim=(1, 2, 3))
        return SimpleNamespace(logits=torch.stack([s, -s], dim=1))


def images_for(model, n=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, 16, 16, generator=generator) * 0.3
    labels = torch.randint(0, 2, (n,), generator=generator)
    row, col = divmod(model.token, model.grid)
    sign = torch.where(labels == 0, 1.0, -1.0).view(-1, 1, 1, 1)
    pixels[:, :, row * 4 : (row + 1) * 4, col * 4 : (col + 1) * 4] += 1.5 * sign
    return pixels, labels


def test_a_map_in_the_order_of_true_relevance_beats_random_on_both_curves():
    model = ReadsOneToken()
    pixels, labels = images_for(model)
    steps = list(range(0, 17, 2)) + [1]
    steps.sort()
    oracle = torch.tensor([[model.token] + [t for t in range(16) if t != model.token]] * len(labels))
    random = faithfulness.random_orders(len(labels), 16, seed=0)
    d_oracle, i_oracle = faithfulness.perturbation_curves(model, pixels, labels, oracle, steps, 4)
    d_random, i_random = faithfulness.perturbation_curves(model, pixels, labels, random, steps, 4)
    area = lambda c: faithfulness.area(c, steps, 16).mean().item()  # noqa: E731
    assert area(d_oracle) < area(d_random) - 0.1
    assert area(i_oracle) > area(i_random) + 0.1


def test_the_baselines_are_computed_as_defined():
    orders = faithfulness.random_orders(5, 16, seed=3)
    assert all(sorted(row.tolist()) == list(range(16)) for row in orders)  # a permutation per image
    assert torch.equal(orders, faithfulness.random_orders(5, 16, seed=3)) and not torch.equal(orders[0], orders[1])
    maps = torch.rand(6, 4, 4)
    average = faithfulness.order_of(maps.mean(dim=0, keepdim=True))
    assert average[0, 0].item() == maps.mean(0).flatten().argmax().item()  # the average map's top token first
    assert torch.equal(faithfulness.order_of(maps)[:, 0], maps.flatten(1).argmax(1))


def test_blanking_sets_token_regions_to_the_normalised_mean_colour():
    processor = make_image_processor(HybridViTConfig(**TINY_MODEL))
    from PIL import Image

    mean_colour = Image.new("RGB", (16, 16), tuple(round(255 * m) for m in CIFAR10_MEAN))
    normalised = processor(images=[mean_colour], return_tensors="pt")["pixel_values"]
    assert normalised.abs().max() < 0.02 and faithfulness.BLANK == 0.0  # the mean colour normalises to the blank value
    mask = faithfulness.token_mask(torch.tensor([[5, 0, 1]]), 1, 4, 4)
    assert mask.shape == (1, 1, 16, 16) and mask.sum() == 16 and mask[0, 0, 4:8, 4:8].all()
    pixels = torch.randn(1, 3, 16, 16)
    blanked = pixels.masked_fill(mask, faithfulness.BLANK)
    assert (blanked[0, :, 4:8, 4:8] == 0).all() and torch.equal(blanked[0, :, :4], pixels[0, :, :4])


def test_gradient_relevance_is_chefers_rule_on_a_hand_built_layer():
    A = torch.softmax(torch.randn(1, 2, 3, 3), dim=-1)
    grad = torch.randn(1, 2, 3, 3)
    expected = torch.eye(3) + (grad * A).clamp_min(0).mean(dim=1)[0]
    torch.testing.assert_close(visualize.gradient_relevance([A], [grad])[0], expected)
    two = visualize.gradient_relevance([A, A], [grad, grad])[0]
    step = (grad * A).clamp_min(0).mean(dim=1)[0]
    torch.testing.assert_close(two, expected + step @ expected)


@pytest.mark.parametrize("class_attention_layers", [0, 1])
def test_relevance_follows_the_class_asked_for_and_uses_no_hooks(class_attention_layers):
    torch.manual_seed(0)
    model = HybridViTForImageClassification(HybridViTConfig(**TINY_MODEL, class_attention_layers=class_attention_layers)).eval()
    pixels = torch.randn(2, 3, 16, 16)
    maps, logits = visualize.relevance_map(model, pixels)
    assert maps.shape == (2, 4, 4) and torch.allclose(maps.flatten(1).amax(1), torch.ones(2))
    other, _ = visualize.relevance_map(model, pixels, target=torch.tensor([3, 4]))
    assert not torch.allclose(maps, other)
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert torch.equal(logits.argmax(-1), model(pixel_values=pixels).logits.argmax(-1))


def test_a_randomised_transformer_changes_the_maps_and_only_the_transformer():
    torch.manual_seed(0)
    model = HybridViTForImageClassification(HybridViTConfig(**TINY_MODEL)).eval()
    randomised = faithfulness.randomised_transformer(model)
    before, after = model.state_dict(), randomised.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("hybrid_vit.layers.") for k in changed)
    correlation = faithfulness.sanity_check(model, torch.randn(8, 3, 16, 16))
    assert set(correlation) == set(faithfulness.MAP_METHODS)
    assert all(-1 <= value < 0.99 for value in correlation.values()), correlation


def test_temperature_scaling_calibrates_overconfident_logits():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (2000,), generator=generator)
    logits = torch.randn(2000, 10, generator=generator)
    logits[torch.arange(2000), labels] += 1.5  # about 60% right
    overconfident = logits * 4
    temperature = run_eval.fit_temperature(overconfident, labels)
    assert temperature > 1.5  # overconfident logits get softened
    before = run_eval.expected_calibration_error(overconfident.softmax(-1), labels)
    after = run_eval.expected_calibration_error((overconfident / temperature).softmax(-1), labels)
    assert after < 0.03 < before
    floor, at = run_eval.lowest_ece_any_temperature(overconfident, labels, also=(temperature,))
    assert floor <= after and floor == pytest.approx(
        run_eval.expected_calibration_error((overconfident / at).softmax(-1), labels))


def test_no_temperature_removes_a_miscalibration_of_shape():
    """Always right at a small margin, right half the time at a large one: a temperature
    scales both margins alike, so it cannot make the first sure and the second unsure, and
    the lowest ECE stays far from zero."""
    logits = torch.zeros(2000, 2)
    logits[:1000, 0], logits[1000:, 0] = 1.0, 4.0
    labels = torch.zeros(2000, dtype=torch.long)
    labels[1000::2] = 1
    floor, _ = run_eval.lowest_ece_any_temperature(logits, labels)
    assert floor > 0.2


def test_the_saved_temperature_divides_the_logits_and_keeps_the_prediction():
    torch.manual_seed(0)
    model = HybridViTForImageClassification(HybridViTConfig(**TINY_MODEL)).eval()
    pixels = torch.randn(3, 3, 16, 16)
    plain = model(pixel_values=pixels).logits
    model.config.logit_temperature = 2.5
    scaled = model(pixel_values=pixels).logits
    torch.testing.assert_close(scaled, plain / 2.5)
    with pytest.raises(ValueError, match="logit_temperature"):
        HybridViTConfig(**TINY_MODEL, logit_temperature=0)


def test_run_eval_fits_and_saves_a_temperature_on_validation_and_reports_faithfulness(tmp_path, env, dataset_dir):
    from modeling_hybrid_vit import save_model_and_processor

    torch.manual_seed(0)
    names = ["class_0", "class_1", "class_2"]
    folder = tmp_path / "model"
    config = HybridViTConfig(**TINY_MODEL, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    save_model_and_processor(HybridViTForImageClassification(config), folder)
    out = tmp_path / "eval"
    base = [sys.executable, str(PROJECT_ROOT / "run_eval.py"), "--model", str(folder), "--dataset_name", str(dataset_dir),
            "--output_dir", str(out), "--batch_size", "8"]
    refused = subprocess.run(base + ["--fit_temperature"], capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 2 and "never on 'test'" in refused.stderr  # the dataset has a test split: never fit there
    result = subprocess.run(base + ["--split", "validation", "--fit_temperature"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "eval_results.json").read_text())
    saved = json.loads((folder / "config.json").read_text())["logit_temperature"]
    assert results["calibration"]["temperature"] == pytest.approx(saved) and saved != 1.0
    assert {"ece", "ece_before", "lowest_ece_any_temperature"} <= set(results["calibration"])
    assert results["calibration"]["lowest_ece_any_temperature"]["ece"] <= results["calibration"]["ece"]
    f = results["faithfulness"]
    assert {"rollout", "relevance", "cls", "random", "average_map", "most_faithful"} <= set(f)
    for name in ("rollout", "relevance", "cls", "random", "average_map"):
        lo, hi = f[name]["deletion_auc_ci95"]
        assert lo <= f[name]["deletion_auc"] <= hi and 0 <= f[name]["insertion_auc"] <= 1
    assert f["average_map"]["of"] == f["most_faithful"]
    assert (out / "faithfulness.png").is_file() and (out / "reliability.png").is_file()


def test_run_eval_skips_the_faithfulness_curves_when_asked(tmp_path, env, dataset_dir):
    from modeling_hybrid_vit import save_model_and_processor

    torch.manual_seed(0)
    names = ["class_0", "class_1", "class_2"]
    folder = tmp_path / "model"
    save_model_and_processor(HybridViTForImageClassification(HybridViTConfig(
        **TINY_MODEL, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})), folder)
    out = tmp_path / "eval"
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "run_eval.py"), "--model", str(folder), "--dataset_name",
                             str(dataset_dir), "--output_dir", str(out), "--faithfulness_images", "0"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "eval_results.json").read_text())
    assert "faithfulness" not in results and not (out / "faithfulness.png").exists()
    assert results["calibration"]["temperature"] == 1.0 and "ece_before" not in results["calibration"]
