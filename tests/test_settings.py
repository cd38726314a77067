"""run_train.py's settings: each default has one home (HybridViTConfig for the architecture,
default.yaml for the rest), training_settings.py holds every meaning and type, `--help` lists
them all, config files and the command line layer in order, and a bad value stops the run in
one line that names the setting."""

import re
import subprocess
import sys
from dataclasses import fields

import pytest
import yaml

import training_settings
from configuration_hybrid_vit import HybridViTConfig
from errors import UserError
from tests.conftest import PROJECT_ROOT

MAX_SETTINGS = 40


def test_default_yaml_holds_every_setting_but_the_architecture_whose_defaults_are_the_configs():
    defaults = yaml.safe_load((PROJECT_ROOT / "default.yaml").read_text())
    assert set(defaults) == set(training_settings.SECTIONS)
    assert defaults["model"] == {}  # the architecture's defaults live in HybridViTConfig only
    for section, dataclass in training_settings.SECTIONS.items():
        if section != "model":
            assert set(defaults[section]) == {f.name for f in fields(dataclass)}, section
        assert all(f.metadata.get("help") for f in fields(dataclass)), section
    settings = training_settings.load_settings([])
    config = HybridViTConfig()
    for f in fields(training_settings.ModelSettings):
        assert getattr(settings.model, f.name) == getattr(config, f.name), f.name


def test_the_default_settings_are_the_design_that_works():
    """64 pyramid tokens read by one class-attention block, SGD for the convolutions and
    AdamW for the transformer, no label smoothing, the schedule fitted to 20 minutes."""
    settings = training_settings.load_settings([])
    assert settings.model.token_stages == 2 and HybridViTConfig().num_patches == 64
    assert settings.model.num_hidden_layers == settings.model.class_attention_layers == 1
    assert settings.optimizer.learning_rate == 0.2 and settings.optimizer.transformer_learning_rate == 1e-3
    assert settings.data.label_smoothing == 0.0 and settings.data.auto_augment == "none"
    assert settings.schedule.num_train_epochs == "auto" and settings.schedule.max_train_minutes == 20
    assert settings.training.mixed_precision == "auto"


def test_help_lists_every_setting_with_its_meaning_and_its_layered_default():
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "run_train.py"), "--config", "configs/backbone_only.yaml", "--help"],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    text = " ".join(result.stdout.split())  # argparse wraps lines
    options = set(re.findall(r"--(\w+) [A-Z_]+", text)) | set(re.findall(r"--(\w+) \[", text))
    names = {f.name for dataclass in training_settings.SECTIONS.values() for f in fields(dataclass)}
    assert names <= options and len(names) + 1 <= MAX_SETTINGS  # and --config
    for dataclass in training_settings.SECTIONS.values():
        for f in fields(dataclass):
            assert " ".join(f.metadata["help"].split()[:4]) in text, f.name
    # configs/backbone_only.yaml's value, not HybridViTConfig's 1
    assert re.search(r"--num_hidden_layers NUM_HIDDEN_LAYERS, [^(]{0,60}transformer blocks.{0,120}\(default: 0\)", text)
    assert re.search(r"--max_train_minutes MAX_TRAIN_MINUTES, [^(]{0,200}\(default: 20\)", text)


def test_files_and_the_command_line_layer_in_order(tmp_path):
    overlay = tmp_path / "over.yaml"
    overlay.write_text("optimizer:\n  learning_rate: 0.01\nschedule:\n  num_train_epochs: 3\nmodel:\n  backbone_hidden_sizes: [32, 64, 128]\n")
    settings = training_settings.load_settings(["--config", str(overlay), "--learning_rate", "1e-3", "--max_train_samples", "200",
                                                "--checkpointing_steps", "50"])
    assert settings.optimizer.learning_rate == 1e-3  # the command line wins over the file
    assert settings.schedule.num_train_epochs == 3
    assert settings.model.backbone_hidden_sizes == [32, 64, 128]
    assert settings.data.max_train_samples == 200 and settings.training.checkpointing_steps == 50
    assert settings.to_dict()["optimizer"]["learning_rate"] == 1e-3


def test_command_line_forms_nulls_lists_and_flags():
    settings = training_settings.load_settings([
        "--max_train_samples", "200", "--max_train_samples", "null", "--backbone_hidden_sizes", "32", "64", "128",
        "--push_to_hub", "--hub_model_id=org/name", "--skip_bad_images", "true", "--checkpointing_steps", "null",
    ])
    assert settings.data.max_train_samples is None and settings.training.checkpointing_steps is None
    assert settings.model.backbone_hidden_sizes == [32, 64, 128]
    assert settings.training.push_to_hub is True and settings.data.skip_bad_images is True
    assert training_settings.load_settings(["--backbone_hidden_sizes=[8,16]"]).model.backbone_hidden_sizes == [8, 16]
    assert training_settings.load_settings(["--backbone_hidden_sizes", "8,16"]).model.backbone_hidden_sizes == [8, 16]
    # the last word on a setting wins, null or not
    assert training_settings.load_settings(["--checkpointing_steps", "null", "--checkpointing_steps=5"]).training.checkpointing_steps == 5
    assert training_settings.load_settings(["--checkpointing_steps=5", "--checkpointing_steps=null"]).training.checkpointing_steps is None


def test_a_step_count_overrides_a_schedule_fitted_to_the_time():
    """A smoke run with an explicit step count just runs, whatever the config's epochs say."""
    settings = training_settings.load_settings(["--max_train_steps", "20"])
    assert settings.schedule.num_train_epochs == "auto" and settings.schedule.max_train_steps == 20
    settings = training_settings.load_settings(["--num_train_epochs", "auto", "--max_train_minutes", "null", "--max_train_steps", "20"])
    assert settings.schedule.max_train_steps == 20


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--no_such_setting", "3"], "unknown setting --no_such_setting"),
        (["--patch_size", "8"], "unknown setting --patch_size"),  # architecture fields that are not settings
        (["stray"], "unexpected argument 'stray'"),
        (["--learning_rate", "fast"], "--learning_rate expects a number, got 'fast'"),
        (["--seed", "1.5"], "--seed expects an integer, got '1.5'"),
        (["--skip_bad_images", "maybe"], "--skip_bad_images expects true or false"),
        (["--learning_rate", "-1"], "--learning_rate must be > 0, got -1.0"),
        (["--transformer_weight_decay", "-0.1"], "--transformer_weight_decay must be >= 0, got -0.1"),
        (["--mixed_precision", "fp8"], "--mixed_precision must be auto, bf16 or no, got 'fp8'"),
        (["--mixed_precision", "fp16"], "--mixed_precision fp16 is not offered: the backbone and the transformer have optimisers"),
        (["--num_train_epochs", "auto", "--max_train_minutes", "null"], "--num_train_epochs must be a number unless --max_train_minutes is set"),
        (["--num_train_epochs", "soon"], "--num_train_epochs expects a number or auto, got 'soon'"),
        (["--max_train_minutes", "0"], "--max_train_minutes must be > 0 or null, got 0.0"),
        (["--warmup_ratio", "1"], "--warmup_ratio must be in [0, 1), got 1.0"),
        (["--auto_augment", "cutout"], "--auto_augment must be one of autoaugment, randaugment, trivialaugment, none"),
        (["--mixup_alpha", "-1"], "--mixup_alpha must be >= 0"),
        (["--label_smoothing", "1"], "--label_smoothing must be in [0, 1), got 1.0"),
        (["--train_val_split", "1.5"], "--train_val_split must be in (0, 1), got 1.5"),
        (["--max_train_samples", "0"], "--max_train_samples must be a positive integer or null, got 0"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be a positive integer, got 0"),
        (["--checkpointing_steps", "often"], "--checkpointing_steps must be a positive integer, epoch or null, got 'often'"),
        (["--report_to", "wandb"], "--report_to must be tensorboard or none, got 'wandb'"),
        (["--push_to_hub", "true"], "--hub_model_id must be set when --push_to_hub is true"),
        (["--num_hidden_layers", "0"], "`num_hidden_layers` 0 needs `pooling` 'mean'"),
        (["--pooling", "max"], "`pooling` must be 'cls' or 'mean', got 'max'"),
        (["--hidden_size", "30", "--num_attention_heads", "4"], "`hidden_size` (30) must be divisible"),
        (["--token_stages", "4"], "`token_stages` must be an integer from 1 to the number of backbone stages (3)"),
        (["--config", "/nonexistent.yaml"], "config file not found: /nonexistent.yaml"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(argv, message):
    with pytest.raises(UserError) as raised:
        training_settings.load_settings(argv)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_config_file_with_an_unknown_key_or_section_names_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  cutout_size: 12\n")
    with pytest.raises(UserError, match="bad.yaml: unknown setting data.cutout_size"):
        training_settings.load_settings(["--config", str(bad)])
    bad.write_text("trainer:\n  seed: 1\n")
    with pytest.raises(UserError, match="unknown section 'trainer'"):
        training_settings.load_settings(["--config", str(bad)])


def test_every_setting_is_used_by_a_test_other_than_this_file():
    """A setting that nothing exercises is a setting that does not work."""
    tests = "\n".join(path.read_text() for path in (PROJECT_ROOT / "tests").glob("test_*.py") if path.name != "test_settings.py")
    unused = [f.name for dataclass in training_settings.SECTIONS.values() for f in fields(dataclass) if f.name not in tests]
    assert not unused, unused


def test_the_release_config_is_the_default_design_trained_for_fixed_epochs_from_a_fixed_seed():
    """configs/release.yaml changes only the schedule, the seed and the folder: the same model on
    any machine however long it takes; layered with configs/backbone_only.yaml, it is the control."""
    default = training_settings.load_settings([])
    release = training_settings.load_settings(["--config", "configs/release.yaml"])
    assert release.model == default.model and release.data == default.data and release.optimizer == default.optimizer
    assert release.schedule.max_train_minutes is None and release.schedule.num_train_epochs >= 25
    assert release.training.seed == 0 and release.training.mixed_precision == "auto"
    control = training_settings.load_settings(["--config", "configs/release.yaml", "--config", "configs/backbone_only.yaml"])
    assert control.schedule == release.schedule and control.training.seed == 0
    assert control.model.num_hidden_layers == control.model.class_attention_layers == 0
