"""benchmark.py measures both models for a config and writes its JSON and table."""

import json

import benchmark
from tests.conftest import TINY_MODEL


def run_tiny_benchmark(dataset_dir, tmp_path, model_extra, *args):
    """benchmark.main on TINY_MODEL plus `model_extra` (YAML lines under model:), decoded
    tensors, and tiny sizes; returns the JSON report and the markdown table."""
    config = tmp_path / "tiny.yaml"
    model = "\n".join(f"  {key}: {value}" for key, value in TINY_MODEL.items())
    config.write_text(f"model:\n{model}\n{model_extra}data:\n  decode_once: true\n  mixup_alpha: 0.0\n")
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    benchmark.main([
        "--configs", str(config), *args, "--dataset_name", str(dataset_dir), "--batch_size", "4",
        "--inference_batch_size", "8", "--warmup", "1", "--max_samples", "16",
        "--output_json", str(out_json), "--output_md", str(out_md),
    ])
    return json.loads(out_json.read_text()), out_md.read_text()


def test_benchmark_writes_json_and_table_for_ours_and_the_stock_vit(dataset_dir, tmp_path):
    report, table = run_tiny_benchmark(
        dataset_dir, tmp_path, "  attn_implementation: eager\n", "--repeats", "2", "--matmul_size", "128"
    )
    assert [row["model"] for row in report["results"]] == ["hybrid-vit", "stock-vit"]
    ours, vit = report["results"]
    assert ours["tokens"] == vit["tokens"] == (16 // 4) ** 2
    assert ours["attention"] == vit["attention"] == "eager"  # both run the config's attention code path
    for row in report["results"]:
        for key in ("train_images_per_second", "train_images_per_second_with_data", "inference_images_per_second",
                    "latency_ms_batch_1", "train_gflops_per_image", "fraction_of_matmul"):
            assert row[key] > 0, (row["model"], key)
        # A training step costs about three forward passes.
        assert 2 < row["train_gflops_per_image"] / row["forward_gflops_per_image"] < 4
    assert report["matmul_gflops_float32"] > 0 and report["machine"]["cores"] >= 1
    # default.yaml's optimiser, Nesterov SGD, for both
    assert "| hybrid-vit | eager | SGD |" in table and "| stock-vit | eager | SGD |" in table and "GFLOP/s" in table


def test_benchmark_steps_the_optimiser_the_config_trains_with(dataset_dir, tmp_path):
    """A config that trains with AdamW (default.yaml's is SGD) must be timed with AdamW."""
    report, table = run_tiny_benchmark(
        dataset_dir, tmp_path, "training:\n  optimizer: adamw\n  weight_decay: 0.05\n",
        "--models", "hybrid-vit", "--repeats", "1", "--matmul_size", "64",
    )
    assert [row["optimizer"] for row in report["results"]] == ["AdamW"]
    assert "| hybrid-vit | sdpa | AdamW |" in table


def test_models_option_measures_only_the_models_named(dataset_dir, tmp_path):
    report, table = run_tiny_benchmark(
        dataset_dir, tmp_path, "  backbone_whitening_size: 2\n", "--models", "hybrid-vit", "--repeats", "1", "--matmul_size", "64"
    )
    assert [row["model"] for row in report["results"]] == ["hybrid-vit"]
    assert "| stock-vit |" not in table
