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
from run_folder import UserError, is_local_path

IMAGE_COLUMNS = ("img", "image")
LABEL_COLUMNS = ("label", "labels")
AUTO_AUGMENT_CHOICES = ("autoaugment", "randaugment", "trivialaugment", "none")


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
        raise UserError(f"dataset has no 'train' split; splits found: {sorted(raw)}")
    image_column, label_column = find_columns(raw["train"].column_names)
    if not isinstance(raw["train"].features[label_column], ClassLabel):
        raw = raw.class_encode_column(label_column)
    splits = DatasetDict()
    if "validation" in raw:
        splits["train"], splits["validation"] = raw["train"], raw["validation"]
    else:
        if not 0.0 < train_val_split < 1.0:
            raise UserError(f"train_val_split must be in (0, 1) when the dataset has no validation split, got {train_val_split}")
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


def train_transform(
    image_size: int = 32,
    auto_augment: str = "autoaugment",
    random_crop_padding: int = 4,
    horizontal_flip: bool = True,
    cutout_size: int = 0,
) -> v2.Compose:
    """Per-image training augmentation: crop, flip, an automatic policy, normalise, then
    Cutout (a `cutout_size` square set to zero, i.e. to the mean colour, lying wholly
    inside the image: RandomErasing with its area and aspect ratio fixed)."""
    steps = [v2.ToImage(), v2.Resize((image_size, image_size), antialias=True)]
    if random_crop_padding:
        steps.append(v2.RandomCrop(image_size, padding=random_crop_padding, padding_mode="reflect"))
    if horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    policy = augmentation_policy(auto_augment)
    if policy is not None:
        steps.append(policy)
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    if cutout_size:
        area = (cutout_size / image_size) ** 2
        steps.append(v2.RandomErasing(p=1.0, scale=(area, area), ratio=(1.0, 1.0), value=0))
    return v2.Compose(steps)


def eval_transform(image_size: int = 32) -> v2.Compose:
    """Resize and normalise only: the training pipeline without augmentation."""
    return train_transform(image_size, auto_augment="none", random_crop_padding=0, horizontal_flip=False)


def decode_image(value) -> Image.Image:
    """A datasets Image cell (PIL image, or {'bytes', 'path'} when decoding is off) as RGB,
    so grayscale and RGBA files work too."""
    if isinstance(value, dict):
        value = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
    return value.convert("RGB")


def undecodable(index: int, error: Exception) -> UserError:
    return UserError(
        f"cannot decode the image at dataset index {index} ({type(error).__name__}: {error}); "
        "fix or remove it, or set --skip_bad_images true to skip such images"
    )


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
                    raise undecodable(row, error) from error
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
        if isinstance(rows, dict):  # DecodedImages already returns a stacked batch
            batch = dict(rows)
            first_row = batch.pop("__index__")[0]
        else:
            kept = [row for row in rows if row["pixel_values"] is not None]
            if not kept:
                raise UserError(f"every image of a batch of {len(rows)} failed to decode; is the dataset readable?")
            batch = {
                "pixel_values": torch.stack([row["pixel_values"] for row in kept]),
                "labels": torch.tensor([row["labels"] for row in kept], dtype=torch.long),
                "num_skipped": torch.tensor(len(rows) - len(kept)),
            }
            first_row = rows[0]["__index__"]
        if self.mix is None or len(batch["labels"]) < 2:
            return batch
        device = batch["pixel_values"].device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=self.seed is not None):
            if self.seed is not None:
                torch.manual_seed(sample_seed(self.seed, self.epoch, first_row, -1))
            if torch.rand(()).item() < self.mix_prob:
                batch["pixel_values"], batch["labels"] = self.mix(batch["pixel_values"], batch["labels"])
        return batch


def decode_all(dataset, image_column: str, label_column: str, image_size: int, skip_bad_images=False, device="cpu"):
    """Decode every image once into a uint8 tensor (N, 3, H, W) on `device`, with labels (N,)
    and the number of undecodable images skipped. CIFAR-10's 50,000 images are 150 MB as
    uint8, so they fit in memory, or on a GPU, and no epoch decodes a JPEG again."""
    from tqdm.auto import tqdm

    raw = dataset.cast_column(image_column, ImageFeature(decode=False))
    resize = v2.Compose([v2.ToImage(), v2.Resize((image_size, image_size), antialias=True)])
    images, labels, skipped = [], [], 0
    for index, row in enumerate(tqdm(raw, desc="decoding images", leave=False, mininterval=2)):
        try:
            images.append(resize(decode_image(row[image_column])))
        except Exception as error:
            if not skip_bad_images:
                raise undecodable(index, error) from error
            skipped += 1
            continue
        labels.append(row[label_column])
    if not images:
        raise UserError("no image of the dataset could be decoded")
    return torch.stack(images).to(device), torch.tensor(labels, dtype=torch.long, device=device), skipped


def random_crop_flip(images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Per-image random crop (after reflect padding) and horizontal flip of a whole batch
    (B, C, H, W) in a few tensor ops. Written by hand because torchvision's v2 transforms
    draw one set of parameters per call, i.e. the same crop for every image of a batch."""
    B, C, H, W = images.shape
    device = images.device
    if padding:
        padded = torch.nn.functional.pad(images, (padding,) * 4, mode="reflect")  # (B, C, H+2p, W+2p)
        dy = torch.randint(0, 2 * padding + 1, (B, 1, 1), generator=generator, device=device)
        dx = torch.randint(0, 2 * padding + 1, (B, 1, 1), generator=generator, device=device)
        # flat index of each output pixel in its padded image: (B, H, W)
        index = (dy + torch.arange(H, device=device)[:, None]) * (W + 2 * padding) + dx + torch.arange(W, device=device)
        index = index.view(B, 1, H * W).expand(B, C, H * W)
        images = padded.flatten(2).gather(2, index).view(B, C, H, W)
    if flip:
        flipped = torch.rand(B, generator=generator, device=device) < 0.5
        images = torch.where(flipped[:, None, None, None], images.flip(-1), images)
    return images


def cutout(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Cutout (DeVries and Taylor, 2017) for a whole batch (B, C, H, W): in each image a
    `size` x `size` square at a random place wholly inside it is set to zero, which for
    normalised images is the mean colour. The batched twin of train_transform's."""
    B, C, H, W = images.shape
    device = images.device
    top = torch.randint(0, H - size + 1, (B, 1, 1), generator=generator, device=device)
    left = torch.randint(0, W - size + 1, (B, 1, 1), generator=generator, device=device)
    rows = torch.arange(H, device=device).view(1, H, 1)
    cols = torch.arange(W, device=device).view(1, 1, W)
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)  # (B, H, W)
    return images.masked_fill(inside[:, None], 0.0)


def tta_views(pixel_values: torch.Tensor, shift: int = 0) -> list[tuple[torch.Tensor, float]]:
    """The views of a batch (B, C, H, W) that test-time augmentation averages over, each
    with its weight (the weights sum to 1): the batch and its mirror image, and with
    `shift` > 0 also both of them translated by `shift` pixels down-right and up-left
    (reflect padding, as in training's random crop). The untranslated pair keeps half
    the weight, so a shift can only refine, not outvote, the view the model sees most."""
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    pairs = [pixel_values]
    if shift:
        H, W = pixel_values.shape[-2:]
        padded = torch.nn.functional.pad(pixel_values, (shift,) * 4, mode="reflect")
        pairs += [padded[..., :H, :W], padded[..., 2 * shift:, 2 * shift:]]
    weights = [1.0] if not shift else [0.5, 0.25, 0.25]
    return [(view, weight / 2) for images, weight in zip(pairs, weights) for view in (images, images.flip(-1))]


def tta_logits(model, pixel_values: torch.Tensor, flip: bool = True, shift: int = 0) -> torch.Tensor:
    """A model's float32 logits for a batch, averaged over its test-time views (`tta_views`:
    the mirror image, and with `shift` the shifted pairs) when `flip`; the one test-time
    augmentation of the project, for evaluation, distillation targets and run_eval.py."""
    if not flip:
        return model(pixel_values=pixel_values).logits.float()
    return sum(weight * model(pixel_values=view).logits.float() for view, weight in tta_views(pixel_values, shift))


class DecodedImages(torch.utils.data.Dataset):
    """Images decoded once (see `decode_all`), served as whole augmented, normalised batches
    through `__getitems__`, so a DataLoader (and Accelerate's sharding of it) hands out
    batches without per-image Python work. With the tensors on a GPU, augmentation runs
    there too. AutoAugment-style policies stay available but run image by image."""

    def __init__(
        self, images, labels, train=False, random_crop_padding=4, horizontal_flip=True, auto_augment="none", seed=0, cutout_size=0
    ):
        self.images, self.labels = images, labels
        self.train = train
        self.padding = random_crop_padding
        self.flip = horizontal_flip
        self.cutout_size = cutout_size
        self.policy = augmentation_policy(auto_augment) if train else None
        self.seed = seed
        self.epoch = 0
        device = images.device
        self.mean = torch.tensor(CIFAR10_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(CIFAR10_STD, device=device).view(1, 3, 1, 1) * 255

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
            images = random_crop_flip(images.float(), self.padding, self.flip, generator)
        pixel_values = (images.float() - self.mean) / self.std
        if self.train and self.cutout_size:
            pixel_values = cutout(pixel_values, self.cutout_size, generator)
        return {
            "pixel_values": pixel_values,
            "labels": self.labels[index],
            "num_skipped": torch.tensor(0),
            "__index__": list(indices),
        }

    def __getitem__(self, index):
        return self.__getitems__([index])


def normalized_images(dataset, image_column: str, label_column: str, image_size: int, limit: int) -> torch.Tensor:
    """The first `limit` images of a split as the model sees them at evaluation: decoded,
    resized and normalised, (N, 3, H, W) float32. Undecodable images are left out."""
    sample = dataset.select(range(min(limit, len(dataset))))
    images, labels, _ = decode_all(sample, image_column, label_column, image_size, skip_bad_images=True)
    return DecodedImages(images, labels).__getitems__(list(range(len(labels))))["pixel_values"]


def build_datasets(splits, image_column, label_column, data: dict, image_size: int = 32, seed: int = 0, device="cpu"):
    """Training and evaluation datasets that yield `pixel_values` and `labels`, augmented as
    the data settings say (`data`: the data section of default.yaml, or any dict with its
    augmentation keys; `CROP_FLIP` fills in what it lacks). The one builder of the training
    augmentation, for run_train.py, benchmark.py and scripts/average_models.py.

    `decode_once` false: lazy `datasets` transforms (`with_transform`), decoding and
    augmenting image by image, in DataLoader workers if asked. True: every split decoded
    once into uint8 tensors on `device` (see DecodedImages).

    Returns the datasets by split name, the training augmentation (whose `epoch` the
    training loop sets, to seed it), and the number of images skipped at decoding."""
    data = {**CROP_FLIP, **data}
    augment = image_augmentation(data)
    datasets, skipped = {}, 0
    if data["decode_once"]:
        for name, split in splits.items():
            images, labels, bad = decode_all(split, image_column, label_column, image_size, data["skip_bad_images"], device)
            skipped += bad if name == "train" else 0
            datasets[name] = DecodedImages(images, labels, train=name == "train", seed=seed, **augment)
        return datasets, datasets["train"], skipped
    train = ImageTransform(train_transform(image_size, **augment), image_column, label_column, data["skip_bad_images"], seed=seed)
    evaluation = ImageTransform(eval_transform(image_size), image_column, label_column, data["skip_bad_images"])
    for name, split in splits.items():
        datasets[name] = with_image_transform(split, train if name == "train" else evaluation)
    return datasets, train, skipped


def image_augmentation(data: dict) -> dict:
    """The per-image augmentation keys of a data section (CROP_FLIP for those it lacks), as
    DecodedImages and train_transform take them."""
    return {key: data.get(key, CROP_FLIP[key]) for key in ("random_crop_padding", "horizontal_flip", "auto_augment", "cutout_size")}


def mix_collator(data: dict, num_labels: int, seed=None) -> "MixCollator":
    """The training batches' MixUp / CutMix as the data settings say (none in CROP_FLIP)."""
    data = {**CROP_FLIP, **data}
    return MixCollator(num_labels, data["mixup_alpha"], data["cutmix_alpha"], data["mix_prob"], data["mix_switch_prob"], seed=seed)


# Random crop and flip alone: the augmentation of a data section that names no other.
CROP_FLIP = {
    "random_crop_padding": 4, "horizontal_flip": True, "cutout_size": 0, "auto_augment": "none", "mixup_alpha": 0.0,
    "cutmix_alpha": 0.0, "mix_prob": 1.0, "mix_switch_prob": 0.5, "decode_once": True, "skip_bad_images": False,
}
