"""run_train.py's settings: default.yaml holds every value, training_settings.py every
meaning and type; `--help` lists them all; the command line's forms; settings that no
recipe uses still do what they say."""

import json
import re
import subprocess
import sys
from dataclasses import fields

import pytest
import torch
import yaml

import cifar10_data
import training_settings
from configuration_hybrid_vit import HybridViTConfig
from modeling_hybrid_vit import HybridViTForImageClassification
from run_folder import UserError
from tests.conftest import PROJECT_ROOT
from tests.test_training import base_args, train


def test_default_yaml_and_the_settings_dataclasses_name_the_same_keys():
    defaults = yaml.safe_load((PROJECT_ROOT / "default.yaml").read_text())
    assert set(defaults) == set(training_settings.SECTIONS)
    for section, dataclass in training_settings.SECTIONS.items():
        assert set(defaults[section]) == {f.name for f in fields(dataclass)}, section
        assert all(f.metadata.get("help") for f in fields(dataclass)), section


def test_help_lists_every_setting_with_its_meaning_and_default():
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "run_train.py"), "--config", "configs/cpu.yaml", "--help"],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    text = " ".join(result.stdout.split())  # argparse wraps lines
    for dataclass in training_settings.SECTIONS.values():
        for f in fields(dataclass):
            assert f"--{f.name}" in text, f.name
            assert " ".join(f.metadata["help"].split()[:4]) in text, f.name
    # configs/cpu.yaml's value, not default.yaml's 512
    assert re.search(r"--per_device_train_batch_size PER_DEVICE_TRAIN_BATCH_SIZE.{0,120}training images per process and step \(default: 128\)", text)


def test_command_line_forms_nulls_lists_and_flags():
    settings = training_settings.load_settings([
        "--max_train_samples", "200", "--max_train_samples", "null", "--backbone_hidden_sizes", "32", "64", "128",
        "--push_to_hub", "--hub_model_id=org/name", "--horizontal-flip", "false", "--checkpointing_steps", "null",
    ])
    assert settings["data"]["max_train_samples"] is None and settings["training"]["checkpointing_steps"] is None
    assert settings["model"]["backbone_hidden_sizes"] == [32, 64, 128]
    assert settings["training"]["push_to_hub"] is True and settings["data"]["horizontal_flip"] is False
    assert training_settings.load_settings(["--backbone_hidden_sizes=[8,16]"])["model"]["backbone_hidden_sizes"] == [8, 16]
    for argv, message in ((["--horizontal_flip", "maybe"], "--horizontal_flip expects true or false"),
                          (["--seed", "1.5"], "--seed expects an integer, got '1.5'"),
                          (["stray"], "unexpected argument 'stray'"),
                          (["--patch_size", "8"], "unknown setting --patch_size")):
        with pytest.raises(UserError, match=message):
            training_settings.load_settings(argv)


def test_patch_size_is_derived_from_the_backbone():
    assert HybridViTConfig(backbone_hidden_sizes=[8, 16]).patch_size == 4
    assert HybridViTConfig().patch_size == 8 and HybridViTConfig().num_patches == 16
    with pytest.raises(ValueError, match="downsample by 4, but `patch_size` is 8"):
        HybridViTConfig(backbone_hidden_sizes=[8, 16], patch_size=8)


def test_qkv_bias_false_builds_projections_without_bias():
    settings = training_settings.load_settings(["--qkv_bias", "false"])
    model = HybridViTForImageClassification(HybridViTConfig(**settings["model"]))
    with_bias = HybridViTForImageClassification(HybridViTConfig(**{**settings["model"], "qkv_bias": True}))
    assert all(layer.attention.to_qkv.bias is None for layer in model.hybrid_vit.layers)
    assert with_bias.num_parameters() - model.num_parameters() == 3 * settings["model"]["hidden_size"] * settings["model"]["num_hidden_layers"]


@pytest.mark.parametrize("switch, cutmix", [(0.0, False), (1.0, True)])
def test_mix_switch_prob_chooses_between_mixup_and_cutmix(switch, cutmix):
    """With both on, 0 always mixes the whole images (MixUp), 1 always pastes a box (CutMix)."""
    rows = [{"pixel_values": torch.full((3, 8, 8), float(i)), "labels": i % 4, "__index__": i} for i in range(8)]
    for epoch in range(5):
        collator = cifar10_data.MixCollator(4, mixup_alpha=1.0, cutmix_alpha=1.0, mix_prob=1.0, mix_switch_prob=switch, seed=epoch)
        batch = collator(rows)["pixel_values"]
        whole_values = torch.stack([(image == float(i)).float().mean() for i, image in enumerate(batch)])
        # CutMix keeps part of each image exactly as it was; MixUp changes every pixel alike.
        pasted = bool(((whole_values > 0) & (whole_values < 1)).any())
        assert pasted == cutmix, (epoch, whole_values)


def test_bf16_trains_end_to_end_where_it_is_native(dataset_dir, tmp_path, env):
    import run_train

    if run_train.bf16_matmul_speedup() < 1:
        pytest.skip("bf16 is emulated on this CPU (a tiny run would still pass, slowly)")
    out = tmp_path / "run"
    result = train(base_args(dataset_dir, out, "--max_train_steps=3", "--mixed_precision=bf16"), env)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["mixed_precision"] == "bf16" and 0 <= results["eval_accuracy"] <= 1


def test_an_unreachable_hub_dataset_ends_in_one_line_that_names_the_fix(tmp_path, env):
    out = tmp_path / "run"
    result = train(["--dataset_name", "someone/no-such-dataset", "--output_dir", str(out), "--max_train_steps=1"], env)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: could not load dataset 'someone/no-such-dataset'") and "--dataset_name FOLDER" in lines[-1]
    assert "Traceback" not in result.stderr and len(lines) <= 3, result.stderr
    assert not out.exists()
