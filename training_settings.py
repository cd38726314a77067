"""The settings of a training run: what each one means and its type (three dataclasses, one
per section of default.yaml), and how a run's settings are put together: default.yaml,
then each `--config FILE` layered on top, then `--key value` overrides, then checks that
stop a bad run before anything is written.

The values live in default.yaml (the GPU recipe; configs/*.yaml override some of them)
and nowhere else: the dataclasses carry types and one-line meanings only, and a test
holds the two to the same keys. The command line is parsed by transformers'
HfArgumentParser over the dataclasses, the ecosystem's convention, so `--help` lists every
setting with its meaning and its default after the layering. Two conveniences it lacks
are added by hand before parsing, because the project's commands have always accepted
them: `null` for "unset", and lists written `64,128` as well as `64 128`.
"""

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from run_folder import UserError, is_local_path

DEFAULT_CONFIG = Path(__file__).resolve().with_name("default.yaml")
MIXED_PRECISION_CHOICES = ("auto", "no", "fp16", "bf16")


def meaning(text: str):
    """A dataclass field without a default (default.yaml holds the value), with its help."""
    return field(metadata={"help": text})


@dataclass
class ModelSettings:
    """Architecture: maps one-to-one onto HybridViTConfig (configuration_hybrid_vit.py)."""

    image_size: int = meaning("side of the square input images, in pixels")
    num_channels: int = meaning("colour channels of the input images")
    backbone_hidden_sizes: list[int] = meaning("channels of each convolutional stage; each stage halves the resolution "
                                               "(the token grid is image_size / 2^stages on a side)")
    backbone_layers_per_stage: int = meaning("3x3 convolutions in each stage")
    backbone_pool_first: bool = meaning("pool right after a stage's first convolution (airbench's block), not at its end")
    backbone_whitening_size: int = meaning("k > 0: a frozen k x k patch-whitening convolution first, fitted to training images; 0: none")
    token_stages: int = meaning("how many of the last stages make the tokens: 1, the last stage's grid; 2, a feature pyramid "
                                "on the grid of the stage before it (twice as fine), each token that stage's features "
                                "plus the last stage's token above it")
    hidden_size: int = meaning("width of the transformer's tokens")
    num_hidden_layers: int = meaning("transformer blocks; 0: the backbone alone (with pooling mean), the no-transformer baseline")
    class_attention_layers: int = meaning("how many of the blocks, the last ones, are class-attention blocks (CaiT): only the "
                                          "CLS token queries and is updated; 0: all are self-attention")
    num_attention_heads: int = meaning("attention heads per block (hidden_size must divide by it)")
    intermediate_size: int = meaning("width of each block's MLP")
    hidden_act: str = meaning("activation of the backbone and the MLPs (a transformers ACT2FN name)")
    hidden_dropout_prob: float = meaning("dropout on embeddings, attention output and MLP output")
    attention_probs_dropout_prob: float = meaning("dropout on the attention probabilities")
    drop_path_rate: float = meaning("stochastic depth of the last block (rising linearly from 0 in the first)")
    layer_norm_eps: float = meaning("epsilon of the LayerNorms")
    qkv_bias: bool = meaning("biases in the query, key and value projections")
    initializer_range: float = meaning("standard deviation of the truncated-normal initialisation of linear layers")
    pooling: str = meaning("cls | mean: the classifier reads the CLS token, or the mean of the patch tokens")
    attn_implementation: str = meaning("sdpa | eager: the same numbers; on a CPU with few tokens the explicit softmax is "
                                       "faster. A run-time choice, not saved in config.json")


@dataclass
class DataSettings:
    """Data, augmentation and evaluation views (cifar10_data.py)."""

    dataset_name: str = meaning("a Hub id (uoft-cs/cifar10), or a local folder of parquet files or an imagefolder tree")
    dataset_hub_id: Optional[str] = meaning("the Hub id a local folder copies, for the model card and saved settings; "
                                            "null: read from the folder's README front matter (source_datasets)")
    train_val_split: float = meaning("fraction of train held out for validation when the dataset has no validation split")
    max_train_samples: Optional[int] = meaning("use only this many training images (quick runs); null: all")
    max_eval_samples: Optional[int] = meaning("evaluate on only this many images; null: all")
    auto_augment: str = meaning("autoaugment (CIFAR-10 policy) | randaugment | trivialaugment | none")
    random_crop_padding: int = meaning("pixels of reflect padding before the random crop; 0: no crop")
    horizontal_flip: bool = meaning("flip training images left-right at random")
    cutout_size: int = meaning("side of a square set to the mean colour in each training image (Cutout); 0: none")
    mixup_alpha: float = meaning("Beta(alpha, alpha) for MixUp (e.g. 0.8); 0: no MixUp")
    cutmix_alpha: float = meaning("Beta(alpha, alpha) for CutMix (e.g. 1.0); 0: no CutMix")
    mix_prob: float = meaning("probability that a batch is mixed at all (with MixUp or CutMix on)")
    mix_switch_prob: float = meaning("probability of CutMix rather than MixUp for a batch when both are on")
    label_smoothing: float = meaning("label smoothing of the cross-entropy")
    tta_shift: int = meaning("the final evaluation also averages flip and shifts of this many pixels; 0: flip only")
    skip_bad_images: bool = meaning("skip (and count) undecodable images instead of stopping")
    decode_once: bool = meaning("decode all images once into uint8 tensors on the training device and augment whole "
                                "batches there; false: decode and augment per image in loader processes")
    dataloader_num_workers: int = meaning("loader processes when decode_once is false")


@dataclass
class TrainingSettings:
    """The loop, the optimiser and schedule, checkpoints and outputs (run_train.py)."""

    output_dir: str = meaning("folder of the trained model, its card, results and checkpoints")
    model_name_or_path: Optional[str] = meaning("fine-tune: start from this saved model folder or Hub id, with its "
                                                "architecture (of the model settings only dropout, drop path and "
                                                "attn_implementation then apply); null: a new model")
    teacher_model: Optional[str] = meaning("distil: a trained model (folder or Hub id) of the same classes and image size "
                                           "whose predictions on each training batch the loss also matches")
    distillation_alpha: float = meaning("loss = (1 - alpha) x cross-entropy with the labels + alpha x T^2 KL(teacher || student)")
    distillation_temperature: float = meaning("T: softens both distributions (Hinton et al.)")
    teacher_flip_tta: bool = meaning("the teacher's logits averaged over each image and its mirror image")
    teacher_tta_shift: int = meaning("> 0: the teacher's logits also averaged over both views shifted by this many pixels")
    seed: int = meaning("seeds the weights, the validation split, the data order and every augmentation")
    num_train_epochs: str = meaning("epochs of the schedule, or auto: as many steps as fit into max_train_minutes, "
                                    "the warmup and decay fitted to that time from the run's measured speed")
    max_train_steps: Optional[int] = meaning("optimisation steps of the schedule; overrides a number of epochs")
    max_train_minutes: Optional[float] = meaning("training time: a fixed schedule stops cleanly here, a fitted one "
                                                 "(num_train_epochs auto) ends here; then evaluate and save")
    per_device_train_batch_size: int = meaning("training images per process and step")
    per_device_eval_batch_size: int = meaning("evaluation images per process and batch")
    gradient_accumulation_steps: int = meaning("batches whose gradients make one optimisation step")
    learning_rate: float = meaning("peak learning rate, after warmup (SGD: about 0.1; AdamW: about 1e-3)")
    weight_decay: float = meaning("not applied to norms, biases, position embeddings or the CLS token "
                                  "(SGD: coupled, e.g. 1e-3; AdamW: decoupled, e.g. 0.05)")
    optimizer: str = meaning("adamw | sgd (Nesterov momentum): the backbone's optimiser, and the whole model's "
                             "when transformer_optimizer is null")
    freeze_backbone: bool = meaning("fine-tune only the transformer part: the backbone of --model_name_or_path keeps its "
                                    "weights and BatchNorm statistics (BatchNorm in eval mode), and gets no gradient")
    transformer_optimizer: Optional[str] = meaning("adamw | sgd: the transformer part (token projection, CLS token, "
                                                   "position embeddings, blocks, head) gets its own optimiser; null: "
                                                   "one optimiser for the whole model")
    transformer_learning_rate: Optional[float] = meaning("the transformer optimiser's peak learning rate (AdamW: about 1e-3)")
    transformer_weight_decay: Optional[float] = meaning("the transformer optimiser's weight decay (AdamW: decoupled, e.g. 0.05)")
    adam_beta1: float = meaning("AdamW's beta1")
    adam_beta2: float = meaning("AdamW's beta2")
    sgd_momentum: float = meaning("SGD's Nesterov momentum")
    max_grad_norm: float = meaning("clip the gradient norm to this; 0: no clipping")
    ema_decay: Optional[float] = meaning("e.g. 0.999: evaluate and save an exponential moving average of the weights and "
                                         "BatchNorm statistics; null: none")
    lr_scheduler_type: str = meaning("any transformers.get_scheduler name (cosine, linear, constant_with_warmup, ...)")
    warmup_ratio: float = meaning("fraction of the optimisation steps spent warming up")
    mixed_precision: str = meaning("auto (bf16 where the hardware runs it natively, else fp16 on CUDA, else float32) | "
                                   "no | fp16 | bf16")
    channels_last: bool = meaning("NHWC memory format for the convolutional backbone")
    sync_batchnorm: str = meaning("auto | true | false: BatchNorm statistics over the whole batch across processes "
                                  "(GPUs) rather than each process's share; auto: true when more than one process trains")
    torch_compile: bool = meaning("torch.compile (inductor) the model; compiling costs time up front")
    checkpointing_steps: Optional[str] = meaning("save a resumable checkpoint every N optimisation steps, or each epoch; null: never")
    checkpoints_total_limit: Optional[int] = meaning("keep only the newest N checkpoints; null: keep all")
    resume_from_checkpoint: Optional[str] = meaning("a checkpoint folder, or latest (the newest complete one in output_dir)")
    logging_steps: int = meaning("log the training loss and learning rate every N optimisation steps")
    report_to: str = meaning("tensorboard | none")
    push_to_hub: bool = meaning("upload the trained folder to the Hub at the end")
    hub_model_id: Optional[str] = meaning("the Hub repository to push to (owner/name)")


SECTIONS = {"model": ModelSettings, "data": DataSettings, "training": TrainingSettings}
# Numeric settings that also take the word `auto` (num_train_epochs: fitted to max_train_minutes).
AUTO_SETTINGS = ("num_train_epochs",)


def fields_of(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(SECTIONS[section])}


def read_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"cannot parse {path}: {str(error).splitlines()[0]}") from error
    if not isinstance(content, dict) or not all(isinstance(v, dict) for v in content.values()):
        raise UserError(f"{path} must map sections ({', '.join(SECTIONS)}) to settings")
    for section, values in content.items():
        if section not in SECTIONS:
            raise UserError(f"{path}: unknown section {section!r} (expected {', '.join(SECTIONS)})")
        for name in values:
            if name not in fields_of(section):
                raise UserError(f"{path}: unknown setting {section}.{name} (not in {DEFAULT_CONFIG.name})")
    return content


class SettingsParser:
    """HfArgumentParser over the three sections, with argparse's exits turned into one
    UserError line."""

    def __init__(self, defaults: dict):
        from transformers import HfArgumentParser

        class Parser(HfArgumentParser):
            def error(self, message):
                raise UserError(readable(message))

        self.parser = Parser(
            tuple(SECTIONS.values()), allow_abbrev=False, prog="run_train.py",
            description="Train the hybrid ViT on CIFAR-10. Settings come from default.yaml, then each --config FILE, "
                        "then --key value; each option below shows its default after that layering.",
        )
        self.parser.add_argument("--config", action="append", metavar="FILE", help="a YAML file of overrides, layered in order")
        for action in self.parser._actions:  # default.yaml supplies every value: nothing is required
            action.required = False
        self.parser.set_defaults(**{key: value for values in defaults.values() for key, value in values.items()})

    def parse(self, argv) -> dict:
        argv, nulls = prepare_command_line(argv)
        outputs = self.parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True, look_for_args_file=False)
        sections, rest = outputs[: len(SECTIONS)], outputs[-1]  # between them: the namespace holding --config
        if rest:
            word = next((w for w in rest if w.startswith("--")), rest[0])
            if word.startswith("--"):
                raise UserError(f"unknown setting {word.split('=')[0]} (not in {DEFAULT_CONFIG.name})")
            raise UserError(f"unexpected argument {word!r}; settings are given as --key value")
        settings = {name: dataclasses.asdict(values) for name, values in zip(SECTIONS, sections)}
        for key in nulls:
            settings[section_of(key)][key] = None
        return settings


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


def section_of(key: str) -> str:
    return next(name for name in SECTIONS if key in fields_of(name))


def prepare_command_line(argv) -> tuple[list[str], list[str]]:
    """`--key null` taken out (returned as keys to set to None), `--key=value` split in
    two, and lists given as `64,128` (or `[64, 128]`) spread into `64 128`."""
    lists = {f"--{name}" for section in SECTIONS for name, f in fields_of(section).items() if "list" in str(f.type)}
    known = {f"--{name}" for section in SECTIONS for name in fields_of(section)}
    words, nulls, index = [], [], 0
    argv = list(argv)
    while index < len(argv):
        word = argv[index]
        key, equals, value = word.partition("=")
        if word.startswith("--") and equals:
            argv[index : index + 1] = [key, value]
            continue
        key = word.replace("-", "_").replace("__", "--", 1) if word.startswith("--") else word
        has_value = word.startswith("--") and index + 1 < len(argv) and not argv[index + 1].startswith("--")
        if key in known and has_value and argv[index + 1].lower() == "null":
            nulls.append(key[2:])
            index += 2
            continue
        if key in lists and has_value:
            items = [item for item in argv[index + 1].replace("[", " ").replace("]", " ").replace(",", " ").split()]
            words += [key, *items]
            index += 2
            continue
        words.append(word)
        index += 1
    return words, nulls


def load_settings(argv=None, default_path=DEFAULT_CONFIG) -> dict:
    """default.yaml, then each --config file, then --key value overrides, validated."""
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    defaults = read_yaml(default_path)
    layered = {section: dict(defaults.get(section, {})) for section in SECTIONS}
    missing = [f"{s}.{k}" for s in SECTIONS for k in fields_of(s) if k not in layered[s]]
    if missing:
        raise UserError(f"{default_path} lacks {', '.join(missing)}")
    words, _ = prepare_command_line(argv)
    for index, word in enumerate(words):
        if word == "--config" and index + 1 < len(words):
            for section, values in read_yaml(words[index + 1]).items():
                layered[section].update(values)
    settings = SettingsParser(layered).parse(argv)
    validate(settings)
    return settings


def _check(condition: bool, key: str, expectation: str, value):
    if not condition:
        raise UserError(f"--{key} must be {expectation}, got {value!r}")


def as_number(key: str, value):
    """A number from YAML or the command line (num_train_epochs), or `auto` where allowed."""
    if key in AUTO_SETTINGS and isinstance(value, str) and value.lower() == "auto":
        return "auto"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"--{key} expects a number, got {value!r}") from None
    return int(number) if number.is_integer() else number


def validate(settings: dict):
    """Range checks that argparse's types cannot make; normalises the few free-typed
    settings (num_train_epochs, checkpointing_steps, sync_batchnorm) in place."""
    validate_model(settings["model"])
    validate_data(settings["data"], settings["model"]["image_size"])
    validate_training(settings["training"], settings["model"]["image_size"])
    from configuration_hybrid_vit import HybridViTConfig

    try:
        HybridViTConfig(**settings["model"])
    except (ValueError, TypeError) as error:
        raise UserError(f"invalid model setting: {error}") from None


def validate_model(model: dict):
    attention = model["attn_implementation"]
    _check(attention in ("sdpa", "eager"), "attn_implementation", "sdpa or eager", attention)


def positive_int_or_none(section: dict, key: str):
    value = section[key]
    _check(value is None or (isinstance(value, int) and value > 0), key, "a positive integer or null", value)


def validate_data(data: dict, size: int):
    from cifar10_data import AUTO_AUGMENT_CHOICES

    _check(isinstance(data["dataset_name"], str) and data["dataset_name"], "dataset_name", "a Hub id or a folder", data["dataset_name"])
    hub_id = data["dataset_hub_id"]
    _check(hub_id is None or (isinstance(hub_id, str) and not is_local_path(hub_id)), "dataset_hub_id", "a Hub id like owner/name, or null", hub_id)
    _check(0 < data["train_val_split"] < 1, "train_val_split", "in (0, 1)", data["train_val_split"])
    positive_int_or_none(data, "max_train_samples")
    positive_int_or_none(data, "max_eval_samples")
    _check(data["auto_augment"] in AUTO_AUGMENT_CHOICES, "auto_augment", f"one of {AUTO_AUGMENT_CHOICES}", data["auto_augment"])
    _check(data["random_crop_padding"] >= 0, "random_crop_padding", ">= 0", data["random_crop_padding"])
    _check(isinstance(data["cutout_size"], int) and 0 <= data["cutout_size"] <= size, "cutout_size", f"an integer in [0, {size}]", data["cutout_size"])
    for key in ("mixup_alpha", "cutmix_alpha"):
        _check(data[key] >= 0, key, ">= 0", data[key])
    for key in ("mix_prob", "mix_switch_prob"):
        _check(0 <= data[key] <= 1, key, "in [0, 1]", data[key])
    _check(0 <= data["label_smoothing"] < 1, "label_smoothing", "in [0, 1)", data["label_smoothing"])
    # reflect padding needs a shift below the image size
    _check(isinstance(data["tta_shift"], int) and 0 <= data["tta_shift"] < size, "tta_shift", f"an integer in [0, {size})", data["tta_shift"])
    _check(data["dataloader_num_workers"] >= 0, "dataloader_num_workers", ">= 0", data["dataloader_num_workers"])


def validate_training(train: dict, size: int):
    from transformers import SchedulerType

    _check(isinstance(train["output_dir"], str) and train["output_dir"], "output_dir", "a folder", train["output_dir"])
    epochs = train["num_train_epochs"] = as_number("num_train_epochs", train["num_train_epochs"])
    _check(epochs == "auto" or epochs > 0, "num_train_epochs", "> 0 or auto", epochs)
    positive_int_or_none(train, "max_train_steps")
    minutes = train["max_train_minutes"]
    _check(minutes is None or float(minutes) > 0, "max_train_minutes", "> 0 or null", minutes)
    if epochs == "auto":
        _check(minutes is not None, "num_train_epochs", "a number unless --max_train_minutes is set (auto fits the schedule to that time)", epochs)
        _check(train["max_train_steps"] is None, "max_train_steps", "null with --num_train_epochs auto (the schedule is fitted to --max_train_minutes)", train["max_train_steps"])
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "logging_steps"):
        _check(isinstance(train[key], int) and train[key] > 0, key, "a positive integer", train[key])
    _check(train["learning_rate"] > 0, "learning_rate", "> 0", train["learning_rate"])
    _check(train["weight_decay"] >= 0, "weight_decay", ">= 0", train["weight_decay"])
    _check(train["optimizer"] in ("adamw", "sgd"), "optimizer", "adamw or sgd", train["optimizer"])
    part = train["transformer_optimizer"]
    _check(part in (None, "adamw", "sgd"), "transformer_optimizer", "adamw, sgd or null", part)
    if part is not None:
        rate, decay = train["transformer_learning_rate"], train["transformer_weight_decay"]
        _check(rate is not None and rate > 0, "transformer_learning_rate", "> 0 when --transformer_optimizer is set", rate)
        _check(decay is not None and decay >= 0, "transformer_weight_decay", ">= 0 when --transformer_optimizer is set", decay)
    freeze = train["freeze_backbone"]
    if freeze:
        _check(train["model_name_or_path"] is not None, "freeze_backbone",
               "false unless --model_name_or_path gives a trained backbone to keep", freeze)
        _check(part is None, "transformer_optimizer",
               "null with --freeze_backbone (optimizer, learning_rate and weight_decay then train the transformer part)", part)
    for key in ("adam_beta1", "adam_beta2", "sgd_momentum", "warmup_ratio"):
        _check(0 <= train[key] < 1, key, "in [0, 1)", train[key])
    _check(train["max_grad_norm"] >= 0, "max_grad_norm", ">= 0", train["max_grad_norm"])
    for key in ("model_name_or_path", "teacher_model"):
        value = train[key]
        _check(value is None or (isinstance(value, str) and value), key, "a saved model folder, a Hub id or null", value)
    _check(0 <= train["distillation_alpha"] <= 1, "distillation_alpha", "in [0, 1]", train["distillation_alpha"])
    _check(train["distillation_temperature"] > 0, "distillation_temperature", "> 0", train["distillation_temperature"])
    shift = train["teacher_tta_shift"]
    _check(isinstance(shift, int) and 0 <= shift < size, "teacher_tta_shift", f"an integer in [0, {size})", shift)
    _check(shift == 0 or train["teacher_flip_tta"], "teacher_tta_shift", "0 when --teacher_flip_tta is false (shifts are views of flip TTA)", shift)
    ema = train["ema_decay"]
    _check(ema is None or (isinstance(ema, (int, float)) and 0 < ema < 1), "ema_decay", "in (0, 1) or null", ema)
    schedulers = [s.value for s in SchedulerType]
    _check(train["lr_scheduler_type"] in schedulers, "lr_scheduler_type", f"one of {schedulers}", train["lr_scheduler_type"])
    _check(train["mixed_precision"] in MIXED_PRECISION_CHOICES, "mixed_precision", "auto, no, fp16 or bf16", train["mixed_precision"])
    sync = train["sync_batchnorm"]
    if isinstance(sync, str) and sync.lower() in ("true", "false"):
        sync = train["sync_batchnorm"] = sync.lower() == "true"
    _check(sync == "auto" or isinstance(sync, bool), "sync_batchnorm", "auto, true or false", sync)
    steps = train["checkpointing_steps"]
    if isinstance(steps, str) and steps.isdigit():
        steps = train["checkpointing_steps"] = int(steps)
    _check(steps is None or steps == "epoch" or (isinstance(steps, int) and steps > 0), "checkpointing_steps", "a positive integer, epoch or null", steps)
    positive_int_or_none(train, "checkpoints_total_limit")
    _check(train["report_to"] in ("tensorboard", "none"), "report_to", "tensorboard or none", train["report_to"])
    _check(not train["push_to_hub"] or bool(train["hub_model_id"]), "hub_model_id", "set when --push_to_hub is true", train["hub_model_id"])
