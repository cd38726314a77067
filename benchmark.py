"""Measure training and inference speed of the hybrid ViT against transformers' stock ViT
at the same width, depth and token count, and against the machine's own ceiling.

    python benchmark.py                                    # default.yaml and configs/cpu.yaml models
    python benchmark.py --configs configs/cpu.yaml --mixed_precision bf16 --channels_last

For each configuration, in one run on one machine:
- training images/s for a full step (forward, backward, and the config's optimiser as
  run_train.py builds it: AdamW or Nesterov SGD), with the input pipeline
  (the config's own: lazy `datasets` transforms or decode-once tensors) and without it
  (a fixed batch already in memory), so the gap shows whether input is the bottleneck;
- inference images/s at batch 256 and latency at batch 1;
- FLOPs per image (counted by torch.utils.flop_counter) and training FLOP/s as a fraction
  of a large float32 matrix product's FLOP/s measured in the same run.
Writes a JSON file and a markdown table (appended to nothing: the caller pastes it).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

PROJECT_ROOT = Path(__file__).resolve().parent
SHARED_CIFAR10 = PROJECT_ROOT.parent / "shared" / "data" / "cifar10"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device) -> dict:
    import accelerate
    import datasets
    import torchvision
    import transformers

    return {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else cpu_model(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
    }


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_flops(size: int, dtype: torch.dtype, device, seconds: float = 2.0) -> float:
    """FLOP/s of a size x size matrix product: the machine's practical ceiling."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    synchronize(device)
    return 2 * size**3 * count / (time.perf_counter() - start)


def load_run_settings(path) -> dict:
    """A config file layered over default.yaml, as run_train.py does."""
    from run_train import load_settings

    return load_settings([] if Path(path).resolve() == (PROJECT_ROOT / "default.yaml") else ["--config", str(path)])


def build_models(model_settings: dict):
    """Our model and the stock ViT with the same width, depth, heads, MLP and token count."""
    from transformers import ViTConfig, ViTForImageClassification

    from configuration_hybrid_vit import HybridViTConfig
    from modeling_hybrid_vit import HybridViTForImageClassification

    config = HybridViTConfig(**model_settings)
    ours = HybridViTForImageClassification(config)
    vit = ViTForImageClassification(
        ViTConfig(
            image_size=config.image_size,
            patch_size=config.patch_size,  # 32 / 4: the same 8x8 grid of 64 tokens
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act,
            num_labels=config.num_labels,
            attn_implementation=config._attn_implementation,  # the same attention code path as ours
        )
    )
    return {"hybrid-vit": ours, "stock-vit": vit}


def flops_per_image(model, image_size, device, train: bool) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 3, image_size, image_size, device=device)
    model.train(train)
    with FlopCounterMode(display=False) as counter:
        logits = model(pixel_values=x).logits
        if train:
            logits.sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def time_calls(step, warmup: int, repeats: int, device) -> list[float]:
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def training_throughput(model, batches, optimizers, device, autocast_dtype, memory_format, warmup, repeats) -> float:
    """Images/s of full training steps; `batches()` yields each step's batch (from the
    pipeline, or the same batch over and over)."""
    import torch.nn.functional as F

    from run_train import step_optimizers

    model.train()
    iterator = batches()

    def step():
        batch = next(iterator)
        x = batch["pixel_values"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
        labels = batch["labels"].to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(pixel_values=x).logits
        loss = F.cross_entropy(logits.float(), labels)  # integer or MixUp/CutMix soft labels
        loss.backward()
        step_optimizers(optimizers)
        return x.shape[0]

    sizes = []
    times = time_calls(lambda: sizes.append(step()), warmup, repeats, device)
    return sum(sizes[-repeats:]) / sum(times)


def inference(model, image_size, device, autocast_dtype, memory_format, batch_size, warmup, repeats):
    model.eval()
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=memory_format)
    one = x[:1].contiguous(memory_format=memory_format)

    def run(inputs):
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            model(pixel_values=inputs)

    throughput = batch_size * repeats / sum(time_calls(lambda: run(x), warmup, repeats, device))
    latency = statistics.median(time_calls(lambda: run(one), warmup, max(repeats * 5, 10), device))
    return throughput, latency * 1000


def pipeline_batches(settings, batch_size, dataset_name, max_samples, device, num_labels):
    """An endless iterator over the config's own training input pipeline."""
    from torch.utils.data import DataLoader

    import cifar10_data

    data = settings["data"]
    splits, image_column, label_column = cifar10_data.load_splits(dataset_name, 0.1, 0, max_train_samples=max_samples)
    datasets, _, _ = cifar10_data.build_datasets(
        {"train": splits["train"]}, image_column, label_column, data, image_size=settings["model"]["image_size"], seed=0, device=device
    )
    collator = cifar10_data.mix_collator(data, num_labels, seed=0)
    loader = DataLoader(
        datasets["train"], batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=collator,
        num_workers=0 if data["decode_once"] else data["dataloader_num_workers"],
        persistent_workers=not data["decode_once"] and data["dataloader_num_workers"] > 0,
    )

    def batches():
        while True:
            yield from loader

    return batches


def fixed_batches(batch_size, image_size, device):
    batch = {
        "pixel_values": torch.randn(batch_size, 3, image_size, image_size, device=device),
        "labels": torch.randint(0, 10, (batch_size,), device=device),
    }

    def batches():
        while True:
            yield batch

    return batches


def synthetic_dataset_folder(folder: Path, image_size: int, count: int = 512) -> str:
    """CIFAR-shaped random images as parquet, for machines without the real data."""
    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    if not (folder / "train-00000-of-00001.parquet").exists():
        rng = np.random.default_rng(0)
        images = [PILImage.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)) for _ in range(count)]
        features = Features({"img": Image(), "label": ClassLabel(num_classes=10)})
        Dataset.from_dict({"img": images, "label": [i % 10 for i in range(count)]}, features=features).to_parquet(
            str(folder / "train-00000-of-00001.parquet")
        )
    return str(folder)


def markdown_table(report: dict) -> str:
    machine = report["machine"]
    lines = [
        f"Measured {machine['date']} on {machine['device']} ({machine['cores']} cores, {machine['torch_threads']} torch threads), "
        f"torch {machine['torch']}, torchvision {machine['torchvision']}, transformers {machine['transformers']}, "
        f"accelerate {machine['accelerate']}; precision {report['settings']['mixed_precision']}, "
        f"channels_last {report['settings']['channels_last']}, training batch {report['settings']['batch_size']}.",
        f"Machine ceiling: float32 {report['matmul_size']}x{report['matmul_size']} matmul "
        f"{report['matmul_gflops_float32']:.0f} GFLOP/s"
        + (f", bfloat16 {report['matmul_gflops_bfloat16']:.0f} GFLOP/s." if report.get("matmul_gflops_bfloat16") else "."),
        "",
        "| config | model | attention | optimizer | params | tokens | train GFLOP/img | train img/s (with input pipeline) | train img/s (model only) "
        f"| train GFLOP/s (% of fp32 matmul) | inference img/s (batch {report['settings']['inference_batch_size']}) | latency ms (batch 1) |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["results"]:
        lines.append(
            f"| {row['config']} | {row['model']} | {row['attention']} | {row['optimizer']} | {row['parameters'] / 1e6:.2f} M | {row['tokens']} "
            f"| {row['train_gflops_per_image']:.3f} | {row['train_images_per_second_with_data']:.0f} "
            f"| {row['train_images_per_second']:.0f} | {row['train_gflops_per_second']:.0f} ({100 * row['fraction_of_matmul']:.0f}%) "
            f"| {row['inference_images_per_second']:.0f} | {row['latency_ms_batch_1']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["default.yaml", "configs/cpu.yaml"], help="config files (layered over default.yaml)")
    parser.add_argument("--dataset_name", default=str(SHARED_CIFAR10) if SHARED_CIFAR10.is_dir() else None,
                        help="images for the with-pipeline measurement (default: the shared CIFAR-10 copy, else random images)")
    parser.add_argument("--max_samples", type=int, default=4096, help="images loaded for the pipeline measurement")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--inference_batch_size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--matmul_size", type=int, default=2048)
    parser.add_argument("--mixed_precision", choices=["auto", "no", "bf16"], default="no",
                        help="auto: bf16 where the device runs it natively, as run_train.py decides")
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--models", nargs="+", choices=["hybrid-vit", "stock-vit"], default=["hybrid-vit", "stock-vit"],
                        help="which models to measure for each config (default: both, side by side)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output_json", default="benchmark.json")
    parser.add_argument("--output_md", default="benchmark.md")
    args = parser.parse_args(argv)

    from tqdm.auto import tqdm

    from run_train import choose_mixed_precision

    device = torch.device(args.device)
    if args.mixed_precision == "auto":
        args.mixed_precision, reason = choose_mixed_precision("auto", device)
        print(f"mixed precision: {args.mixed_precision} ({reason})", file=sys.stderr)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as run_train.py does
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    report = {
        "machine": machine_description(device),
        "command": "python benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {
            "mixed_precision": args.mixed_precision,
            "channels_last": args.channels_last,
            "batch_size": args.batch_size,
            "inference_batch_size": args.inference_batch_size,
        },
        "matmul_size": args.matmul_size,
        "matmul_gflops_float32": matmul_flops(args.matmul_size, torch.float32, device) / 1e9,
        "matmul_gflops_bfloat16": matmul_flops(args.matmul_size, torch.bfloat16, device) / 1e9,
        "results": [],
    }
    dataset_name = args.dataset_name or synthetic_dataset_folder(Path(args.output_json).resolve().parent, 32)
    jobs = [(path, name) for path in args.configs for name in args.models]
    for path, name in tqdm(jobs, desc="benchmark"):
        row = measure(path, name, args, dataset_name, device, autocast_dtype, memory_format)
        row["fraction_of_matmul"] = row["train_gflops_per_second"] / report["matmul_gflops_float32"]
        report["results"].append(row)
    Path(args.output_json).write_text(json.dumps(report, indent=2))
    table = markdown_table(report)
    Path(args.output_md).write_text(table)
    print(table)
    return report


def measure(path, name, args, dataset_name, device, autocast_dtype, memory_format) -> dict:
    """One config's model: training images/s with its input pipeline and without, inference
    images/s and latency, FLOPs per image."""
    from run_train import make_optimizers

    settings = load_run_settings(path)
    model = build_models(settings["model"])[name].to(device).to(memory_format=memory_format)
    image_size = settings["model"]["image_size"]
    train_flops = flops_per_image(model, image_size, device, train=True)
    # The step's optimiser is the run's (its learning rate does not change the speed).
    optimizers = make_optimizers(model, settings["training"])
    with_data = training_throughput(
        model, pipeline_batches(settings, args.batch_size, dataset_name, args.max_samples, device, model.config.num_labels),
        optimizers, device, autocast_dtype, memory_format, args.warmup, args.repeats,
    )
    model_only = training_throughput(
        model, fixed_batches(args.batch_size, image_size, device), optimizers, device, autocast_dtype, memory_format,
        args.warmup, args.repeats,
    )
    throughput, latency = inference(
        model, image_size, device, autocast_dtype, memory_format, args.inference_batch_size, args.warmup, args.repeats
    )
    return {
        "config": path,
        "model": name,
        "attention": model.config._attn_implementation,
        "optimizer": " + ".join(type(optimizer).__name__ for optimizer in optimizers),
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens": (image_size // model.config.patch_size) ** 2,
        "forward_gflops_per_image": flops_per_image(model, image_size, device, train=False) / 1e9,
        "train_gflops_per_image": train_flops / 1e9,
        "train_images_per_second_with_data": with_data,
        "train_images_per_second": model_only,
        "train_gflops_per_second": train_flops * model_only / 1e9,
        "inference_images_per_second": throughput,
        "latency_ms_batch_1": latency,
    }


if __name__ == "__main__":
    main()
