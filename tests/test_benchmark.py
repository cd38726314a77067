"""benchmark.py measures, for each config, the hybrid ViT and the stock ViT of the same width,
depth and token count (none for the backbone alone), with the optimisers the config trains
with, and writes a JSON report and a markdown table of the same numbers."""

import json
from dataclasses import asdict

import pytest
import torch

import benchmark
from configuration_hybrid_vit import HybridViTConfig
from modeling_hybrid_vit import HybridViTForImageClassification
from training_settings import load_settings

# Models are 32x32 (image_size is not a setting): backbone widths small enough to time in a blink.
TINY = {"backbone_hidden_sizes": [8, 16], "token_stages": 1, "hidden_size": 16, "num_hidden_layers": 2,
        "class_attention_layers": 0, "num_attention_heads": 2, "intermediate_size": 32}
BACKBONE_ONLY = {"backbone_hidden_sizes": [8, 16], "token_stages": 1, "num_hidden_layers": 0, "class_attention_layers": 0,
                 "pooling": "mean"}


@pytest.fixture(autouse=True)
def one_thread():
    """Models this small are timed in a blink on one thread; two threads on a shared 2-core
    machine spent ten times as long synchronising."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_config(path, model, extra=""):
    path.write_text("model:\n" + "".join(f"  {key}: {value}\n" for key, value in model.items()) + extra)
    return path


def run_benchmark(dataset_dir, tmp_path, configs, *args):
    """benchmark.main on `configs` with tiny sizes; returns the JSON report and the markdown table."""
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    benchmark.main([
        "--configs", *map(str, configs), *args, "--dataset_name", str(dataset_dir), "--batch_size", "4",
        "--inference_batch_size", "8", "--warmup", "1", "--repeats", "1", "--max_samples", "16", "--matmul_size", "64",
        "--mixed_precision", "no", "--output_json", str(out_json), "--output_md", str(out_md),
    ])
    return json.loads(out_json.read_text()), out_md.read_text()


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_each_config_gets_our_model_and_the_stock_vit_of_its_size_except_the_backbone_alone(dataset_dir, tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    tiny = write_config(tmp_path / "tiny.yaml", TINY)
    backbone = write_config(tmp_path / "backbone.yaml", BACKBONE_ONLY)
    report, table = run_benchmark(dataset_dir, tmp_path, [tiny, backbone])
    rows = report["results"]
    assert [(row["config"], row["model"]) for row in rows] == [
        (str(tiny), "hybrid-vit"), (str(tiny), "stock-vit"), (str(backbone), "hybrid-vit")]  # no ViT twin for no blocks
    ours, vit, alone = rows
    # Each row measured the model its config describes (layered over default.yaml)...
    assert ours["parameters"] == parameters(HybridViTForImageClassification(HybridViTConfig(**TINY)))
    assert alone["parameters"] == parameters(HybridViTForImageClassification(HybridViTConfig(**BACKBONE_ONLY)))
    # ...and the stock ViT has its width, depth, heads, MLP and token count: 4x4 patches, 64 tokens.
    stock = ViTConfig(image_size=32, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=32, num_labels=10)
    assert vit["parameters"] == parameters(ViTForImageClassification(stock))
    assert ours["tokens"] == vit["tokens"] == 64
    # The hybrid steps the run's two optimisers; the stock ViT, AdamW alone.
    assert [row["optimizer"] for row in rows] == ["SGD + AdamW", "AdamW", "SGD + AdamW"]
    for row in rows:
        assert 2 < row["train_gflops_per_image"] / row["forward_gflops_per_image"] < 4  # a step is about three passes
        assert row["train_gflops_per_second"] == pytest.approx(row["train_gflops_per_image"] * row["train_images_per_second"])
        assert row["fraction_of_matmul"] == pytest.approx(row["train_gflops_per_second"] / report["matmul_gflops_float32"])
    # The convolutions cost more than a 16-wide encoder: the hybrid does more work per image.
    assert ours["forward_gflops_per_image"] > vit["forward_gflops_per_image"]
    assert report["settings"] == {"mixed_precision": "no", "batch_size": 4, "inference_batch_size": 8}
    assert report["matmul_gflops_bfloat16"] is None  # only timed where the run uses bf16
    # The table holds the same numbers, one line per row.
    lines = [line for line in table.splitlines() if line.startswith(f"| {tiny}") or line.startswith(f"| {backbone}")]
    assert len(lines) == 3
    for line, row in zip(lines, rows):
        assert line.startswith(f"| {row['config']} | {row['model']} | {row['optimizer']} | {row['parameters'] / 1e6:.2f} M "
                               f"| {row['tokens']} | {row['train_gflops_per_image']:.3f} "
                               f"| {row['train_images_per_second_with_data']:.0f} | {row['train_images_per_second']:.0f} |")
        assert line.endswith(f"| {row['inference_images_per_second']:.0f} | {row['latency_ms_batch_1']:.2f} |")
    assert f"float32 {report['matmul_gflops_float32']:.0f} GFLOP/s" in table


def test_models_option_times_only_the_named_models_with_the_configs_optimiser_settings(dataset_dir, tmp_path, monkeypatch):
    """--models hybrid-vit leaves the stock ViT out; the optimisers are made from the config's
    optimizer section, as run_train.py makes them; default.yaml stands for itself, unchanged."""
    made = []

    def make_optimizers(model, settings):
        made.append(asdict(settings))
        return original(model, settings)

    original = benchmark.make_optimizers
    monkeypatch.setattr(benchmark, "make_optimizers", make_optimizers)
    tiny = write_config(tmp_path / "tiny.yaml", TINY, "optimizer:\n  learning_rate: 0.05\n  transformer_learning_rate: 0.002\n")
    report, table = run_benchmark(dataset_dir, tmp_path, ["default.yaml", tiny], "--models", "hybrid-vit")
    assert [(row["config"], row["model"]) for row in report["results"]] == [("default.yaml", "hybrid-vit"), (str(tiny), "hybrid-vit")]
    assert "| stock-vit |" not in table
    assert report["results"][0]["parameters"] == parameters(HybridViTForImageClassification(HybridViTConfig()))
    default = load_settings([]).optimizer
    assert [(s["learning_rate"], s["transformer_learning_rate"]) for s in made] == [
        (default.learning_rate, default.transformer_learning_rate), (0.05, 0.002)]
