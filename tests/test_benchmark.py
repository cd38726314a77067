"""benchmark.py measures both models for a config and writes its JSON and table."""

import json

import benchmark
from tests.conftest import TINY_MODEL


def test_benchmark_writes_json_and_table_for_ours_and_the_stock_vit(dataset_dir, tmp_path):
    config = tmp_path / "tiny.yaml"
    model = "\n".join(f"  {key}: {value}" for key, value in TINY_MODEL.items())
    config.write_text(f"model:\n{model}\n  attn_implementation: eager\ndata:\n  decode_once: true\n  mixup_alpha: 0.0\n")
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    benchmark.main([
        "--configs", str(config), "--dataset_name", str(dataset_dir), "--batch_size", "4",
        "--inference_batch_size", "8", "--warmup", "1", "--repeats", "2", "--matmul_size", "128",
        "--max_samples", "16", "--output_json", str(out_json), "--output_md", str(out_md),
    ])
    report = json.loads(out_json.read_text())
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
    table = out_md.read_text()
    assert "| hybrid-vit | eager |" in table and "| stock-vit | eager |" in table and "GFLOP/s" in table


def test_models_option_measures_only_the_models_named(dataset_dir, tmp_path):
    config = tmp_path / "tiny.yaml"
    model = "\n".join(f"  {key}: {value}" for key, value in TINY_MODEL.items())
    config.write_text(f"model:\n{model}\n  backbone_whitening_size: 2\ndata:\n  decode_once: true\n  mixup_alpha: 0.0\n")
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    benchmark.main([
        "--configs", str(config), "--models", "hybrid-vit", "--dataset_name", str(dataset_dir), "--batch_size", "4",
        "--inference_batch_size", "8", "--warmup", "1", "--repeats", "1", "--matmul_size", "64",
        "--max_samples", "16", "--output_json", str(out_json), "--output_md", str(out_md),
    ])
    assert [row["model"] for row in json.loads(out_json.read_text())["results"]] == ["hybrid-vit"]
    assert "| stock-vit |" not in out_md.read_text()
