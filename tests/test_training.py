"""run_train.py end to end on tiny in-memory datasets: the output folder, exact resume, the
checkpoints, the time limit, two processes, the control without a transformer, and the data
pipeline and optimisers it is built from."""

import json
import shutil
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

import cifar10_data
import hub_folder
import run_train
from configuration_hybrid_vit import HybridViTConfig
from evaluation import accuracy, predict
from modeling_hybrid_vit import HybridViTForImageClassification
from optimization import make_optimizers
from tests.conftest import PROJECT_ROOT, SHARED_CIFAR10, make_image_dataset, run_isolated
from training_settings import OptimizerSettings

# The default design (64 pyramid tokens read by one class-attention block), shrunk.
TINY_ARGS = ["--backbone_hidden_sizes=8,16,16", "--hidden_size=16", "--num_attention_heads=2", "--intermediate_size=32"]
FAST_ARGS = ["--per_device_train_batch_size=4", "--per_device_eval_batch_size=8", "--mixed_precision=no", "--report_to=none",
             "--logging_steps=1", "--checkpointing_steps=null"]


def train(args, env, cwd=PROJECT_ROOT, launcher=None, timeout=600):
    command = (launcher or [sys.executable]) + [str(PROJECT_ROOT / "run_train.py")] + args
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def base_args(dataset_dir, output_dir, *extra):
    return ["--dataset_name", str(dataset_dir), "--output_dir", str(output_dir), "--train_val_split=0.2", *TINY_ARGS, *FAST_ARGS, *extra]


def weights(path):
    return load_file(str(path / "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_short_run_writes_a_hub_folder_that_a_fresh_process_loads(dataset_dir, tmp_path, env):
    out = tmp_path / "run"
    result = train(base_args(dataset_dir, out, "--num_train_epochs=2", "--report_to=tensorboard", "--seed=7"), env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((out / "tensorboard").rglob("events.out.tfevents.*")), "no TensorBoard events written"
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "modeling_hybrid_vit.py", "configuration_hybrid_vit.py",
            "README.md", "all_results.json", "train_config.yaml", "training_log.json"} <= {p.name for p in out.iterdir()}
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_samples"] == 6 and results["test_samples"] == 9  # 20% of 30, stratified; the dataset's test split
    assert results["steps"] == 2 * (24 // 4) and results["epochs"] == 2.0 and not results["schedule_fitted_to_time"]
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "class_0", "1": "class_1", "2": "class_2"} and config["class_attention_layers"] == 1
    assert config.get("problem_type") is None
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert saved["training"]["seed"] == 7 and saved["model"]["hidden_size"] == 16
    assert saved["data"]["dataset_name"] == dataset_dir.name  # a public name, not this machine's path
    card = (out / "README.md").read_text()
    assert f"| validation accuracy with flip test-time augmentation | {results['eval_accuracy_flip_tta']:.4f} |" in card
    assert "model-index" in card and "Hardware" in card and "run_train.py" in card and str(tmp_path) not in card
    log = json.loads((out / "training_log.json").read_text())
    assert [entry["epoch"] for entry in log if "eval_accuracy" in entry] == [1.0, 2.0]
    # The folder's score is the saved model's: re-scored from the files, it is the same.
    model = HybridViTForImageClassification.from_pretrained(out).eval()
    splits, image_column, label_column = cifar10_data.load_splits(str(dataset_dir), 0.2, seed=7)
    images = cifar10_data.DecodedImages(*cifar10_data.decode_all(splits["validation"], image_column, label_column, 32)[:2])
    assert accuracy(*predict(model, cifar10_data.eval_dataloader(images, 8))) == pytest.approx(results["eval_accuracy"])

    work = tmp_path / "elsewhere"
    work.mkdir()
    loaded = run_isolated(
        f"""
        import torch
        from PIL import Image
        from transformers import AutoModelForImageClassification, pipeline
        image = Image.new("RGB", (32, 32), (0, 80, 30))
        model = AutoModelForImageClassification.from_pretrained({str(out)!r}, trust_remote_code=True)
        classify = pipeline("image-classification", model={str(out)!r}, trust_remote_code=True)
        pixels = classify.image_processor(image, return_tensors="pt")["pixel_values"]
        print(model.config.id2label[model(pixel_values=pixels).logits.argmax(-1).item()], classify(image)[0]["label"])
        """,
        cwd=work,
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    direct, piped = loaded.stdout.split()
    assert direct == piped and direct in {"class_0", "class_1", "class_2"}


def straight_and_resumed(dataset_dir, tmp_path, env, args, every, resume_from):
    """A straight run of `args` checkpointing every `every` steps, and a run resumed from a copy
    of its step_`resume_from` checkpoint in a fresh folder. Returns both folders."""
    straight, resumed = tmp_path / f"straight_{every}", tmp_path / f"resumed_{resume_from}"
    result = train(base_args(dataset_dir, straight, *args, f"--checkpointing_steps={every}"), env)
    assert result.returncode == 0, result.stderr[-3000:]
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / f"checkpoints/step_{resume_from}", resumed / f"checkpoints/step_{resume_from}")
    result = train(base_args(dataset_dir, resumed, *args, f"--checkpointing_steps={every}", "--resume_from_checkpoint=latest"), env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {resumed / 'checkpoints' / f'step_{resume_from}'}" in result.stderr
    return straight, resumed


def without_times(log):
    return [{key: value for key, value in entry.items() if key != "train_seconds"} for entry in log]


def test_a_resumed_run_saves_the_model_and_log_of_an_uninterrupted_one(dataset_dir, tmp_path, env):
    """Batch 5 makes 4 steps an epoch; 10 steps with AutoAugment, MixUp/CutMix and label
    smoothing all drawing random numbers. Resumed from the end of an epoch (step 8, after its
    evaluation) and from the middle of one (step 6), the runs save the very model, and the very
    training log, of the uninterrupted runs; and how often a run checkpoints changes nothing."""
    args = ["--max_train_steps=10", "--per_device_train_batch_size=5", "--auto_augment=autoaugment", "--mixup_alpha=0.8",
            "--cutmix_alpha=1.0", "--label_smoothing=0.1"]
    every_2, resumed_8 = straight_and_resumed(dataset_dir, tmp_path, env, args, every=2, resume_from=8)
    every_3, resumed_6 = straight_and_resumed(dataset_dir, tmp_path, env, args, every=3, resume_from=6)
    final = weights(every_2)
    for other in (every_3, resumed_8, resumed_6):
        assert_same_weights(weights(other), final)
    log = without_times(json.loads((every_2 / "training_log.json").read_text()))
    assert [entry["epoch"] for entry in log if "eval_accuracy" in entry] == [1.0, 2.0, 2.5]
    for other in (resumed_8, resumed_6):
        assert without_times(json.loads((other / "training_log.json").read_text())) == log
    # Where each stretch ran is on record, for the card: the resumed run trained in two.
    segments = json.loads((resumed_6 / "all_results.json").read_text())["segments"]
    assert [(s["first_step"], s["last_step"]) for s in segments] == [(0, 6), (6, 10)]
    assert [(s["first_step"], s["last_step"]) for s in json.loads((every_2 / "all_results.json").read_text())["segments"]] == [(0, 10)]
    # The run moved the weights: the comparisons above are not of untouched models.
    assert not torch.equal(weights(every_2 / "checkpoints/step_8")["classifier.weight"], final["classifier.weight"])
    # The newest two checkpoints are kept, the last one the saved model.
    assert sorted(p.name for p in (every_2 / "checkpoints").iterdir()) == ["step_10", "step_8"]
    assert_same_weights(weights(every_2 / "checkpoints/step_10"), final)
    # Another seed trains another model.
    other_seed = tmp_path / "seed_1"
    assert train(base_args(dataset_dir, other_seed, *args, "--seed=1"), env).returncode == 0
    assert not torch.equal(weights(other_seed)["classifier.weight"], final["classifier.weight"])


def test_a_checkpoint_cut_short_is_never_latest(tmp_path):
    folder = tmp_path / "checkpoints"
    for name, complete in (("step_4", True), ("step_6", True), ("step_8", False), ("step_10.tmp", False)):
        (folder / name).mkdir(parents=True)
        if complete:
            (folder / name / "trainer_state.json").write_text("{}")
    complete, incomplete = run_train.list_checkpoints(tmp_path)
    assert [p.name for p in complete] == ["step_4", "step_6"] and [p.name for p in incomplete] == ["step_8"]
    messages = []
    assert run_train.resolve_resume_path("latest", tmp_path, messages.append)[0].name == "step_6"
    assert messages == [f"ignoring incomplete checkpoint {folder / 'step_8'} (cut short when a run stopped)"]


def test_each_part_gets_its_own_optimiser_without_decay_on_norms_biases_positions_or_cls():
    """Nesterov SGD for the convolutions and their BatchNorms, AdamW for everything from the
    token projections on, each with its own learning rate and weight decay."""
    model = HybridViTForImageClassification(HybridViTConfig(backbone_hidden_sizes=[8, 16, 16], hidden_size=16, num_attention_heads=2,
                                                            intermediate_size=32, num_labels=3))
    settings = OptimizerSettings(learning_rate=0.2, weight_decay=1e-3, transformer_learning_rate=1e-3, transformer_weight_decay=0.05)
    backbone, transformer = make_optimizers(model, settings)
    assert isinstance(backbone, torch.optim.SGD) and isinstance(transformer, torch.optim.AdamW)
    assert all(group["nesterov"] and group["momentum"] == 0.9 for group in backbone.param_groups)
    owned = {id(p): name for name, p in model.named_parameters()}
    backbone_names = {owned[id(p)] for g in backbone.param_groups for p in g["params"]}
    transformer_names = {owned[id(p)] for g in transformer.param_groups for p in g["params"]}
    assert not backbone_names & transformer_names and backbone_names | transformer_names == set(owned.values())
    assert all(".embeddings.backbone." in n or ".embeddings.whitening." in n for n in backbone_names)
    assert {"classifier.weight", "hybrid_vit.embeddings.to_tokens.weight", "hybrid_vit.embeddings.lateral_tokens.0.weight"} <= transformer_names
    assert [g["lr"] for g in backbone.param_groups] == [0.2, 0.2] and [g["lr"] for g in transformer.param_groups] == [1e-3, 1e-3]
    assert [g["weight_decay"] for g in backbone.param_groups] == [1e-3, 0.0]
    assert [g["weight_decay"] for g in transformer.param_groups] == [0.05, 0.0]
    exempt = {owned[id(p)] for group in (backbone.param_groups[1], transformer.param_groups[1]) for p in group["params"]}
    assert {"hybrid_vit.embeddings.cls_token", "hybrid_vit.embeddings.position_embeddings", "classifier.bias",
            "hybrid_vit.embeddings.backbone.2.weight"} <= exempt  # the last: a BatchNorm's scale


def test_both_learning_rates_follow_one_warmup_and_cosine_schedule_in_the_log(dataset_dir, tmp_path, env):
    out = tmp_path / "run"
    result = train(base_args(dataset_dir, out, "--max_train_steps=6", "--learning_rate=0.05", "--transformer_learning_rate=2e-3",
                             "--weight_decay=5e-4", "--transformer_weight_decay=0.01", "--warmup_ratio=0.34"), env)
    assert result.returncode == 0, result.stderr[-3000:]
    rates = [entry for entry in json.loads((out / "training_log.json").read_text()) if "train_loss" in entry]
    assert [entry["step"] for entry in rates] == [1, 2, 3, 4, 5, 6]
    assert all(entry["learning_rate"] == pytest.approx(25 * entry["transformer_learning_rate"]) for entry in rates)
    backbone = [entry["learning_rate"] for entry in rates]
    assert backbone[0] < backbone[1] == pytest.approx(0.05) and backbone[-1] == 0.0  # 2 warmup steps, then down to zero


def test_max_train_minutes_stops_the_run_and_still_saves(dataset_dir, tmp_path, env):
    out = tmp_path / "run"
    result = train(base_args(dataset_dir, out, "--max_train_steps=100000", "--max_train_minutes=0.0005"), env)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["stopped_by_time_limit"] is True and 1 <= results["steps"] < 100
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file() and results["eval_samples"] == 6


def test_two_processes_count_every_validation_image_once_and_share_batchnorm(tmp_path, env):
    # 13 validation images do not split evenly over 2 processes x batch 4: the sampler pads,
    # gather_for_metrics must drop the duplicates.
    folder = tmp_path / "data"
    make_image_dataset(num_per_class=13, seed=3).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    out = tmp_path / "run"
    # Accelerate's `--cpu --num_processes 2` starts a single process unless mpirun is set up;
    # torchrun's launcher with ACCELERATE_USE_CPU gives two over gloo.
    with socket.socket() as probe:  # a free port: another run on this machine may hold Accelerate's default
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
                "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={port}"]
    args = base_args(folder, out, "--num_train_epochs=1")
    args[args.index("--train_val_split=0.2")] = "--train_val_split=0.3333"
    result = train(args, {**env, "ACCELERATE_USE_CPU": "1"}, launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_samples"] == 13 and results["eval_accuracy"] * 13 == pytest.approx(round(results["eval_accuracy"] * 13))
    assert "2 process(es)" in results["hardware"] and results["sync_batchnorm"] is True


def test_the_control_without_a_transformer_trains_and_saves_a_model_that_pools_its_tokens(dataset_dir, tmp_path, env):
    out = tmp_path / "control"
    result = train(["--config", "configs/backbone_only.yaml", *base_args(dataset_dir, out, "--max_train_steps=3")], env)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["class_attention_layers"], config["token_stages"], config["pooling"]) == (0, 0, 1, "mean")
    assert config["backbone_hidden_sizes"] == [8, 16, 16]  # the command line still overrides the file
    assert not any(key.startswith("hybrid_vit.layers.") for key in weights(out))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dataset_name", "/nonexistent/cifar"], "dataset folder not found: /nonexistent/cifar"),
        (["--no_such_setting", "3"], "unknown setting --no_such_setting"),
        (["--learning_rate", "fast"], "--learning_rate expects a number, got 'fast'"),
        (["--per_device_train_batch_size", "64"], "the training split has 24 images, fewer than one batch"),
    ],
)
def test_bad_input_exits_with_one_clear_line_and_writes_nothing(dataset_dir, tmp_path, env, extra, message):
    out = tmp_path / "never"
    result = train(base_args(dataset_dir, out, "--max_train_steps=2", *extra), env)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not out.exists()


@pytest.mark.skipif(not SHARED_CIFAR10.is_dir(), reason="../shared/data/cifar10 is not on this machine")
def test_a_minute_of_the_shipped_recipe_on_2000_real_images_learns(tmp_path, env):
    """default.yaml as shipped (precision chosen for this machine, the schedule fitted to the
    time), cut to a minute on 2,000 images: it runs its whole fitted schedule and learns. The
    bar is chance (10%) plus five standard deviations of a chance score on 1,000 images, so it
    fails only for a pipeline that learns nothing."""
    out = tmp_path / "run"
    args = ["--dataset_name", str(SHARED_CIFAR10), "--output_dir", str(out), "--max_train_samples=2000", "--max_eval_samples=1000",
            "--max_train_minutes=1", "--checkpointing_steps=null"]
    result = train(args, {**env, "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_samples"] == 1000 and results["schedule_fitted_to_time"]
    assert results["steps"] == results["max_train_steps"] or results["stopped_by_time_limit"], results
    assert results["eval_accuracy"] > 0.10 + 5 * (0.1 * 0.9 / 1000) ** 0.5, results
    # A run this short still leaves a complete Hub folder.
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "configuration_hybrid_vit.py", "modeling_hybrid_vit.py",
            "README.md", "train_config.yaml", "all_results.json", "training_log.json"} <= {p.name for p in out.iterdir()}


def test_flip_tta_averages_each_images_logits_with_its_mirrors():
    class LeftVersusRight(torch.nn.Module):
        def forward(self, pixel_values):
            columns = pixel_values.mean(dim=(1, 2))  # (B, W)
            return SimpleNamespace(logits=torch.stack([columns[:, 0], columns[:, -1]], dim=-1))

    images = torch.zeros(2, 3, 4, 4)
    images[..., 0] = 1.0  # a bright left edge: class 0
    loader = [{"pixel_values": images, "labels": torch.tensor([0, 0])}]
    plain, labels = predict(LeftVersusRight(), loader)
    flipped, _ = predict(LeftVersusRight(), loader, flip=True)
    assert accuracy(plain, labels) == 1.0 and labels.tolist() == [0, 0]
    torch.testing.assert_close(plain, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    torch.testing.assert_close(flipped, torch.tensor([[0.5, 0.5], [0.5, 0.5]]))  # the mirror votes the other way


def test_the_label_smoothing_setting_is_the_training_losss():
    model = HybridViTForImageClassification(HybridViTConfig(backbone_hidden_sizes=[8, 16, 16], hidden_size=16, num_attention_heads=2,
                                                            intermediate_size=32, num_labels=3))
    loop = SimpleNamespace(model=model, accelerator=SimpleNamespace(backward=lambda loss: loss.backward()))
    batch = {"pixel_values": torch.randn(4, 3, 32, 32), "labels": torch.tensor([0, 1, 2, 1])}
    for smoothing in (0.0, 0.3):
        torch.manual_seed(0)
        loss = run_train.forward_backward(loop, batch, smoothing)
        with torch.no_grad():  # in training mode too: BatchNorm normalises with the batch's statistics
            logits = model(pixel_values=batch["pixel_values"]).logits
        expected = torch.nn.functional.cross_entropy(logits, batch["labels"], label_smoothing=smoothing)
        torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    assert model.classifier.weight.grad is not None  # and it was backpropagated


def test_push_to_hub_uploads_the_finished_folder_with_its_card_and_without_checkpoints(dataset_dir, tmp_path, monkeypatch):
    """The Hub is unreachable here: check the thin huggingface_hub calls a run makes at its end."""
    import huggingface_hub

    calls = {}
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, exist_ok: calls.setdefault("create", (repo_id, exist_ok)))
    monkeypatch.setattr(huggingface_hub, "upload_folder",
                        lambda **kwargs: calls.setdefault("upload", {**kwargs, "files": sorted(p.name for p in tmp_path.joinpath("run").iterdir())}))
    out = tmp_path / "run"
    assert run_train.main(base_args(dataset_dir, out, "--max_train_steps=2", "--checkpointing_steps=1", "--push_to_hub=true",
                                    "--hub_model_id=org/hybrid-vit")) == 0
    assert calls["create"] == ("org/hybrid-vit", True)
    assert calls["upload"]["repo_id"] == "org/hybrid-vit" and calls["upload"]["folder_path"] == str(out)
    assert "checkpoints/*" in calls["upload"]["ignore_patterns"] and "checkpoints" in calls["upload"]["files"]
    assert {"model.safetensors", "README.md", "config.json"} <= set(calls["upload"]["files"])
    assert "# org/hybrid-vit" in (out / "README.md").read_text()  # the card is named for its repository


def test_decoded_batches_are_normalised_and_augmented_per_image_and_epoch():
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(6)
    batch = cifar10_data.DecodedImages(images, labels).__getitems__([4, 1])
    mean = torch.tensor(cifar10_data.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(cifar10_data.CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(batch["pixel_values"], (images[[4, 1]].float() / 255 - mean) / std)
    assert batch["labels"].tolist() == [4, 1]

    augmented = cifar10_data.DecodedImages(images, labels, train=True, auto_augment="autoaugment", seed=0)
    first = augmented.__getitems__([0, 1, 2, 3, 4, 5])["pixel_values"]
    assert first.shape == (6, 3, 8, 8)
    torch.testing.assert_close(augmented.__getitems__([0, 1, 2, 3, 4, 5])["pixel_values"], first)  # seeded
    augmented.epoch = 1
    assert not torch.equal(augmented.__getitems__([0, 1, 2, 3, 4, 5])["pixel_values"], first)  # a new epoch, new draws


def test_crop_and_flip_are_drawn_for_each_image_of_a_batch():
    """Each image is shifted by its own offset (reflect padding) and flipped or not on its own."""
    image = torch.arange(8 * 8, dtype=torch.float32).view(1, 1, 8, 8).expand(256, 3, 8, 8)
    out = cifar10_data.random_crop_flip(image, 4, torch.Generator().manual_seed(0))
    assert out.shape == image.shape
    padded = torch.nn.functional.pad(image[:1], (4,) * 4, mode="reflect")[0, 0]
    windows = {(dy, dx, flip): padded[dy : dy + 8, dx : dx + 8].flip(-1) if flip else padded[dy : dy + 8, dx : dx + 8]
               for dy in range(9) for dx in range(9) for flip in (False, True)}
    seen = {next(key for key, window in windows.items() if torch.equal(window, crop[0])) for crop in out}
    assert len(seen) > 100 and {key[2] for key in seen} == {False, True}


def test_mixup_and_cutmix_give_soft_labels_that_sum_to_one_drawn_per_epoch():
    batch = {"pixel_values": torch.randn(6, 3, 8, 8), "labels": torch.arange(6) % 5, "__index__": list(range(6))}
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0), (0.8, 1.0)):
        mixed = cifar10_data.MixCollator(5, mixup_alpha=mixup, cutmix_alpha=cutmix, seed=0)(batch)
        assert mixed["labels"].shape == (6, 5) and mixed["labels"].dtype == torch.float32
        torch.testing.assert_close(mixed["labels"].sum(-1), torch.ones(6))
        assert (mixed["labels"] < 1).any() and "__index__" not in mixed  # really mixed
    plain = cifar10_data.MixCollator(5)(batch)
    assert plain["labels"].tolist() == [0, 1, 2, 3, 4, 0] and torch.equal(plain["pixel_values"], batch["pixel_values"])
    collator = cifar10_data.MixCollator(5, mixup_alpha=0.8, seed=0)
    a, b = collator(batch)["labels"], collator(batch)["labels"]
    collator.epoch = 1
    torch.testing.assert_close(a, b)  # the same batch in the same epoch is mixed the same way
    assert not torch.equal(collator(batch)["labels"], a)  # another epoch, another mix


def test_the_validation_split_is_stratified_and_seeded_and_a_dataset_without_columns_is_named(dataset_dir, tmp_path):
    splits, image, label = cifar10_data.load_splits(str(dataset_dir), 0.2, seed=7)
    assert (image, label) == ("img", "label") and len(splits["test"]) == 9
    assert sorted(splits["validation"]["label"]) == [0, 0, 1, 1, 2, 2]
    assert cifar10_data.load_splits(str(dataset_dir), 0.2, seed=7)[0]["validation"]["label"] == splits["validation"]["label"]
    assert cifar10_data.load_splits(str(dataset_dir), 0.2, seed=8)[0]["validation"]["img"] != splits["validation"]["img"]
    folder = tmp_path / "data"
    make_image_dataset().rename_column("img", "picture").to_parquet(str(folder / "train-00000-of-00001.parquet"))
    with pytest.raises(cifar10_data.UserError, match=r"image column \('img' or 'image'\); columns found: \['label', 'picture'\]"):
        cifar10_data.load_splits(str(folder), 0.2, seed=0)
