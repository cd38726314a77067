"""Data and augmentation for training and evaluating the hybrid ViT on CIFAR-10:
loading through Hugging Face `datasets` (a Hub id or a local folder), the validation
split, per-image augmentation as a `datasets` transform, and batch-level MixUp / CutMix
in the collate function. All transforms come from `torchvision.transforms.v2`.
"""

import io
import os

import torch
from datasets import ClassLabel, DatasetDict, load_dataset
from datasets import Image as ImageFeature
from PIL import Image
from torchvision.transforms import v2

from modeling_hybrid_vit import CIFAR10_MEAN, CIFAR10_STD

IMAGE_COLUMNS = ("img", "image")
LABEL_COLUMNS = ("label", "labels")
AUTO_AUGMENT_CHOICES = ("autoaugment", "randaugment", "trivialaugment", "none")


class DataError(ValueError):
    """A problem with the dataset that the user must fix; its message is one line."""


def find_columns(column_names):
    """Return the (image, label) column names, or raise DataError naming the columns found."""
    image = next((c for c in IMAGE_COLUMNS if c in column_names), None)
    label = next((c for c in LABEL_COLUMNS if c in column_names), None)
    if image is None or label is None:
        missing = "image column ('img' or 'image')" if image is None else "label column ('label' or 'labels')"
        raise DataError(f"dataset has no {missing}; columns found: {sorted(column_names)}")
    return image, label


def load_raw_dataset(dataset_name: str) -> DatasetDict:
    """A Hub id or a local folder (parquet files, or an imagefolder tree) as a DatasetDict."""
    looks_local = dataset_name.startswith((".", "/", "~")) or os.path.exists(dataset_name)
    if looks_local and not os.path.isdir(os.path.expanduser(dataset_name)):
        raise DataError(f"dataset folder not found: {dataset_name}")
    try:
        return load_dataset(os.path.expanduser(dataset_name) if looks_local else dataset_name)
    except Exception as error:  # offline Hub, unknown id, unreadable files: one clear line
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"could not load dataset {dataset_name!r}: {first_line}") from error


def load_splits(
    dataset_name: str,
    train_val_split: float = 0.1,
    seed: int = 42,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> tuple[DatasetDict, str, str]:
    """Load `train`, `validation` and (when the dataset has one) `test` splits.

    Without a validation split, one is carved from train: stratified by label and seeded,
    so that every run, and `run_eval.py`, sees the same held-out images. Returns the splits
    and the image and label column names.
    """
    raw = load_raw_dataset(dataset_name)
    if "train" not in raw:
        raise DataError(f"dataset has no 'train' split; splits found: {sorted(raw)}")
    image_column, label_column = find_columns(raw["train"].column_names)
    if not isinstance(raw["train"].features[label_column], ClassLabel):
        raw = raw.class_encode_column(label_column)
    splits = DatasetDict()
    if "validation" in raw:
        splits["train"], splits["validation"] = raw["train"], raw["validation"]
    else:
        if not 0.0 < train_val_split < 1.0:
            raise DataError(f"train_val_split must be in (0, 1) when the dataset has no validation split, got {train_val_split}")
        carved = raw["train"].train_test_split(
            test_size=train_val_split, stratify_by_column=label_column, seed=seed
        )
        splits["train"], splits["validation"] = carved["train"], carved["test"]
    if "test" in raw:
        splits["test"] = raw["test"]
    if max_train_samples is not None:
        splits["train"] = splits["train"].shuffle(seed=seed).select(range(min(max_train_samples, len(splits["train"]))))
    if max_eval_samples is not None:
        for name in ("validation", "test"):
            if name in splits:
                splits[name] = splits[name].select(range(min(max_eval_samples, len(splits[name]))))
    return splits, image_column, label_column


def train_transform(
    image_size: int = 32,
    auto_augment: str = "autoaugment",
    random_crop_padding: int = 4,
    horizontal_flip: bool = True,
) -> v2.Compose:
    """Per-image training augmentation: crop, flip, an automatic policy, then normalise."""
    if auto_augment not in AUTO_AUGMENT_CHOICES:
        raise ValueError(f"auto_augment must be one of {AUTO_AUGMENT_CHOICES}, got {auto_augment!r}")
    steps = [v2.ToImage(), v2.Resize((image_size, image_size), antialias=True)]
    if random_crop_padding:
        steps.append(v2.RandomCrop(image_size, padding=random_crop_padding, padding_mode="reflect"))
    if horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    policy = {
        "autoaugment": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10),
        "randaugment": v2.RandAugment,
        "trivialaugment": v2.TrivialAugmentWide,
        "none": lambda: None,
    }[auto_augment]()
    if policy is not None:
        steps.append(policy)
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    return v2.Compose(steps)


def eval_transform(image_size: int = 32) -> v2.Compose:
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((image_size, image_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(CIFAR10_MEAN, CIFAR10_STD),
        ]
    )


def decode_image(value) -> Image.Image:
    """A datasets Image cell (PIL image, or {'bytes', 'path'} when decoding is off) as RGB,
    so grayscale and RGBA files work too."""
    if isinstance(value, dict):
        value = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
    return value.convert("RGB")


def sample_seed(*keys: int) -> int:
    """A 63-bit seed from integers (hash of an int tuple is stable across processes)."""
    return hash(tuple(keys)) & 0x7FFF_FFFF_FFFF_FFFF


class ImageTransform:
    """`datasets` transform (for `with_transform`): a batch of rows -> pixel_values and labels.

    Images are decoded here rather than by `datasets`, so that an unreadable one can be
    reported with its index, or skipped and counted (`skip_bad_images`).

    With a `seed`, each image's random augmentation is drawn from a generator seeded by
    (seed, epoch, row index) instead of the global RNG. Augmentation then depends only on
    which image and which epoch, not on how many batches a loader prefetched or which
    worker ran it, which is what makes a resumed run repeat the uninterrupted one exactly.
    """

    def __init__(self, transform, image_column: str, label_column: str, skip_bad_images=False, seed=None):
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        self.skip_bad_images = skip_bad_images
        self.seed = seed
        self.epoch = 0

    def __call__(self, batch):
        pixel_values, labels = [], []
        rows = batch["__index__"]
        for image, label, row in zip(batch[self.image_column], batch[self.label_column], rows):
            try:
                image = decode_image(image)
            except Exception as error:
                if not self.skip_bad_images:
                    raise DataError(
                        f"cannot decode the image at dataset index {row} ({type(error).__name__}: {error}); "
                        "fix or remove it, or set --skip_bad_images true to skip such images"
                    ) from error
                pixel_values.append(None)
                labels.append(label)
                continue
            if self.seed is None:
                pixel_values.append(self.transform(image))
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(sample_seed(self.seed, self.epoch, row))
                    pixel_values.append(self.transform(image))
            labels.append(label)
        return {"pixel_values": pixel_values, "labels": labels, "__index__": rows}


def with_image_transform(dataset, transform: ImageTransform):
    """Attach `transform` lazily. Decoding is switched off in `datasets` and the row index
    is kept, so that a corrupt image is reported by its index."""
    dataset = dataset.cast_column(transform.image_column, ImageFeature(decode=False))
    if "__index__" not in dataset.column_names:
        dataset = dataset.add_column("__index__", list(range(len(dataset))))
    return dataset.with_transform(transform)


class MixCollator:
    """Stack a batch and, with probability `mix_prob`, apply MixUp or CutMix to it as a
    whole (torchvision.transforms.v2), giving soft labels of shape (B, num_labels) that sum
    to 1. Skipped (None) images are dropped; the batch says how many in `num_skipped`.

    With a `seed`, the draws come from (seed, epoch, first row of the batch), for the same
    reason as in ImageTransform."""

    def __init__(self, num_labels, mixup_alpha=0.0, cutmix_alpha=0.0, mix_prob=1.0, mix_switch_prob=0.5, seed=None):
        self.num_labels = num_labels
        self.mix_prob = mix_prob
        self.seed = seed
        self.epoch = 0
        mixers, weights = [], []
        if mixup_alpha > 0:
            mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_labels))
            weights.append(1.0 - mix_switch_prob if cutmix_alpha > 0 else 1.0)
        if cutmix_alpha > 0:
            mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_labels))
            weights.append(mix_switch_prob if mixup_alpha > 0 else 1.0)
        self.mix = v2.RandomChoice(mixers, p=weights) if mixers and mix_prob > 0 else None

    def __call__(self, rows):
        kept = [row for row in rows if row["pixel_values"] is not None]
        if not kept:
            raise DataError(f"every image of a batch of {len(rows)} failed to decode; is the dataset readable?")
        batch = {
            "pixel_values": torch.stack([row["pixel_values"] for row in kept]),
            "labels": torch.tensor([row["labels"] for row in kept], dtype=torch.long),
            "num_skipped": torch.tensor(len(rows) - len(kept)),
        }
        if self.mix is None or len(kept) < 2:
            return batch
        with torch.random.fork_rng(devices=[], enabled=self.seed is not None):
            if self.seed is not None:
                torch.manual_seed(sample_seed(self.seed, self.epoch, rows[0]["__index__"], -1))
            if torch.rand(()).item() < self.mix_prob:
                batch["pixel_values"], batch["labels"] = self.mix(batch["pixel_values"], batch["labels"])
        return batch
