"""Shared fixtures: tiny configs and models, tiny in-memory datasets, and a helper that
runs Python in a fresh process without the project on its path."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Tiny tensors: two threads only fight over the two cores.
torch.set_num_threads(1)

from configuration_hybrid_vit import HybridViTConfig  # noqa: E402
from modeling_hybrid_vit import HybridViTForImageClassification  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = PROJECT_ROOT.parent / "shared" / "data" / "cifar10"

# Two self-attention blocks over a 4x4 grid of 16 tokens: small, and every attention path.
TINY_MODEL = dict(
    image_size=16,
    backbone_hidden_sizes=[8, 16],
    token_stages=1,
    hidden_size=16,
    num_hidden_layers=2,
    class_attention_layers=0,
    num_attention_heads=2,
    intermediate_size=32,
)


@pytest.fixture
def tiny_config():
    return HybridViTConfig(**TINY_MODEL)


@pytest.fixture
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return HybridViTForImageClassification(tiny_config).eval()


def run_isolated(code: str, cwd, timeout=300) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter whose working directory is `cwd` and whose
    sys.path holds neither the project nor its two model modules (an import of either by
    name fails), as for a Hub user loading a folder with trust_remote_code=True."""
    prelude = textwrap.dedent(
        """
        import sys, importlib.abc
        class _BlockProject(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name in ("configuration_hybrid_vit", "modeling_hybrid_vit", "cifar10_data", "hub_folder", "run_train"):
                    raise ImportError(f"{name} must not be importable here")
        sys.meta_path.insert(0, _BlockProject())
        sys.path = [p for p in sys.path if p not in ("", ".", %r)]
        """
        % str(PROJECT_ROOT)
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(Path(cwd) / "hf_modules")
    env["HF_HUB_OFFLINE"] = "1"
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # the same reduction order as this process
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def make_image_dataset(num_per_class=8, num_classes=3, size=16, seed=0, names=None):
    """A tiny labelled image dataset built in memory, with the Hub CIFAR-10 schema
    (`img` as datasets.Image, `label` as ClassLabel). Each class has its own colour so a
    model can learn it in a few steps."""
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    rng = np.random.default_rng(seed)
    names = names or [f"class_{i}" for i in range(num_classes)]
    images, labels = [], []
    for label in range(num_classes):
        colour = np.array([(label * 97) % 256, (label * 41 + 80) % 256, (label * 173 + 30) % 256])
        for _ in range(num_per_class):
            pixels = np.clip(colour + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            images.append(PILImage.fromarray(pixels))
            labels.append(label)
    features = Features({"img": Image(), "label": ClassLabel(names=names)})
    return Dataset.from_dict({"img": images, "label": labels}, features=features)


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf_cache")
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(cache),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory):
    """Parquet files like the shared CIFAR-10 copy: 30 training images of 3 classes, and a
    test split of 9, so the run must carve a validation split and report test separately."""
    folder = tmp_path_factory.mktemp("tiny_cifar")
    make_image_dataset(num_per_class=10, seed=0).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    make_image_dataset(num_per_class=3, seed=1).to_parquet(str(folder / "test-00000-of-00001.parquet"))
    return folder
