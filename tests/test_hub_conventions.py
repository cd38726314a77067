"""What a transformers and Hub user relies on: the library's model conventions (meta-device
construction, input embeddings, tuples, problem_type, the attention interface), card
metadata that names the dataset's Hub id and no local path, a Space whose requirements
cover what the demo imports, and BatchNorm synchronised across processes."""

import ast
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml

from configuration_hybrid_vit import HybridViTConfig
from modeling_hybrid_vit import HybridViTForImageClassification, HybridViTModel, classification_loss
from tests.conftest import PROJECT_ROOT, TINY_MODEL
from tests.test_training import base_args, train


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


def copy_with_readme(dataset_dir, folder, front_matter):
    shutil.copytree(dataset_dir, folder)
    (folder / "README.md").write_text(f"---\n{yaml.safe_dump(front_matter)}---\n\n# A local copy\n")
    return folder


def test_the_card_names_the_hub_id_a_local_copy_declares_and_no_local_path(dataset_dir, tmp_path, env):
    from huggingface_hub import ModelCard

    data = copy_with_readme(dataset_dir, tmp_path / "my_cifar_copy", {"source_datasets": ["uoft-cs/cifar10"]})
    out = tmp_path / "runs" / "tiny-run"
    result = train(base_args(data, out, "--max_train_steps=2"), env)
    assert result.returncode == 0, result.stderr[-3000:]
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
    for name in ("README.md", "train_config.yaml"):
        text = (out / name).read_text()
        assert str(tmp_path) not in text and "my_cifar_copy" not in text, name
    assert "--dataset_name uoft-cs/cifar10" in (out / "README.md").read_text()  # a command a Hub user can run


def test_a_local_folder_of_unknown_origin_is_named_by_its_last_name(dataset_dir, tmp_path, env):
    from huggingface_hub import ModelCard

    data = tmp_path / "photos"
    shutil.copytree(dataset_dir, data)
    out = tmp_path / "run"
    result = train(base_args(data, out, "--max_train_steps=2"), env)
    assert result.returncode == 0, result.stderr[-3000:]
    card = ModelCard.load(out / "README.md")
    assert card.data.datasets is None  # no Hub id to link
    assert {r.dataset_name for r in card.data.eval_results} == {"photos"}
    assert str(tmp_path) not in (out / "README.md").read_text() + (out / "train_config.yaml").read_text()
    # The setting names the copy's Hub id where the folder does not.
    out = tmp_path / "declared"
    result = train(base_args(data, out, "--max_train_steps=2", "--dataset_hub_id=uoft-cs/cifar10"), env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ModelCard.load(out / "README.md").data.datasets == ["uoft-cs/cifar10"]


def test_the_shared_copy_declares_the_hub_dataset_it_copies():
    from run_folder import dataset_hub_id

    shared = PROJECT_ROOT.parent / "shared" / "data" / "cifar10"
    if not shared.is_dir():
        pytest.skip("../shared/data/cifar10 is not on this machine")
    assert dataset_hub_id(str(shared)) == "uoft-cs/cifar10"
    assert dataset_hub_id("uoft-cs/cifar10") == "uoft-cs/cifar10"


# --------------------------------------------------------------------------------- Space


def imported_modules(path, seen=None) -> set[str]:
    """Top-level names of every module `path` imports (at any depth), following the
    project's own modules that it imports at module level."""
    seen = set() if seen is None else seen
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    top_level = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    top_level |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.level == 0}
    for name in sorted(names):
        local = PROJECT_ROOT / f"{name}.py"
        if local.is_file():
            names.discard(name)
            if name in top_level and name not in seen:
                seen.add(name)
                names |= imported_modules(local, seen)
    return names


def test_the_space_requirements_cover_every_module_the_demo_imports():
    requirements = (PROJECT_ROOT / "space" / "requirements.txt").read_text().splitlines()
    pinned = {re.split(r"[<>=!~ ]", line.strip())[0].lower().replace("_", "-") for line in requirements if line.strip() and not line.startswith("#")}
    distributions = importlib.metadata.packages_distributions()
    third_party = {name for name in imported_modules(PROJECT_ROOT / "app.py") if name not in sys.stdlib_module_names}
    assert {"gradio", "torch", "transformers", "matplotlib", "PIL"} <= third_party
    for module in sorted(third_party):
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        assert names & pinned, f"{module} (from {sorted(names)}) is not in space/requirements.txt"
    header = (PROJECT_ROOT / "space" / "README.md").read_text()
    sdk = re.search(r"^sdk_version: (\S+)", header, re.M).group(1)
    assert f"gradio=={sdk}" in requirements  # the Space runs its header's gradio


# ------------------------------------------------------------------------- many GPUs


def test_the_accelerate_configs_are_valid_for_one_machine_and_for_two():
    from accelerate.commands.config.config_args import load_config_from_file

    one = load_config_from_file(str(PROJECT_ROOT / "configs/accelerate/multi_gpu.yaml"))
    two = load_config_from_file(str(PROJECT_ROOT / "configs/accelerate/two_machines.yaml"))
    assert one.distributed_type == two.distributed_type == "MULTI_GPU"
    assert (one.num_machines, two.num_machines) == (1, 2) and two.num_processes == 2 * one.num_processes
    assert two.main_process_ip and two.main_process_port


SYNC_CHECK = """
import json, sys, torch
from accelerate import PartialState
from run_train import synchronise_batchnorm
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
                "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no"]
    result = subprocess.run(launcher + [str(script), str(tmp_path)], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            env={**env, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(PROJECT_ROOT)}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report == {"class": "AllReduceBatchNorm2d", "output": True, "input_grad": True, "param_grads": True,
                          "running_mean": True, "running_var": True, "unsynchronised_mean_differs": True}, (rank, report, result.stderr[-2000:])


def test_sync_batchnorm_is_a_setting_and_keeps_the_state_dict():
    import run_train

    settings = run_train.load_settings(["--sync_batchnorm", "false"])
    assert settings["training"]["sync_batchnorm"] is False
    assert run_train.load_settings([])["training"]["sync_batchnorm"] == "auto"
    with pytest.raises(run_train.UserError, match="--sync_batchnorm must be auto, true or false"):
        run_train.load_settings(["--sync_batchnorm", "sometimes"])
    model = tiny(backbone_hidden_sizes=[8, 16])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    synced = run_train.synchronise_batchnorm(model, "cpu")
    assert any(isinstance(m, run_train.AllReduceBatchNorm2d) for m in synced.modules())
    after = synced.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    synced.eval()
    assert torch.equal(synced(images()).logits, tiny(backbone_hidden_sizes=[8, 16]).eval()(images()).logits)
