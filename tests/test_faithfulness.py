"""Maps that explain the decision, measured: gradient-weighted relevance, deletion and
insertion curves (following the predicted class) against random and average-map baselines,
the randomised-model sanity check, and temperature scaling, fitted on the validation split and
saved only when asked."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml

import faithfulness
import run_eval
from attention_maps import gradient_relevance, relevance_map
from configuration_hybrid_vit import HybridViTConfig
from evaluation import expected_calibration_error, fit_temperature
from modeling_hybrid_vit import CIFAR10_MEAN, HybridViTForImageClassification, make_image_processor, save_model_and_processor
from tests.conftest import TINY_MODEL, make_image_dataset

NAMES = ["class_0", "class_1", "class_2"]
GRID, PATCH = 4, 4  # the constructed model's 4x4 grid of 4x4-pixel tokens: 16x16 images


class AttendsToTheSpot(torch.nn.Module):
    """A one-block attention model whose decision depends on one known token per image: the
    CLS token attends to the token whose region's mean is farthest from 0 (the blank value),
    and the logits are +-4 times the attended mean: class 0 when that region is bright,
    class 1 when dark. The logits are computed from the attention tensor it returns, so the
    relevance's gradients flow through it as through the real model's."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(num_patches=GRID * GRID, patch_size=PATCH)
        self.sharpness = torch.nn.Parameter(torch.tensor(10.0))  # a weight, so that the attention has gradients

    def forward(self, pixel_values, output_attentions=False):
        B, T = len(pixel_values), GRID * GRID + 1
        values = F.avg_pool2d(pixel_values.mean(dim=1, keepdim=True), PATCH).flatten(1)  # (B, N)
        cls_row = torch.cat([torch.zeros(B, 1), (self.sharpness * values.abs()).softmax(dim=-1)], dim=1)  # (B, T)
        patch_rows = torch.eye(T)[1:].expand(B, T - 1, T)  # the patch tokens attend to themselves
        attention = torch.cat([cls_row[:, None], patch_rows], dim=1)[:, None]  # (B, heads=1, T, T)
        s = 4 * (attention[:, 0, 0, 1:] * values).sum(dim=-1)
        return SimpleNamespace(logits=torch.stack([s, -s], dim=1), attentions=(attention,))


def spot_images(n=32, seed=0):
    """Noise, plus one bright or dark token in a different place in each image; returns the
    images and where the spot is."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, GRID * PATCH, GRID * PATCH, generator=generator) * 0.3
    spots = torch.randint(0, GRID * GRID, (n,), generator=generator)
    signs = torch.where(torch.rand(n, generator=generator) < 0.5, 1.5, -1.5)
    for image, spot, sign in zip(pixels, spots.tolist(), signs):
        row, col = divmod(spot, GRID)
        image[:, row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH] += sign
    return pixels, spots


def tiny_model(**overrides):
    torch.manual_seed(0)
    config = HybridViTConfig(**{**TINY_MODEL, **overrides}, id2label=dict(enumerate(NAMES)),
                             label2id={n: i for i, n in enumerate(NAMES)})
    return HybridViTForImageClassification(config).eval()


# ------------------------------------------------------------ deletion and insertion curves


def test_maps_that_find_the_deciding_token_beat_both_baselines_on_both_curves():
    model = AttendsToTheSpot()
    pixels, spots = spot_images()
    for method in faithfulness.MAP_METHODS:  # each map ranks the spot first
        assert torch.equal(faithfulness.order_of(faithfulness.method_maps(model, pixels, method))[:, 0], spots), method
    results = faithfulness.measure(model, pixels, batch_size=12, progress=False)
    for method in faithfulness.MAP_METHODS:
        # The spot first: deletion about 0.53 and insertion about 0.97 (the probability falls to
        # 0.5, or rises to 1, after the first step of 2 tokens); at a random rank, about 0.75 each.
        random, average = results["random"], results["average_map"]
        assert results[method]["deletion_auc"] < random["deletion_auc"] - 0.1, method
        assert results[method]["insertion_auc"] > random["insertion_auc"] + 0.1, method
        # One map for every image knows only where spots were most often, not where this one is.
        assert results[method]["deletion_auc"] < average["deletion_auc"], method
        assert results[method]["insertion_auc"] > average["insertion_auc"], method
    best = results["most_faithful"]
    assert best in faithfulness.MAP_METHODS and results["average_map"]["of"] == best
    assert results["num_images"] == 32 and results["fractions"][0] == 0 and results["fractions"][-1] == 1


def test_the_curves_follow_the_predicted_class_right_or_wrong():
    """Images whose true label is the class the model does not predict: the curves start from
    the probability of the prediction, the decision the maps explain, not of the label; the
    whole image scores the same under every order, and a blank one gives no evidence."""
    model = AttendsToTheSpot()
    pixels, _ = spot_images()
    probabilities = model(pixel_values=pixels).logits.softmax(dim=-1)  # (B, 2)
    labels = 1 - probabilities.argmax(dim=-1)  # wrong on every image
    predicted = probabilities.max(dim=-1).values.mean().item()
    of_label = probabilities.gather(1, labels[:, None]).mean().item()
    assert set(labels.tolist()) == {0, 1} and predicted > 0.99 and of_label < 0.01
    results = faithfulness.measure(model, pixels, batch_size=12, progress=False)
    assert results["followed_class"] == "predicted"
    for name, curves in results["mean_curves"].items():
        assert curves["deletion"][0] == pytest.approx(predicted, abs=1e-5), name  # nothing blanked yet
        assert curves["insertion"][-1] == pytest.approx(predicted, abs=1e-5), name  # everything revealed
        assert curves["deletion"][-1] == pytest.approx(0.5, abs=1e-5), name  # all blank: either class


def test_a_map_in_the_order_of_true_relevance_beats_random_on_both_curves():
    model = AttendsToTheSpot()
    pixels, spots = spot_images()
    classes = model(pixel_values=pixels).logits.argmax(dim=-1)
    steps = list(range(17))
    oracle = torch.stack([torch.cat([s.view(1), torch.tensor([t for t in range(16) if t != s])]) for s in spots])
    random = faithfulness.random_orders(len(spots), 16, seed=0)
    d_oracle, i_oracle = faithfulness.perturbation_curves(model, pixels, classes, oracle, steps, PATCH)
    d_random, i_random = faithfulness.perturbation_curves(model, pixels, classes, random, steps, PATCH)
    # The prediction, sure at first, falls to about chance as soon as the spot is blanked and
    # comes back as soon as it is revealed.
    assert (d_oracle[:, 0] > 0.99).all() and (d_oracle[:, 1:] < 0.75).all() and (i_oracle[:, 1:] > 0.99).all()
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


# ------------------------------------------------------------------------------ the maps


def test_gradient_relevance_is_chefers_rule_on_a_hand_built_layer():
    A = torch.softmax(torch.randn(1, 2, 3, 3), dim=-1)
    grad = torch.randn(1, 2, 3, 3)
    expected = torch.eye(3) + (grad * A).clamp_min(0).mean(dim=1)[0]
    torch.testing.assert_close(gradient_relevance([A], [grad])[0], expected)
    two = gradient_relevance([A, A], [grad, grad])[0]
    step = (grad * A).clamp_min(0).mean(dim=1)[0]
    torch.testing.assert_close(two, expected + step @ expected)


@pytest.mark.parametrize("class_attention_layers", [0, 1])
def test_relevance_follows_the_class_asked_for_and_uses_no_hooks(class_attention_layers):
    model = tiny_model(class_attention_layers=class_attention_layers)
    grid = model.config.image_size // model.config.patch_size
    pixels = torch.randn(2, 3, 16, 16)
    maps, logits = relevance_map(model, pixels)
    assert maps.shape == (2, grid, grid) and torch.allclose(maps.flatten(1).amax(1), torch.ones(2))
    other, _ = relevance_map(model, pixels, target=(logits.argmax(-1) + 1) % 3)  # a class not predicted
    assert not torch.allclose(maps, other)
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert torch.equal(logits.argmax(-1), model(pixel_values=pixels).logits.argmax(-1))


def test_a_randomised_transformer_changes_the_maps_and_only_the_transformer():
    model = tiny_model()
    randomised = faithfulness.randomised_transformer(model)
    before, after = model.state_dict(), randomised.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("hybrid_vit.layers.") for k in changed)
    correlation = faithfulness.sanity_check(model, torch.randn(8, 3, 16, 16))
    assert set(correlation) == set(faithfulness.MAP_METHODS)
    assert all(value < 0.99 for value in correlation.values()), correlation


def test_rank_correlation_is_spearmans():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [0.1, 5.0, 0.3, 9.0]])
    b = torch.tensor([[10.0, 20.0, 30.0, 40.0], [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    # Monotone transforms keep the ranks: 1 and -1; ranks (0, 2, 1, 3) against (0, 1, 2, 3): 1 - 6 * 2 / (4 * 15) = 0.8.
    torch.testing.assert_close(faithfulness.rank_correlation(a, b), torch.tensor([1.0, -1.0, 0.8]))


# ------------------------------------------------------------------------ temperature


def test_temperature_scaling_calibrates_overconfident_logits():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 10, generator=generator) * 2
    labels = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)  # calibrated at temperature 1
    overconfident = logits * 4
    temperature = fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(4, rel=0.1)  # undoes the sharpening
    before = expected_calibration_error(overconfident.softmax(-1), labels)
    after = expected_calibration_error((overconfident / temperature).softmax(-1), labels)
    assert after < 0.05 and before > 0.25


def test_the_saved_temperature_divides_the_logits_and_keeps_the_prediction():
    model = tiny_model()
    pixels = torch.randn(3, 3, 16, 16)
    plain = model(pixel_values=pixels).logits
    model.config.logit_temperature = 2.5
    scaled = model(pixel_values=pixels).logits
    torch.testing.assert_close(scaled, plain / 2.5)
    assert torch.equal(scaled.argmax(-1), plain.argmax(-1))
    with pytest.raises(ValueError, match="logit_temperature"):
        HybridViTConfig(**TINY_MODEL, logit_temperature=0)


# --------------------------------------------------------------------------- run_eval.py


@pytest.fixture
def overconfident_folder(tmp_path):
    """A saved tiny model that tells the tiny dataset's class 0 from the others by colour but
    takes every class-2 image for class 1, sure of both (right on two thirds, with a confidence
    near 1), from a run that held out half of the training split for validation (15 images)."""
    model = tiny_model()
    dataset = make_image_dataset(num_per_class=10, seed=0)  # dataset_dir's training split
    pixels = make_image_processor(model.config)(images=list(dataset["img"]), return_tensors="pt")["pixel_values"]
    labels = torch.tensor(list(dataset["label"]))
    with torch.no_grad():
        features = model.hybrid_vit(pixels).pooler_output  # (30, C)
        zero, rest = features[labels == 0].mean(0), features[labels != 0].mean(0)
        direction = zero - rest  # where class 0's colour takes the features; class 1 votes against it, class 2 never
        weight = torch.stack([direction, -direction, torch.zeros_like(direction)]) * 50 / direction.norm() ** 2
        model.classifier.weight.copy_(weight)
        model.classifier.bias.copy_(-weight @ (zero + rest) / 2)
    folder = tmp_path / "model"
    save_model_and_processor(model, folder)
    (folder / "train_config.yaml").write_text(yaml.safe_dump({"data": {"train_val_split": 0.5}, "training": {"seed": 0}}))
    return folder


def snapshot(folder: Path) -> dict:
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def evaluate(folder, dataset_dir, out, *extra) -> int:
    return run_eval.main(["--model", str(folder), "--dataset_name", str(dataset_dir), "--output_dir", str(out),
                          "--health_images", "0", "--faithfulness_images", "0", *extra])


def test_run_eval_fits_a_temperature_on_validation_and_leaves_the_model_folder_alone(overconfident_folder, dataset_dir, tmp_path):
    before = snapshot(overconfident_folder)
    assert evaluate(overconfident_folder, dataset_dir, tmp_path / "eval", "--split", "validation") == 0
    assert snapshot(overconfident_folder) == before  # byte for byte
    c = json.loads((tmp_path / "eval" / "eval_results.json").read_text())["calibration"]
    assert c["saved_temperature"] == 1.0 and c["ece"] == c["ece_at_temperature_1"]
    assert c["fitted_temperature"] > 1  # an overconfident model's probabilities are softened
    # On the test split, the calibration as saved, and nothing fitted there.
    assert evaluate(overconfident_folder, dataset_dir, tmp_path / "test") == 0
    c = json.loads((tmp_path / "test" / "eval_results.json").read_text())["calibration"]
    assert c["saved_temperature"] == 1.0 and "fitted_temperature" not in c and "ece_after_fitting" not in c
    assert snapshot(overconfident_folder) == before


def test_run_eval_saves_the_fitted_temperature_only_when_asked(overconfident_folder, dataset_dir, tmp_path, monkeypatch):
    before = snapshot(overconfident_folder)
    config_before = json.loads(before[Path("config.json")])
    monkeypatch.setenv("HOME", str(tmp_path))  # the folder named as a user may, from their home
    assert evaluate("~/model", dataset_dir, tmp_path / "eval", "--split", "validation", "--save_temperature") == 0
    fitted = json.loads((tmp_path / "eval" / "eval_results.json").read_text())["calibration"]
    after = snapshot(overconfident_folder)
    config_after = json.loads(after.pop(Path("config.json")))
    assert after == {name: data for name, data in before.items() if name != Path("config.json")}  # the weights untouched
    assert config_after.pop("logit_temperature") == pytest.approx(fitted["fitted_temperature"])
    assert config_after == {key: value for key, value in config_before.items() if key != "logit_temperature"}
    assert not (tmp_path / "~").exists()
    # The model now divides its logits by it: evaluated again, it is calibrated as the fit said.
    assert evaluate(overconfident_folder, dataset_dir, tmp_path / "again", "--split", "validation") == 0
    again = json.loads((tmp_path / "again" / "eval_results.json").read_text())["calibration"]
    assert again["saved_temperature"] == pytest.approx(fitted["fitted_temperature"])
    assert again["ece"] == pytest.approx(fitted["ece_after_fitting"], abs=1e-4)
    # The fit is of the undivided logits, so saving again would write the same temperature (to
    # the precision of the fit).
    assert again["fitted_temperature"] == pytest.approx(fitted["fitted_temperature"], rel=0.01)


def test_run_eval_refuses_to_save_a_temperature_from_another_split_and_writes_nothing(overconfident_folder, dataset_dir,
                                                                                      tmp_path, capsys):
    before = snapshot(overconfident_folder)
    out = tmp_path / "eval"
    assert evaluate(overconfident_folder, dataset_dir, out, "--save_temperature") == 2  # the default split is test
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "error: --save_temperature fits on the validation split, never on 'test': add --split validation")
    assert "Traceback" not in err
    assert not out.exists() and snapshot(overconfident_folder) == before
    with pytest.raises(SystemExit) as exit_info:  # a Hub id has no folder to write into
        run_eval.parse_args(["--model", "someone/model", "--save_temperature"])
    assert exit_info.value.code == 2 and "someone/model is a Hub id" in capsys.readouterr().err


def test_run_eval_writes_its_evaluation_into_the_card_only_when_asked_and_replaces_it(overconfident_folder, dataset_dir, tmp_path):
    card = overconfident_folder / "README.md"
    card.write_text("---\nlicense: apache-2.0\n---\n# model\n\n| metric | value |\n\n## Use\n\npipeline(...)\n")
    before = snapshot(overconfident_folder)
    assert evaluate(overconfident_folder, dataset_dir, tmp_path / "plain", "--split", "validation") == 0
    assert snapshot(overconfident_folder) == before
    for run in ("first", "second"):
        assert evaluate(overconfident_folder, dataset_dir, tmp_path / run, "--split", "validation", "--tta", "--add_to_card") == 0
    results = json.loads((tmp_path / "second" / "eval_results.json").read_text())
    text = card.read_text()
    assert text.count("## Evaluation") == 1 and text.index("## Evaluation") < text.index("## Use")  # replaced, before the usage
    assert text.startswith("---\nlicense: apache-2.0\n---\n# model") and text.rstrip().endswith("pipeline(...)")
    assert f"| accuracy | {results['accuracy']:.4f} |" in text
    assert f"| accuracy with flip test-time augmentation | {results['accuracy_flip_tta']:.4f} |" in text
    fitted = results["calibration"]
    assert f"fitted on this split | {fitted['ece_after_fitting']:.2%} |" in text
    assert f"`python run_eval.py --model {overconfident_folder.name} --dataset_name {dataset_dir.name} --output_dir second" in text
    assert "--add_to_card" in text and str(tmp_path) not in text  # the command that measured it, without local paths
    assert {name: data for name, data in snapshot(overconfident_folder).items() if name != Path("README.md")} == {
        name: data for name, data in before.items() if name != Path("README.md")}  # nothing else changed


def test_run_eval_reports_the_faithfulness_of_the_maps_on_a_sample(dataset_dir, tmp_path, capsys):
    folder = tmp_path / "model"
    save_model_and_processor(tiny_model(), folder)
    out = tmp_path / "eval"
    assert run_eval.main(["--model", str(folder), "--dataset_name", str(dataset_dir), "--output_dir", str(out),
                          "--health_images", "0", "--faithfulness_images", "5"]) == 0
    f = json.loads((out / "eval_results.json").read_text())["faithfulness"]
    assert f["num_images"] == 5 and f["followed_class"] == "predicted"
    names = (*faithfulness.MAP_METHODS, "random", "average_map")
    assert set(f["mean_curves"]) == set(names)
    # The whole image, and the blank one, score the same whatever order the tokens go in.
    for end in (0, -1):
        deletion = {f["mean_curves"][name]["deletion"][end] for name in names}
        insertion = {f["mean_curves"][name]["insertion"][-1 - end] for name in names}
        assert max(deletion) - min(deletion) < 1e-5 and max(insertion) - min(insertion) < 1e-5
        assert next(iter(deletion)) == pytest.approx(next(iter(insertion)), abs=1e-5)
    gaps = {m: f[m]["insertion_auc"] - f[m]["deletion_auc"] for m in faithfulness.MAP_METHODS}
    assert f["most_faithful"] == max(gaps, key=gaps.get) and f["average_map"]["of"] == f["most_faithful"]
    assert set(f["sanity_check_rank_correlation"]) == set(faithfulness.MAP_METHODS)
    assert f"most faithful map: {f['most_faithful']} (following the predicted class)" in capsys.readouterr().out
    assert (out / "faithfulness.png").is_file()
