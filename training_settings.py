"""The settings of a training run: what each one means and its type (one dataclass per stage
of run_train.py), and how a run's settings are put together: default.yaml, then each
`--config FILE` layered on top, then `--key value` overrides, then checks that stop a bad run
before anything is written.

Each default has one home. The architecture's are `HybridViTConfig`'s (the model section of a
config file only overrides them); every other value is default.yaml's. The dataclasses carry
types and one-line meanings, and a test holds them to default.yaml's keys. The command line
is parsed by transformers' HfArgumentParser over the dataclasses, the ecosystem's convention,
so `--help` lists every setting with its meaning and its default after the layering. Two
conveniences it lacks are added before parsing: `null` for "unset", and lists written
`64,128` as well as `64 128`.
"""

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from errors import UserError

DEFAULT_CONFIG = Path(__file__).resolve().with_name("default.yaml")
AUTO_AUGMENT_CHOICES = ("autoaugment", "randaugment", "trivialaugment", "none")
MIXED_PRECISION_CHOICES = ("auto", "no", "bf16")


def meaning(text: str):
    """A dataclass field whose default lives elsewhere (default.yaml, HybridViTConfig)."""
    return field(metadata={"help": text})


@dataclass
class ModelSettings:
    """The architecture: overrides of HybridViTConfig, whose own defaults these are."""

    backbone_hidden_sizes: list[int] = meaning("channels of each convolutional stage; each stage halves the resolution")
    token_stages: int = meaning("how many of the last stages make the tokens: 1, the last stage's grid; 2, a feature "
                                "pyramid on the grid of the stage before it (twice as fine)")
    hidden_size: int = meaning("width of the transformer's tokens")
    num_hidden_layers: int = meaning("transformer blocks; 0: the backbone alone (with pooling mean), the control")
    class_attention_layers: int = meaning("how many of the blocks, the last ones, are class-attention blocks (CaiT): "
                                          "only the CLS token queries and is updated")
    num_attention_heads: int = meaning("attention heads per block (hidden_size must divide by it)")
    intermediate_size: int = meaning("width of each block's MLP")
    pooling: str = meaning("cls | mean: the classifier reads the CLS token, or the mean of the patch tokens")


@dataclass
class DataSettings:
    """The splits, the loaders and the augmentation (cifar10_data.py)."""

    dataset_name: str = meaning("a Hub id (uoft-cs/cifar10), or a local folder of parquet files or an imagefolder tree")
    train_val_split: float = meaning("fraction of train held out for validation (stratified, seeded) when the dataset "
                                     "has no validation split")
    max_train_samples: Optional[int] = meaning("use only this many training images (quick runs); null: all")
    max_eval_samples: Optional[int] = meaning("evaluate on only this many images; null: all")
    per_device_train_batch_size: int = meaning("training images per process and step")
    per_device_eval_batch_size: int = meaning("evaluation images per process and batch")
    auto_augment: str = meaning("autoaugment (the CIFAR-10 policy) | randaugment | trivialaugment | none; random crop "
                                "and flip always apply")
    mixup_alpha: float = meaning("Beta(alpha, alpha) for MixUp (e.g. 0.8); 0: no MixUp")
    cutmix_alpha: float = meaning("Beta(alpha, alpha) for CutMix (e.g. 1.0); 0: no CutMix; with both, each batch gets "
                                  "one at even odds")
    label_smoothing: float = meaning("label smoothing of the cross-entropy")
    skip_bad_images: bool = meaning("skip (and count) undecodable images instead of stopping")


@dataclass
class OptimizerSettings:
    """Nesterov SGD for the convolutional backbone, AdamW for the transformer (run_train.py)."""

    learning_rate: float = meaning("the backbone's peak learning rate, after warmup (Nesterov SGD, momentum 0.9)")
    weight_decay: float = meaning("the backbone's weight decay, added to the gradient (not on BatchNorm or biases)")
    transformer_learning_rate: float = meaning("peak learning rate of the rest: token projections, CLS token, position "
                                               "embeddings, blocks and head (AdamW)")
    transformer_weight_decay: float = meaning("AdamW's decoupled weight decay (not on norms, biases, positions or CLS)")


@dataclass
class ScheduleSettings:
    """How long training lasts: linear warmup, then cosine decay to zero."""

    num_train_epochs: str = meaning("epochs of the schedule, or auto: as many steps as fit into max_train_minutes, the "
                                    "schedule fitted to that time from the run's measured speed")
    max_train_steps: Optional[int] = meaning("optimisation steps of the schedule; when set, overrides num_train_epochs")
    max_train_minutes: Optional[float] = meaning("training time: a fixed schedule stops cleanly here, a fitted one "
                                                 "ends here; then evaluate and save")
    warmup_ratio: float = meaning("fraction of the optimisation steps spent warming up")


@dataclass
class TrainingSettings:
    """The run: seed, precision, checkpoints, logs and outputs."""

    output_dir: str = meaning("folder of the trained model, its card, results and checkpoints")
    seed: int = meaning("seeds the weights, the validation split, the data order and every augmentation")
    mixed_precision: str = meaning("auto (bf16 where the hardware runs it natively, else float32) | bf16 | no")
    checkpointing_steps: Optional[str] = meaning("save a resumable checkpoint every N optimisation steps, or each "
                                                 "epoch; null: never. The newest two are kept")
    resume_from_checkpoint: Optional[str] = meaning("a checkpoint folder, or latest (the newest complete one in output_dir)")
    logging_steps: int = meaning("log the training loss and learning rates every N optimisation steps")
    report_to: str = meaning("tensorboard | none")
    push_to_hub: bool = meaning("upload the trained folder to the Hub at the end")
    hub_model_id: Optional[str] = meaning("the Hub repository to push to (owner/name)")


SECTIONS = {
    "model": ModelSettings,
    "data": DataSettings,
    "optimizer": OptimizerSettings,
    "schedule": ScheduleSettings,
    "training": TrainingSettings,
}


@dataclass
class Settings:
    """A run's settings, one typed section per stage of run_train.py."""

    model: ModelSettings
    data: DataSettings
    optimizer: OptimizerSettings
    schedule: ScheduleSettings
    training: TrainingSettings

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}


def fields_of(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(SECTIONS[section])}


def section_of(key: str) -> str:
    return next(name for name in SECTIONS if key in fields_of(name))


def model_defaults() -> dict:
    """The architecture settings' defaults: HybridViTConfig's."""
    from configuration_hybrid_vit import HybridViTConfig

    config = HybridViTConfig()
    return {name: getattr(config, name) for name in fields_of("model")}


def read_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"cannot parse {path}: {str(error).splitlines()[0]}") from error
    if not isinstance(content, dict) or not all(isinstance(v, dict) or v is None for v in content.values()):
        raise UserError(f"{path} must map sections ({', '.join(SECTIONS)}) to settings")
    for section, values in content.items():
        if section not in SECTIONS:
            raise UserError(f"{path}: unknown section {section!r} (expected {', '.join(SECTIONS)})")
        for name in values or {}:
            if name not in fields_of(section):
                raise UserError(f"{path}: unknown setting {section}.{name}")
    return {section: values or {} for section, values in content.items()}


def make_parser(defaults: dict):
    """HfArgumentParser over the sections, whose argparse exits become one UserError line."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message):
            raise UserError(readable(message))

    parser = Parser(
        tuple(SECTIONS.values()), allow_abbrev=False, prog="run_train.py",
        description="Train the hybrid ViT on CIFAR-10. Settings come from default.yaml (the architecture's from "
                    "HybridViTConfig), then each --config FILE, then --key value; each option shows its default after "
                    "that layering.",
    )
    parser.add_argument("--config", action="append", metavar="FILE", help="a YAML file of overrides, layered in order")
    for action in parser._actions:  # the layered defaults supply every value: nothing is required
        action.required = False
    parser.set_defaults(**{key: value for values in defaults.values() for key, value in values.items()})
    return parser


def readable(message: str) -> str:
    """argparse's complaint as this project words it."""
    match = re.match(r"argument (--[\w]+)(?:/--[\w-]+)?: invalid (float|int|string_to_bool) value: '(.*)'", message)
    if match:
        key, kind, value = match.groups()
        expected = {"float": "a number", "int": "an integer", "string_to_bool": "true or false"}[kind]
        return f"{key} expects {expected}, got {value!r}"
    match = re.match(r"argument (--[\w]+)(?:/--[\w-]+)?: (.*)", message)
    if match and "Truthy value expected" in match.group(2):
        return f"{match.group(1)} expects true or false"
    return message


def prepare_command_line(argv) -> tuple[list[str], list[str]]:
    """`--key null` taken out (returned as keys to set to None), `--key=value` split in two,
    and lists given as `64,128` (or `[64, 128]`) spread into `64 128`."""
    lists = {f"--{name}" for section in SECTIONS for name, f in fields_of(section).items() if "list" in str(f.type)}
    known = {f"--{name}" for section in SECTIONS for name in fields_of(section)}
    words, nulls, index, argv = [], [], 0, list(argv)
    while index < len(argv):
        word = argv[index]
        key, equals, value = word.partition("=")
        if word.startswith("--") and equals:
            argv[index : index + 1] = [key, value]
            continue
        has_value = word.startswith("--") and index + 1 < len(argv) and not argv[index + 1].startswith("--")
        if word in known and has_value and argv[index + 1].lower() == "null":
            nulls.append(word[2:])
            index += 2
            continue
        if word in known:  # a later value wins over an earlier null
            nulls = [key for key in nulls if key != word[2:]]
        if word in lists and has_value:
            words += [word, *argv[index + 1].replace("[", " ").replace("]", " ").replace(",", " ").split()]
            index += 2
            continue
        words.append(word)
        index += 1
    return words, nulls


def layered_defaults(argv, default_path) -> dict:
    """default.yaml (and HybridViTConfig for the model), then each --config file in order."""
    defaults = read_yaml(default_path)
    layered = {section: dict(defaults.get(section, {})) for section in SECTIONS}
    layered["model"] = {**model_defaults(), **layered["model"]}
    missing = [f"{s}.{k}" for s in SECTIONS for k in fields_of(s) if k not in layered[s]]
    if missing:
        raise UserError(f"{default_path} lacks {', '.join(missing)}")
    words, _ = prepare_command_line(argv)
    for index, word in enumerate(words):
        if word == "--config" and index + 1 < len(words):
            for section, values in read_yaml(words[index + 1]).items():
                layered[section].update(values)
    return layered


def load_settings(argv=None, default_path=DEFAULT_CONFIG) -> Settings:
    """default.yaml, then each --config file, then --key value overrides, validated."""
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = make_parser(layered_defaults(argv, default_path))
    words, nulls = prepare_command_line(argv)
    *sections, rest = parser.parse_args_into_dataclasses(args=words, return_remaining_strings=True, look_for_args_file=False)
    if rest:
        word = next((w for w in rest if w.startswith("--")), rest[0])
        if word.startswith("--"):
            raise UserError(f"unknown setting {word.split('=')[0]} (see run_train.py --help)")
        raise UserError(f"unexpected argument {word!r}; settings are given as --key value")
    settings = Settings(*sections[: len(SECTIONS)])
    for key in nulls:
        setattr(getattr(settings, section_of(key)), key, None)
    validate(settings)
    return settings


def split_of(model_path) -> tuple[float, int]:
    """The validation split a saved model was scored on: train_val_split and seed from its
    run's train_config.yaml, or default.yaml's for a model without one (a Hub model)."""
    from hub_folder import saved_settings

    saved, defaults = saved_settings(model_path), load_settings([])
    fraction = saved.get("data", {}).get("train_val_split", defaults.data.train_val_split)
    return float(fraction), int(saved.get("training", {}).get("seed", defaults.training.seed))


# --------------------------------------------------------------------------------- checks


def check(condition: bool, key: str, expectation: str, value):
    if not condition:
        raise UserError(f"--{key} must be {expectation}, got {value!r}")


def positive_int_or_none(section, key: str):
    value = getattr(section, key)
    check(value is None or (isinstance(value, int) and value > 0), key, "a positive integer or null", value)


def validate(settings: Settings):
    """Range checks that argparse's types cannot make; normalises the free-typed settings
    (num_train_epochs, checkpointing_steps) in place."""
    from configuration_hybrid_vit import HybridViTConfig

    try:
        HybridViTConfig(**dataclasses.asdict(settings.model))
    except (ValueError, TypeError) as error:
        raise UserError(f"invalid model setting: {error}") from None
    validate_data(settings.data)
    validate_optimizer(settings.optimizer)
    validate_schedule(settings.schedule)
    validate_training(settings.training)


def validate_data(data: DataSettings):
    check(isinstance(data.dataset_name, str) and data.dataset_name, "dataset_name", "a Hub id or a folder", data.dataset_name)
    check(0 < data.train_val_split < 1, "train_val_split", "in (0, 1)", data.train_val_split)
    positive_int_or_none(data, "max_train_samples")
    positive_int_or_none(data, "max_eval_samples")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        check(isinstance(getattr(data, key), int) and getattr(data, key) > 0, key, "a positive integer", getattr(data, key))
    check(data.auto_augment in AUTO_AUGMENT_CHOICES, "auto_augment", f"one of {', '.join(AUTO_AUGMENT_CHOICES)}", data.auto_augment)
    for key in ("mixup_alpha", "cutmix_alpha"):
        check(getattr(data, key) >= 0, key, ">= 0", getattr(data, key))
    check(0 <= data.label_smoothing < 1, "label_smoothing", "in [0, 1)", data.label_smoothing)


def validate_optimizer(optimizer: OptimizerSettings):
    for key in ("learning_rate", "transformer_learning_rate"):
        check(getattr(optimizer, key) > 0, key, "> 0", getattr(optimizer, key))
    for key in ("weight_decay", "transformer_weight_decay"):
        check(getattr(optimizer, key) >= 0, key, ">= 0", getattr(optimizer, key))


def validate_schedule(schedule: ScheduleSettings):
    epochs = schedule.num_train_epochs
    if not (isinstance(epochs, str) and epochs.lower() == "auto"):
        try:
            epochs = float(epochs)
        except (TypeError, ValueError):
            raise UserError(f"--num_train_epochs expects a number or auto, got {epochs!r}") from None
        check(epochs > 0, "num_train_epochs", "> 0 or auto", epochs)
    schedule.num_train_epochs = "auto" if isinstance(epochs, str) else epochs
    positive_int_or_none(schedule, "max_train_steps")
    minutes = schedule.max_train_minutes
    check(minutes is None or minutes > 0, "max_train_minutes", "> 0 or null", minutes)
    if schedule.num_train_epochs == "auto" and schedule.max_train_steps is None:
        check(minutes is not None, "num_train_epochs", "a number unless --max_train_minutes is set (auto fits the "
              "schedule to that time)", schedule.num_train_epochs)
    check(0 <= schedule.warmup_ratio < 1, "warmup_ratio", "in [0, 1)", schedule.warmup_ratio)


def validate_training(training: TrainingSettings):
    check(isinstance(training.output_dir, str) and training.output_dir, "output_dir", "a folder", training.output_dir)
    if training.mixed_precision == "fp16":
        raise UserError(
            "--mixed_precision fp16 is not offered: the backbone and the transformer have optimisers of their own, and "
            "Accelerate's one loss scaler is updated once per optimiser, so the second would be unscaled with the wrong "
            "scale; use bf16 (where the hardware runs it) or no"
        )
    check(training.mixed_precision in MIXED_PRECISION_CHOICES, "mixed_precision", "auto, bf16 or no", training.mixed_precision)
    steps = training.checkpointing_steps
    if isinstance(steps, str) and steps.isdigit():
        steps = training.checkpointing_steps = int(steps)
    check(steps is None or steps == "epoch" or (isinstance(steps, int) and steps > 0), "checkpointing_steps",
          "a positive integer, epoch or null", steps)
    check(training.logging_steps > 0, "logging_steps", "> 0", training.logging_steps)
    check(training.report_to in ("tensorboard", "none"), "report_to", "tensorboard or none", training.report_to)
    check(not training.push_to_hub or bool(training.hub_model_id), "hub_model_id", "set when --push_to_hub is true",
          training.hub_model_id)
