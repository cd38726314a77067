"""CIFAR-10 through Hugging Face `datasets`, and the project's one image pipeline.

- Loading: a Hub id (`uoft-cs/cifar10`) or a local folder, and a validation split carved from
  train (stratified, seeded) when the dataset has none.
- Decoding once: every image of a split becomes a uint8 tensor on the training device (CIFAR-10's
  50,000 are 150 MB), so no epoch decodes a JPEG again.
- Augmentation of whole batches: random crop (4 pixels of reflect padding) and flip in a few
  tensor ops, an optional automatic policy (torchvision's AutoAugment, RandAugment or
  TrivialAugment, image by image), and MixUp / CutMix in the collate function.
- Test-time augmentation: the logits of each image averaged with its mirror image's.

Every random draw comes from a generator seeded by (seed, epoch, first image of the batch), not
from the global RNG, so a resumed run repeats the uninterrupted one exactly.
"""

import io
import os
import random

import torch
from datasets import ClassLabel, DatasetDict, load_dataset
from datasets import Image as ImageFeature
from PIL import Image
from torchvision.transforms import v2

from errors import UserError
from hub_folder import is_local_path
from modeling_hybrid_vit import CIFAR10_MEAN, CIFAR10_STD

IMAGE_COLUMNS = ("img", "image")
LABEL_COLUMNS = ("label", "labels")
AUTO_AUGMENT_CHOICES = ("autoaugment", "randaugment", "trivialaugment", "none")
CROP_PADDING = 4  # pixels of reflect padding before the random crop, as in ResNet and airbench


# ------------------------------------------------------------------------------- loading


def find_columns(column_names):
    """Return the (image, label) column names, or raise UserError naming the columns found."""
    image = next((c for c in IMAGE_COLUMNS if c in column_names), None)
    label = next((c for c in LABEL_COLUMNS if c in column_names), None)
    if image is None or label is None:
        missing = "image column ('img' or 'image')" if image is None else "label column ('label' or 'labels')"
        raise UserError(f"dataset has no {missing}; columns found: {sorted(column_names)}")
    return image, label


def load_raw_dataset(dataset_name: str) -> DatasetDict:
    """A Hub id or a local folder (parquet files, or an imagefolder tree) as a DatasetDict."""
    local = is_local_path(dataset_name)
    if local and not os.path.isdir(os.path.expanduser(dataset_name)):
        raise UserError(f"dataset folder not found: {dataset_name}")
    try:
        return load_dataset(os.path.expanduser(dataset_name) if local else dataset_name)
    except Exception as error:  # offline Hub, unknown id, unreadable files: one clear line
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = "" if local else "; the Hub is unreachable or has no such dataset: give a local copy with --dataset_name FOLDER"
        raise UserError(f"could not load dataset {dataset_name!r}: {first_line}{hint}") from error


def load_splits(dataset_name: str, train_val_split: float, seed: int, max_train_samples=None, max_eval_samples=None):
    """The `train`, `validation` and (when the dataset has one) `test` splits, and the image and
    label column names. Without a validation split, one is carved from train: stratified by
    label and seeded, so that every run with this seed, and `run_eval.py`, holds out the same
    images."""
    raw = load_raw_dataset(dataset_name)
    if "train" not in raw:
        raise UserError(f"dataset has no 'train' split; splits found: {sorted(raw)}")
    image_column, label_column = find_columns(raw["train"].column_names)
    if not isinstance(raw["train"].features[label_column], ClassLabel):
        raw = raw.class_encode_column(label_column)
    splits = DatasetDict(train=raw["train"])
    if "validation" in raw:
        splits["validation"] = raw["validation"]
    else:
        carved = raw["train"].train_test_split(test_size=train_val_split, stratify_by_column=label_column, seed=seed)
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


def load_split(dataset_name: str, split: str | None, train_val_split: float, seed: int, max_samples=None):
    """One split to evaluate on: `split`, or `test` when the dataset has one, else the
    validation split training carved with this fraction and seed. Returns (dataset, image
    column, label column, split name)."""
    splits, image_column, label_column = load_splits(dataset_name, train_val_split, seed, max_eval_samples=max_samples)
    split = split or ("test" if "test" in splits else "validation")
    if split not in splits:
        raise UserError(f"dataset {dataset_name} has no split {split!r}; splits: {', '.join(splits)}")
    dataset = splits[split]
    if split == "train" and max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    return dataset, image_column, label_column, split


def decode_image(value) -> Image.Image:
    """A datasets Image cell (PIL image, or {'bytes', 'path'} when decoding is off) as RGB,
    so grayscale and RGBA files work too."""
    if isinstance(value, dict):
        value = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
    return value.convert("RGB")


def dataset_images(dataset, image_column: str, label_column: str, indices):
    """The RGB images at `indices` and their label names (for figures)."""
    names = dataset.features[label_column].names
    rows = [dataset[int(i)] for i in indices]
    return [decode_image(row[image_column]) for row in rows], [names[row[label_column]] for row in rows]


def sample_indices(size: int, num: int, seed: int) -> list[int]:
    """`num` distinct indices below `size`, the same for the same seed."""
    return random.Random(seed).sample(range(size), min(num, size))


def decode_all(dataset, image_column: str, label_column: str, image_size: int, skip_bad_images=False, device="cpu"):
    """Every image decoded once into a uint8 tensor (N, 3, H, W) on `device`, the labels (N,),
    and how many undecodable images were skipped (with `skip_bad_images`; else the first one
    stops the run, named by its index)."""
    from tqdm.auto import tqdm

    raw = dataset.cast_column(image_column, ImageFeature(decode=False))
    resize = v2.Compose([v2.ToImage(), v2.Resize((image_size, image_size), antialias=True)])
    images, labels, skipped = [], [], 0
    for index, row in enumerate(tqdm(raw, desc="decoding images", leave=False, mininterval=2)):
        try:
            images.append(resize(decode_image(row[image_column])))
        except Exception as error:
            if not skip_bad_images:
                raise UserError(
                    f"cannot decode the image at dataset index {index} ({type(error).__name__}: {error}); "
                    "fix or remove it, or set --skip_bad_images true to skip such images"
                ) from error
            skipped += 1
            continue
        labels.append(row[label_column])
    if not images:
        raise UserError("no image of the dataset could be decoded")
    return torch.stack(images).to(device), torch.tensor(labels, dtype=torch.long, device=device), skipped


# -------------------------------------------------------------------------- augmentation


def sample_seed(*keys: int) -> int:
    """A 63-bit seed from integers (the hash of an int tuple is the same in every process)."""
    return hash(tuple(keys)) & 0x7FFF_FFFF_FFFF_FFFF


def augmentation_policy(name: str):
    """The automatic augmentation policy by name (None for "none"), for uint8 images."""
    if name not in AUTO_AUGMENT_CHOICES:
        raise ValueError(f"auto_augment must be one of {AUTO_AUGMENT_CHOICES}, got {name!r}")
    return {
        "autoaugment": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10),
        "randaugment": v2.RandAugment,
        "trivialaugment": v2.TrivialAugmentWide,
        "none": lambda: None,
    }[name]()


def random_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per-image random crop (after reflect padding) and horizontal flip of a whole batch
    (B, C, H, W) in a few tensor ops. Written here because torchvision's v2 transforms draw
    one set of parameters per call, that is the same crop for every image of a batch."""
    B, C, H, W = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (padding,) * 4, mode="reflect")  # (B, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * padding + 1, (B, 1, 1), generator=generator, device=device)
    dx = torch.randint(0, 2 * padding + 1, (B, 1, 1), generator=generator, device=device)
    # flat index of each output pixel in its padded image: (B, H, W)
    index = (dy + torch.arange(H, device=device)[:, None]) * (W + 2 * padding) + dx + torch.arange(W, device=device)
    images = padded.flatten(2).gather(2, index.view(B, 1, H * W).expand(B, C, H * W)).view(B, C, H, W)
    flipped = torch.rand(B, generator=generator, device=device) < 0.5
    return torch.where(flipped[:, None, None, None], images.flip(-1), images)


class DecodedImages(torch.utils.data.Dataset):
    """Decoded images (see `decode_all`) served as whole normalised batches through
    `__getitems__`, so a DataLoader (and Accelerate's sharding of it) hands out batches with no
    per-image Python work. With `train`, each batch is cropped and flipped image by image, after
    the automatic policy, if any; the draws depend only on (seed, epoch, batch)."""

    def __init__(self, images, labels, train=False, auto_augment="none", seed=0):
        self.images, self.labels = images, labels
        self.train = train
        self.policy = augmentation_policy(auto_augment) if train else None
        self.seed = seed
        self.epoch = 0  # set by the training loop
        self.mean = torch.tensor(CIFAR10_MEAN, device=images.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(CIFAR10_STD, device=images.device).view(1, 3, 1, 1) * 255

    def __len__(self):
        return len(self.labels)

    def __getitems__(self, indices):
        index = torch.as_tensor(indices, device=self.images.device)
        images = self.images[index]  # (B, 3, H, W) uint8
        if self.train:
            generator = torch.Generator(device=images.device).manual_seed(sample_seed(self.seed, self.epoch, indices[0]))
            if self.policy is not None:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(sample_seed(self.seed, self.epoch, indices[0], 1))
                    images = torch.stack([self.policy(image) for image in images])
            images = random_crop_flip(images.float(), CROP_PADDING, generator)
        pixel_values = (images.float() - self.mean) / self.std
        return {"pixel_values": pixel_values, "labels": self.labels[index], "__index__": list(indices)}

    def __getitem__(self, index):
        return self.__getitems__([index])


class MixCollator:
    """The DataLoader's collate function: takes a batch from `DecodedImages.__getitems__` and,
    with MixUp or CutMix on, mixes it as a whole (torchvision.transforms.v2), giving soft
    labels (B, num_labels) that sum to 1. With both on, each batch gets one of the two at
    even odds."""

    def __init__(self, num_labels, mixup_alpha=0.0, cutmix_alpha=0.0, seed=0):
        self.seed = seed
        self.epoch = 0  # set by the training loop
        mixers = [mix(alpha=alpha, num_classes=num_labels) for mix, alpha in ((v2.MixUp, mixup_alpha), (v2.CutMix, cutmix_alpha)) if alpha > 0]
        self.mix = v2.RandomChoice(mixers) if mixers else None

    def __call__(self, batch):
        batch = dict(batch)
        first_row = batch.pop("__index__")[0]
        if self.mix is None or len(batch["labels"]) < 2:
            return batch
        device = batch["pixel_values"].device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(sample_seed(self.seed, self.epoch, first_row, -1))
            batch["pixel_values"], batch["labels"] = self.mix(batch["pixel_values"], batch["labels"])
        return batch


def build_datasets(splits, image_column, label_column, image_size, auto_augment, skip_bad_images, seed, device="cpu"):
    """Every split decoded once onto `device` as DecodedImages (the training split augmented),
    and the number of training images skipped as undecodable."""
    datasets, skipped = {}, 0
    for name, split in splits.items():
        images, labels, bad = decode_all(split, image_column, label_column, image_size, skip_bad_images, device)
        skipped += bad if name == "train" else 0
        datasets[name] = DecodedImages(images, labels, train=name == "train", auto_augment=auto_augment, seed=seed)
    return datasets, skipped


def eval_dataloader(dataset: DecodedImages, batch_size: int):
    """Batches of a decoded split in order, unaugmented."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=MixCollator(0))


def first_images(dataset: DecodedImages, limit: int) -> torch.Tensor:
    """The first `limit` images of a decoded split as the model sees them at evaluation:
    normalised, unaugmented, (N, 3, H, W) float32."""
    count = min(limit, len(dataset))
    return DecodedImages(dataset.images[:count], dataset.labels[:count]).__getitems__(list(range(count)))["pixel_values"]


def tta_logits(model, pixel_values: torch.Tensor, flip: bool = True) -> torch.Tensor:
    """A model's float32 logits for a batch; with `flip`, averaged with its mirror image's
    (test-time augmentation)."""
    logits = model(pixel_values=pixel_values).logits.float()
    if flip:
        logits = (logits + model(pixel_values=pixel_values.flip(-1)).logits.float()) / 2
    return logits
