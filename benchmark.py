"""Measure how fast the hybrid ViT trains and infers, against transformers' stock ViT of the same
width, depth and token count, and against the machine's own ceiling.

    python benchmark.py                                        # the default design and its backbone alone
    python benchmark.py --configs configs/backbone_only.yaml --mixed_precision auto

For each configuration (a file layered over default.yaml, as run_train.py layers it), in one
run on one machine:
- training images/s of a full step (forward, backward, the run's two optimisers), with the
  run's input pipeline (decoded images cropped, flipped and mixed in batches) and without it
  (one batch already in memory), so the gap shows whether input is the bottleneck;
- inference images/s at a large batch, and latency at batch 1;
- FLOPs per image (torch.utils.flop_counter) and training FLOP/s as a fraction of a large
  float32 matrix product's FLOP/s, measured in the same run.
Writes a JSON report and a markdown table.
"""

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import hardware
from errors import command
from cifar10_data import MixCollator, build_datasets, load_splits
from optimization import make_optimizers
from training_settings import load_settings

PROJECT_ROOT = Path(__file__).resolve().parent
SHARED_CIFAR10 = PROJECT_ROOT.parent / "shared" / "data" / "cifar10"


def machine_description(device) -> dict:
    import accelerate
    import torchvision
    import transformers

    return {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else hardware.cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
    }


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(size: int, dtype: torch.dtype, device, seconds: float = 2.0) -> float:
    """FLOP/s of a size x size matrix product: the machine's practical ceiling."""
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    synchronize(device)
    return 2 * size**3 * count / (time.perf_counter() - start)


def build_models(model_settings: dict) -> dict:
    """Our model and the stock ViT with the same width, depth, heads, MLP and token count."""
    from transformers import ViTConfig, ViTForImageClassification

    from configuration_hybrid_vit import HybridViTConfig
    from modeling_hybrid_vit import HybridViTForImageClassification

    config = HybridViTConfig(**model_settings)
    vit = ViTConfig(image_size=config.image_size, patch_size=config.patch_size, hidden_size=config.hidden_size,
                    num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
                    intermediate_size=config.intermediate_size, hidden_act=config.hidden_act, num_labels=config.num_labels)
    return {"hybrid-vit": HybridViTForImageClassification(config), "stock-vit": ViTForImageClassification(vit)}


def flops_per_image(model, image_size: int, device, train: bool) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 3, image_size, image_size, device=device)
    model.train(train)
    with FlopCounterMode(display=False) as counter:
        logits = model(pixel_values=x).logits
        if train:
            logits.sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def pipeline_batches(settings, batch_size: int, dataset_name: str, max_samples: int, device):
    """The run's own training input pipeline over `max_samples` images: a DataLoader."""
    data = settings.data
    splits, image_column, label_column = load_splits(dataset_name, 0.1, 0, max_train_samples=max_samples)
    datasets, _ = build_datasets({"train": splits["train"]}, image_column, label_column, 32, data.auto_augment, True, 0, device)
    collator = MixCollator(splits["train"].features[label_column].num_classes, data.mixup_alpha, data.cutmix_alpha)
    return torch.utils.data.DataLoader(datasets["train"], batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=collator)


def training_throughput(model, batches, optimizers, device, autocast_dtype, warmup: int, repeats: int) -> float:
    """Images/s of full training steps on `batches` (an iterable of batches)."""
    import torch.nn.functional as F

    model.train()
    sizes = []

    def step(batch):
        x = batch["pixel_values"].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(pixel_values=x).logits
        F.cross_entropy(logits.float(), batch["labels"].to(device)).backward()  # integer or mixed (soft) labels
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sizes.append(x.shape[0])

    seconds, _ = hardware.seconds_per_training_step(step, batches, model, optimizers, device, warmup, repeats)
    return sizes[-1] / seconds


def inference(model, image_size: int, device, autocast_dtype, batch_size: int, warmup: int, repeats: int):
    """Images/s at `batch_size` and the median milliseconds of one image."""
    model.eval()
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=torch.channels_last)

    def seconds(inputs, times):
        for index in range(warmup + times):
            if index == warmup:
                synchronize(device)
                start, each = time.perf_counter(), []
            begin = time.perf_counter()
            with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                model(pixel_values=inputs)
            synchronize(device)
            if index >= warmup:
                each.append(time.perf_counter() - begin)
        return time.perf_counter() - start, each

    total, _ = seconds(x, repeats)
    _, single = seconds(x[:1], max(repeats * 5, 10))
    return batch_size * repeats / total, 1000 * statistics.median(single)


def measure(path, name: str, args, dataset_name: str, device, autocast_dtype) -> dict:
    """One config's model: training images/s with its input pipeline and without, inference
    images/s and latency, FLOPs per image."""
    settings = load_settings([] if path == "default.yaml" else ["--config", str(path)])
    model = build_models(asdict(settings.model))[name].to(device).to(memory_format=torch.channels_last)
    size = model.config.image_size
    # The run's optimisers (Nesterov SGD and AdamW); the stock ViT's parameters are all AdamW's.
    optimizers = make_optimizers(model, settings.optimizer) if name == "hybrid-vit" else [torch.optim.AdamW(model.parameters())]
    fixed = [{"pixel_values": torch.randn(args.batch_size, 3, size, size, device=device),
              "labels": torch.randint(0, 10, (args.batch_size,), device=device)}]
    loader = pipeline_batches(settings, args.batch_size, dataset_name, args.max_samples, device)
    train_flops = flops_per_image(model, size, device, train=True)
    model_only = training_throughput(model, fixed, optimizers, device, autocast_dtype, args.warmup, args.repeats)
    throughput, latency = inference(model, size, device, autocast_dtype, args.inference_batch_size, args.warmup, args.repeats)
    return {
        "config": str(path), "model": name, "optimizer": " + ".join(type(o).__name__ for o in optimizers),
        "parameters": sum(p.numel() for p in model.parameters()), "tokens": (size // model.config.patch_size) ** 2,
        "forward_gflops_per_image": flops_per_image(model, size, device, train=False) / 1e9,
        "train_gflops_per_image": train_flops / 1e9,
        "train_images_per_second_with_data": training_throughput(model, loader, optimizers, device, autocast_dtype, args.warmup, args.repeats),
        "train_images_per_second": model_only, "train_gflops_per_second": train_flops * model_only / 1e9,
        "inference_images_per_second": throughput, "latency_ms_batch_1": latency,
    }


def markdown_table(report: dict) -> str:
    machine, settings = report["machine"], report["settings"]
    lines = [
        f"Measured {machine['date']} on {machine['device']} ({machine['cpu_capability']}, {machine['torch_threads']} torch "
        f"threads), torch {machine['torch']}, transformers {machine['transformers']}; precision {settings['mixed_precision']}, "
        f"training batch {settings['batch_size']}. Ceiling: {report['matmul_size']}x{report['matmul_size']} matmul, float32 "
        f"{report['matmul_gflops_float32']:.0f} GFLOP/s"
        + (f", bfloat16 {report['matmul_gflops_bfloat16']:.0f} GFLOP/s." if report["matmul_gflops_bfloat16"] else "."),
        "",
        "| config | model | optimizer | params | tokens | train GFLOP/img | train img/s (with input pipeline) | train img/s "
        f"(model only) | train GFLOP/s (% of fp32 matmul) | inference img/s (batch {settings['inference_batch_size']}) | "
        "latency ms (batch 1) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["results"]:
        lines.append(
            f"| {row['config']} | {row['model']} | {row['optimizer']} | {row['parameters'] / 1e6:.2f} M | {row['tokens']} "
            f"| {row['train_gflops_per_image']:.3f} | {row['train_images_per_second_with_data']:.0f} "
            f"| {row['train_images_per_second']:.0f} | {row['train_gflops_per_second']:.0f} ({100 * row['fraction_of_matmul']:.0f}%) "
            f"| {row['inference_images_per_second']:.0f} | {row['latency_ms_batch_1']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["default.yaml", "configs/backbone_only.yaml"],
                        help="config files, each layered over default.yaml")
    parser.add_argument("--dataset_name", default=str(SHARED_CIFAR10) if SHARED_CIFAR10.is_dir() else "uoft-cs/cifar10",
                        help="images for the with-pipeline measurement (default: the shared CIFAR-10 copy, else the Hub's)")
    parser.add_argument("--max_samples", type=int, default=4096, help="images loaded for the pipeline measurement")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--inference_batch_size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--matmul_size", type=int, default=2048)
    parser.add_argument("--mixed_precision", choices=["auto", "no", "bf16"], default="auto",
                        help="auto: bf16 where the device runs it natively, as run_train.py decides")
    parser.add_argument("--models", nargs="+", choices=["hybrid-vit", "stock-vit"], default=["hybrid-vit", "stock-vit"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output_json", default="benchmark.json")
    parser.add_argument("--output_md", default="benchmark.md")
    return parser.parse_args(argv)


@command
def main(argv=None) -> int:
    from tqdm.auto import tqdm

    args = parse_args(argv)
    args.configs = [path if path == "default.yaml" or Path(path).is_file() else str(PROJECT_ROOT / path) for path in args.configs]
    device = torch.device(args.device)
    precision, reason = hardware.choose_mixed_precision(args.mixed_precision, device)
    print(f"mixed precision: {precision} ({reason})", file=sys.stderr)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as run_train.py does
    autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    torch.manual_seed(0)
    report = {
        "machine": machine_description(device),
        "command": "python benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {"mixed_precision": precision, "batch_size": args.batch_size, "inference_batch_size": args.inference_batch_size},
        "matmul_size": args.matmul_size,
        "matmul_gflops_float32": matmul_flops(args.matmul_size, torch.float32, device) / 1e9,
        # bf16's ceiling only where this run uses it: an emulated 2048^2 product takes a minute
        "matmul_gflops_bfloat16": matmul_flops(args.matmul_size, torch.bfloat16, device) / 1e9 if precision == "bf16" else None,
        "results": [],
    }
    for path, name in tqdm([(path, name) for path in args.configs for name in args.models], desc="benchmark"):
        if name == "stock-vit" and not load_settings(["--config", path] if path != "default.yaml" else []).model.num_hidden_layers:
            continue  # a backbone alone has no ViT twin
        row = measure(path, name, args, args.dataset_name, device, autocast_dtype)
        row["fraction_of_matmul"] = row["train_gflops_per_second"] / report["matmul_gflops_float32"]
        report["results"].append(row)
    Path(args.output_json).write_text(json.dumps(report, indent=2))
    table = markdown_table(report)
    Path(args.output_md).write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
