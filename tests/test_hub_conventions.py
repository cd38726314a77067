"""What a transformers and Hub user relies on: the library's model conventions (meta-device
construction, input embeddings, tuples, problem_type, the attention interface), card
metadata that names the dataset's Hub id and no local path, a Space whose files and
requirements are what the demo needs, and BatchNorm synchronised across processes."""

import ast
import importlib.metadata
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml

import hub_folder
from configuration_hybrid_vit import HybridViTConfig
from modeling_hybrid_vit import HybridViTForImageClassification, HybridViTModel, classification_loss
from sync_batchnorm import AllReduceBatchNorm2d, synchronise_batchnorm
from tests.conftest import PROJECT_ROOT, SHARED_CIFAR10, TINY_MODEL


def tiny(**overrides):
    torch.manual_seed(0)
    return HybridViTForImageClassification(HybridViTConfig(**{**TINY_MODEL, **overrides}))


def images(batch=3):
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ model conventions


@pytest.mark.parametrize("model_class", [HybridViTModel, HybridViTForImageClassification])
def test_the_model_can_be_built_on_the_meta_device(model_class):
    config = HybridViTConfig(**TINY_MODEL, drop_path_rate=0.2)
    with torch.device("meta"):
        model = model_class(config)
    assert all(p.device.type == "meta" for p in model.parameters())
    base = model if model_class is HybridViTModel else model.hybrid_vit
    assert [layer.drop_path_rate for layer in base.layers] == pytest.approx([0.0, 0.2])


def test_input_embeddings_let_adapters_train_a_frozen_model_with_gradient_checkpointing():
    model = tiny().train()
    model.requires_grad_(False)
    model.gradient_checkpointing_enable()
    assert isinstance(model.get_input_embeddings(), torch.nn.Module)
    assert model.get_input_embeddings() is model.hybrid_vit.get_input_embeddings()
    frozen = model(images(), output_hidden_states=True)
    assert not frozen.hidden_states[0].requires_grad  # the first layer's input: nothing to train through
    model.enable_input_require_grads()
    hooked = model(images(), output_hidden_states=True)
    assert hooked.hidden_states[0].requires_grad


def test_return_dict_false_gives_tuples_from_both_classes():
    model, labels = tiny().eval(), torch.tensor([0, 1, 2])
    loss, logits = model(images(), labels=labels, return_dict=False)[:2]
    expected = model(images(), labels=labels)
    assert torch.equal(logits, expected.logits) and torch.equal(loss, expected.loss)
    base = model.hybrid_vit(images(), return_dict=False)
    assert isinstance(base, tuple) and torch.equal(base[0], model.hybrid_vit(images()).last_hidden_state)
    model.config.return_dict = False
    assert isinstance(model(images()), tuple) and isinstance(model.hybrid_vit(images()), tuple)


def test_problem_type_means_what_it_means_in_transformers_and_soft_labels_still_train():
    x = images()
    regression = tiny(num_labels=1).eval()
    target = torch.tensor([0.5, -1.0, 2.0])
    out = regression(x, labels=target)
    assert out.loss.item() == pytest.approx(F.mse_loss(out.logits.view(-1), target).item())
    assert regression.config.problem_type is None  # inferred, never written into the config

    multi = tiny(num_labels=3, problem_type="multi_label_classification").eval()
    hot = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    out = multi(x, labels=hot)
    assert out.loss.item() == pytest.approx(F.binary_cross_entropy_with_logits(out.logits, hot).item())

    soft = tiny(num_labels=3).eval()  # MixUp/CutMix targets, problem_type unset: cross-entropy
    mixed = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])
    out = soft(x, labels=mixed)
    assert out.loss.item() == pytest.approx(classification_loss(out.logits, mixed).item())
    assert soft.config.problem_type is None
    ints = tiny(num_labels=3, problem_type="single_label_classification").eval()
    out = ints(x, labels=torch.tensor([0, 2, 1]))
    assert out.loss.item() == pytest.approx(F.cross_entropy(out.logits, torch.tensor([0, 2, 1])).item())


def test_set_attn_implementation_switches_at_run_time_with_equal_logits():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model = tiny().eval()
    assert model.config._attn_implementation == "sdpa"
    sdpa_logits = model(images()).logits
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    assert torch.allclose(model(images()).logits, sdpa_logits, atol=1e-5)

    calls = []

    def counting_attention(module, *args, **kwargs):  # a user-registered implementation
        calls.append(type(module).__name__)
        return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register("counting_sdpa", counting_attention)
    model.set_attn_implementation("counting_sdpa")
    assert torch.allclose(model(images()).logits, sdpa_logits, atol=1e-5)
    assert calls == ["HybridViTAttention"] * model.config.num_hidden_layers

    model.set_attn_implementation("sdpa")
    out = model(images(), output_attentions=True)  # probabilities, under the default implementation too
    assert len(out.attentions) == model.config.num_hidden_layers
    assert torch.allclose(out.attentions[0].sum(-1), torch.ones(()), atol=1e-5)
    assert torch.allclose(out.logits, sdpa_logits, atol=1e-5)


# ------------------------------------------------------------------------ card metadata


# A run_train.py run of a few seconds: a tiny model (trained at 32x32, whatever the images' size).
TINY_RUN = ["--train_val_split", "0.2", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
            "--max_train_steps", "2", "--checkpointing_steps", "null", "--report_to", "none", "--mixed_precision", "no",
            "--backbone_hidden_sizes", "8,16", "--token_stages", "1", "--hidden_size", "16", "--num_hidden_layers", "2",
            "--class_attention_layers", "0", "--num_attention_heads", "2", "--intermediate_size", "32"]


def train(args, env):
    """run_train.py in a fresh process, from the project's folder."""
    command = [sys.executable, str(PROJECT_ROOT / "run_train.py"), *args, *TINY_RUN]
    result = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def copy_with_readme(dataset_dir, folder, front_matter):
    shutil.copytree(dataset_dir, folder)
    (folder / "README.md").write_text(f"---\n{yaml.safe_dump(front_matter)}---\n\n# A local copy\n")
    return folder


def test_the_card_names_the_hub_id_a_local_copy_declares_and_no_local_path(dataset_dir, tmp_path, env):
    from huggingface_hub import ModelCard

    data = copy_with_readme(dataset_dir, tmp_path / "my_cifar_copy", {"source_datasets": ["uoft-cs/cifar10"]})
    out = tmp_path / "runs" / "tiny-run"
    train([f"--dataset_name={data}", "--output_dir", str(out)], env)  # both forms of --key value
    card = ModelCard.load(out / "README.md")
    assert card.data.datasets == ["uoft-cs/cifar10"]
    assert card.data.metrics == ["accuracy"] and card.data.pipeline_tag == "image-classification"
    results = json.loads((out / "all_results.json").read_text())
    by_split = {r.dataset_split: r for r in card.data.eval_results}
    assert set(by_split) == {"validation", "test"}  # the dataset has a test split: its accuracy is there too
    for split, key in (("validation", "eval_accuracy"), ("test", "test_accuracy")):
        assert by_split[split].dataset_type == by_split[split].dataset_name == "uoft-cs/cifar10"
        assert by_split[split].metric_type == "accuracy"
        assert by_split[split].metric_value == pytest.approx(results[key], abs=1e-4)
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert saved["data"]["dataset_name"] == "uoft-cs/cifar10" and saved["training"]["output_dir"] == "tiny-run"
    for name in ("README.md", "train_config.yaml", "all_results.json"):
        text = (out / name).read_text()
        assert str(tmp_path) not in text and "my_cifar_copy" not in text, name
    # A command a Hub user can run, and the name they load the model by.
    readme = (out / "README.md").read_text()
    assert "--dataset_name=uoft-cs/cifar10 --output_dir tiny-run " in readme
    assert 'pipeline("image-classification", model="tiny-run", trust_remote_code=True)' in readme
    assert results["sync_batchnorm"] is False  # one process: nothing to synchronise


def test_a_local_folder_of_unknown_origin_is_named_by_its_last_name(dataset_dir, tmp_path, env):
    from huggingface_hub import ModelCard

    data = tmp_path / "photos"
    shutil.copytree(dataset_dir, data)
    out = tmp_path / "run"
    train(["--dataset_name", str(data), "--output_dir", str(out)], env)
    card = ModelCard.load(out / "README.md")
    assert card.data.datasets is None  # no Hub id to link
    assert {r.dataset_name for r in card.data.eval_results} == {"photos"}
    assert "--dataset_name photos --output_dir run " in (out / "README.md").read_text()
    assert yaml.safe_load((out / "train_config.yaml").read_text())["data"]["dataset_name"] == "photos"
    assert str(tmp_path) not in (out / "README.md").read_text() + (out / "train_config.yaml").read_text()


@pytest.mark.parametrize("front_matter, hub_id", [
    ({"source_datasets": "uoft-cs/cifar10"}, "uoft-cs/cifar10"),  # one source, written as a string
    ({"source_datasets": ["uoft-cs/cifar10", "other/set"]}, None),  # which one? none
    ({"license": "mit"}, None),
])
def test_a_local_copy_is_linked_to_the_one_hub_dataset_its_readme_names(dataset_dir, tmp_path, front_matter, hub_id):
    data = copy_with_readme(dataset_dir, tmp_path / "copy", front_matter)
    assert hub_folder.dataset_hub_id(str(data)) == hub_id
    assert hub_folder.dataset_hub_id(str(dataset_dir)) is None  # no README at all
    (data / "README.md").write_text("---\nsource_datasets: [unclosed\n---\n")
    assert hub_folder.dataset_hub_id(str(data)) is None  # a broken card is no Hub id, not a crash


def test_hub_ids_and_paths_are_told_apart_and_paths_become_their_last_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cifar10").mkdir()
    assert [hub_folder.is_local_path(name) for name in ("uoft-cs/cifar10", "cifar", "cifar10", "./x", "/x", "~/x", "a/b/c")] == [
        False, False, True, True, True, True, True]  # an existing folder wins over a Hub id
    assert hub_folder.public_name("../data/cifar10") == "cifar10" and hub_folder.public_name("owner/name") == "owner/name"
    assert hub_folder.public_name(None) is None
    settings = {"data": {"dataset_name": "/data/photos"}, "training": {"output_dir": "/runs/a", "resume_from_checkpoint": "latest"}}
    assert hub_folder.public_settings(settings) == {
        "data": {"dataset_name": "photos"}, "training": {"output_dir": "a", "resume_from_checkpoint": "latest"}}
    assert settings["data"]["dataset_name"] == "/data/photos"  # the run's own settings are left as they are
    command = "python run_train.py --dataset_name /data/photos --output_dir=/runs/a --seed 1 --resume_from_checkpoint latest"
    names = {"--dataset_name": "photos", "--output_dir": "a"}
    assert hub_folder.public_command(command, names) == (
        "python run_train.py --dataset_name photos --output_dir=a --seed 1 --resume_from_checkpoint latest")
    drop = ("--resume_from_checkpoint",)
    assert hub_folder.public_command(command, names, drop) == "python run_train.py --dataset_name photos --output_dir=a --seed 1"
    assert hub_folder.public_command("python run_train.py --resume_from_checkpoint=latest --seed 1", {}, drop) == (
        "python run_train.py --seed 1")


def test_a_card_gives_hours_for_long_runs_and_each_machine_of_a_run_resumed_on_another():
    """A release trained over several evenings says where each stretch ran and how long."""
    xeon, epyc = "1 process(es) on CPU: Xeon (AMX), 2 cores", "1 process(es) on CPU: EPYC (AVX2), 2 cores"
    results = {"hardware": epyc, "segments": [
        {"hardware": xeon, "mixed_precision": "bf16", "first_step": 0, "last_step": 7000, "train_seconds": 4 * 3600},
        {"hardware": epyc, "mixed_precision": "no", "first_step": 7000, "last_step": 9000, "train_seconds": 30 * 60}]}
    assert hub_folder.hardware_line(results) == (f"steps 0-7000 on {xeon}, bf16 mixed precision, 4.00 h; "
                                                 f"steps 7000-9000 on {epyc}, float32, 30.0 min")
    one_machine = {"hardware": epyc, "segments": [dict(results["segments"][1], first_step=0), results["segments"][1]]}
    assert hub_folder.hardware_line(one_machine) == epyc  # resumed on the same machine: nothing to tell apart
    assert hub_folder.hardware_line({"hardware": epyc}) == epyc  # a folder from before segments were recorded


def test_the_shared_copy_declares_the_hub_dataset_it_copies():
    if not SHARED_CIFAR10.is_dir():
        pytest.skip("../shared/data/cifar10 is not on this machine")
    assert hub_folder.dataset_hub_id(str(SHARED_CIFAR10)) == "uoft-cs/cifar10"
    assert hub_folder.dataset_hub_id("uoft-cs/cifar10") == "uoft-cs/cifar10"


# --------------------------------------------------------------------------------- Space


def imported_modules(path, seen=None) -> tuple[set[str], set[str]]:
    """(the project's modules, other top-level modules) that `path` imports anywhere in it, and
    the modules it imports import, and so on: what running it may need."""
    seen = set() if seen is None else seen
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    project = {name for name in names if (PROJECT_ROOT / f"{name}.py").is_file()}
    others = names - project
    for name in sorted(project - seen):
        seen.add(name)
        more_project, more_others = imported_modules(PROJECT_ROOT / f"{name}.py", seen)
        project |= more_project
        others |= more_others
    return project, others


def space_files() -> list[str]:
    """What space/README.md says to put next to it and requirements.txt, from the checkout."""
    text = (PROJECT_ROOT / "space" / "README.md").read_text()
    listed = re.search(r"from the project's checkout: (.*?)\. ", text, re.S)
    assert listed, "space/README.md no longer says which files of the checkout the Space holds"
    return re.findall(r"`([^`]+)`", listed.group(1))


def test_the_space_requirements_cover_every_module_the_demo_imports():
    requirements = (PROJECT_ROOT / "space" / "requirements.txt").read_text().splitlines()
    pinned = {re.split(r"[<>=!~ ]", line.strip())[0].lower().replace("_", "-") for line in requirements if line.strip() and not line.startswith("#")}
    distributions = importlib.metadata.packages_distributions()
    third_party = {name for name in imported_modules(PROJECT_ROOT / "app.py")[1] if name not in sys.stdlib_module_names}
    assert {"gradio", "torch", "transformers", "matplotlib", "PIL"} <= third_party
    for module in sorted(third_party):
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        assert names & pinned, f"{module} (from {sorted(names)}) is not in space/requirements.txt"
    header = (PROJECT_ROOT / "space" / "README.md").read_text()
    sdk = re.search(r"^sdk_version: (\S+)", header, re.M).group(1)
    assert f"gradio=={sdk}" in requirements  # the Space runs its header's gradio


def test_the_space_holds_every_project_module_the_demo_imports_and_runs_from_them_alone(tmp_path):
    """A Space is the files its README lists: with only those (and the model, here the release
    folder), the demo imports, classifies an example and builds its page."""
    files = space_files()
    project, _ = imported_modules(PROJECT_ROOT / "app.py")
    assert {"app.py", "assets/examples/"} <= set(files)
    assert {f"{name}.py" for name in project} <= set(files), f"space/README.md lists {files}"
    space = tmp_path / "space"
    space.mkdir()
    for source, name in [*((PROJECT_ROOT / name, name) for name in files),
                         *((PROJECT_ROOT / "space" / name, name) for name in ("README.md", "requirements.txt"))]:
        (shutil.copytree if source.is_dir() else shutil.copy)(source, space / name)
    code = f"""
import json, sys
from PIL import Image
import app
model, processor = app.load_model({str(PROJECT_ROOT / "checkpoints" / "hybrid-vit-cifar10")!r})
classify = app.make_classifier(model, processor)
labels, overlay = classify(Image.open("assets/examples/ship.png"))
app.build_demo(classify, "release", model.config)
print(json.dumps({{"top": max(labels, key=labels.get), "overlay": list(overlay.shape), "path": sys.path}}))
"""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=space, capture_output=True, text=True, timeout=300,
                            env={**env, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
                                 "GRADIO_ANALYTICS_ENABLED": "False"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert str(PROJECT_ROOT) not in report["path"]
    assert report["top"] == "ship" and report["overlay"] == [256, 256, 3]


# ------------------------------------------------------------------------- many GPUs


def test_the_accelerate_configs_are_valid_for_one_machine_and_for_two():
    from accelerate.commands.config.config_args import load_config_from_file

    one = load_config_from_file(str(PROJECT_ROOT / "configs/accelerate/multi_gpu.yaml"))
    two = load_config_from_file(str(PROJECT_ROOT / "configs/accelerate/two_machines.yaml"))
    assert one.distributed_type == two.distributed_type == "MULTI_GPU"
    assert (one.num_machines, two.num_machines) == (1, 2) and two.num_processes == 2 * one.num_processes
    assert two.main_process_ip and two.main_process_port


def free_port() -> int:
    """A port no one listens on, so that runs beside this one (another checkout's tests) do not
    meet on Accelerate's default rendezvous port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


SYNC_CHECK = """
import json, sys, torch
from accelerate import PartialState
from sync_batchnorm import synchronise_batchnorm
state = PartialState(cpu=True)
torch.manual_seed(0)
batch = torch.randn(8, 4, 5, 5) * 3 + 1             # the whole batch; each process takes its half
weight = torch.randn(8, 4, 5, 5)                     # a fixed linear loss, to compare gradients
model = torch.nn.Sequential(torch.nn.BatchNorm2d(4))
model[0].weight.data.uniform_(0.5, 1.5); model[0].bias.data.uniform_(-0.5, 0.5)
reference = torch.nn.Sequential(torch.nn.BatchNorm2d(4)); reference.load_state_dict(model.state_dict())
model = synchronise_batchnorm(model, "cpu").train()
half = slice(4 * state.process_index, 4 * state.process_index + 4)
x = batch[half].clone().requires_grad_(True)
y = model(x)
(y * weight[half]).sum().backward()
full_x = batch.clone().requires_grad_(True)
full_y = reference.train()(full_x)
(full_y * weight).sum().backward()
grads = torch.cat([model[0].weight.grad, model[0].bias.grad])
torch.distributed.all_reduce(grads)                  # each process holds its half's share
report = {
    "class": type(model[0]).__name__,
    "output": torch.allclose(y, full_y[half], atol=1e-5),
    "input_grad": torch.allclose(x.grad, full_x.grad[half], atol=1e-5),
    "param_grads": torch.allclose(grads, torch.cat([reference[0].weight.grad, reference[0].bias.grad]), atol=1e-4),
    "running_mean": torch.allclose(model[0].running_mean, reference[0].running_mean, atol=1e-6),
    "running_var": torch.allclose(model[0].running_var, reference[0].running_var, atol=1e-5),
    "unsynchronised_mean_differs": not torch.allclose(batch[half].mean((0, 2, 3)), batch.mean((0, 2, 3)), atol=1e-3),
}
with open(sys.argv[1] + f"/rank{state.process_index}.json", "w") as file:
    json.dump(report, file)
state.wait_for_everyone()
torch.distributed.destroy_process_group()  # a clean exit: gloo aborts a process that leaves its group open
"""


def test_synchronised_batchnorm_on_two_processes_equals_one_process_seeing_the_whole_batch(tmp_path, env):
    script = tmp_path / "sync_check.py"
    script.write_text(SYNC_CHECK)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
                "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={free_port()}"]
    result = subprocess.run(launcher + [str(script), str(tmp_path)], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            env={**env, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(PROJECT_ROOT)}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report == {"class": "AllReduceBatchNorm2d", "output": True, "input_grad": True, "param_grads": True,
                          "running_mean": True, "running_var": True, "unsynchronised_mean_differs": True}, (rank, report, result.stderr[-2000:])


def test_batchnorm_is_synchronised_whenever_several_processes_train_and_keeps_the_state_dict():
    """run_train.py synchronises BatchNorm by itself when more than one process trains (there is
    no setting); the synchronised model has the same state dict, so it saves the same folder."""
    from types import SimpleNamespace

    import run_train

    config = HybridViTConfig(**TINY_MODEL)
    whitening = torch.randn(8, 3, 16, 16)
    for processes, synchronised in ((1, False), (2, True)):
        accelerator = SimpleNamespace(num_processes=processes, device=torch.device("cpu"))
        model = run_train.build_model(config, whitening, accelerator, log=lambda message: None)
        assert any(isinstance(m, AllReduceBatchNorm2d) for m in model.modules()) == synchronised, processes
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())

    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    synced = synchronise_batchnorm(model, "cpu")
    assert all(type(m) is not torch.nn.BatchNorm2d for m in synced.modules())
    after = synced.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    synced.eval()
    assert torch.equal(synced(images()).logits, tiny().eval()(images()).logits)
